"""Votes -> ranking -> kept units: the selection maths shared by Label Mapping and Feature Mapping.

A *unit* is a source class (LM) or a k-means cluster (FM), indexed ``0..U-1``. Each downstream image
votes for the units its surrogate maps it to; the least-voted fraction ``ratio`` of units is dropped.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dp4tl_ray.errors import UserError

# Absorbs float error in ratio * U (0.3 * 10 = 2.9999999999999996) without moving a genuine value.
_RATIO_EPS = 1e-9


def votes_from_topk(topk_idx: np.ndarray, num_units: int, k: int = 1) -> np.ndarray:
    """Votes per unit from each image's top-k unit indices ``[n, >=k]`` (a 1-D array is top-1).

    With ``k=1`` each image gives one vote to its top unit; with ``k>1`` it gives ``1/k`` to each of
    its top-k units (soft votes), so the votes always sum to ``n``.
    """
    idx = np.asarray(topk_idx)
    if idx.ndim == 1:
        idx = idx[:, None]
    if idx.ndim != 2 or idx.shape[0] == 0:
        raise UserError(f"downstream set has no images: got top-k indices of shape {idx.shape}")
    if not 1 <= k <= idx.shape[1]:
        raise UserError(f"k={k} must be between 1 and the {idx.shape[1]} top-k columns stored")
    if not np.issubdtype(idx.dtype, np.integer):
        raise UserError(f"top-k indices must be integers, got dtype {idx.dtype}")
    top = idx[:, :k].ravel()
    if top.min() < 0 or top.max() >= num_units:
        raise UserError(f"top-k indices must lie in [0, {num_units}); got [{top.min()}, {top.max()}]")
    return np.bincount(top, minlength=num_units).astype(np.float64) / k


def class_unit_votes(unit_idx: np.ndarray, labels: np.ndarray, num_units: int, k: int = 1) -> np.ndarray:
    """Votes ``float64[C, U]`` of each downstream class for each unit (top-k images give 1/k each)."""
    idx = np.asarray(unit_idx)
    idx = idx[:, None] if idx.ndim == 1 else idx
    labels = np.asarray(labels)
    if idx.ndim != 2 or idx.shape[0] == 0 or labels.shape != idx.shape[:1]:
        raise UserError(f"need one label per downstream image and at least one image; got units {idx.shape}, "
                        f"labels {labels.shape}")
    if not 1 <= k <= idx.shape[1]:
        raise UserError(f"k={k} must be between 1 and the {idx.shape[1]} top-k columns stored")
    top = idx[:, :k]
    if top.min() < 0 or top.max() >= num_units or labels.min() < 0:
        raise UserError(f"unit indices must lie in [0, {num_units}) and labels be non-negative")
    num_classes = int(labels.max()) + 1
    flat = (np.repeat(labels.astype(np.int64), k) * num_units + top.ravel()).astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_units).reshape(num_classes, num_units) / k


def combine_task_votes(votes_per_task: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sum several downstream tasks' votes, each first normalised to sum 1 so every task weighs the same."""
    if not votes_per_task:
        raise UserError("downstream set has no images: no downstream task given")
    arrays = {name: _checked_votes(v, name) for name, v in votes_per_task.items()}
    sizes = {a.shape[0] for a in arrays.values()}
    if len(sizes) != 1:
        raise UserError(f"every task's votes must cover the same units; got lengths {sorted(sizes)}")
    return np.sum([a / a.sum() for a in arrays.values()], axis=0)


def rank_units_by_votes(votes: np.ndarray, seed: int, runner_up_votes: np.ndarray | None = None) -> np.ndarray:
    """Unit ids from most to least voted.

    Ties are broken first by ``runner_up_votes`` if given (e.g. soft top-k votes: among units with
    the same top-1 votes - zero, typically - those that were the downstream images' second or
    third choice rank higher), then by a permutation of the units drawn from
    ``np.random.default_rng(seed)``: the same votes and seed always give the same ranking, and no
    unit is favoured for its index.
    """
    votes = _checked_votes(votes)
    tiebreak = np.random.default_rng(seed).permutation(votes.shape[0])
    runner_up = np.zeros_like(votes) if runner_up_votes is None else np.asarray(runner_up_votes, np.float64)
    if runner_up.shape != votes.shape:
        raise UserError(f"runner-up votes must have one entry per unit ({votes.shape[0]}), got shape {runner_up.shape}")
    return np.lexsort((tiebreak, -runner_up, -votes))


def units_to_drop(num_units: int, ratio: float) -> int:
    """``floor(ratio * num_units)``, robust to float error; ``ratio`` must lie in [0, 1)."""
    if num_units < 1:
        raise UserError(f"need at least one unit to select from, got {num_units}")
    if not isinstance(ratio, numbers.Real) or math.isnan(ratio) or not 0 <= ratio < 1:
        raise UserError(f"ratio must be in [0, 1) (fraction of units removed), got {ratio!r}")
    return min(math.floor(ratio * num_units + _RATIO_EPS), num_units - 1)


def kept_units_for_ratio(votes: np.ndarray, ratio: float, seed: int,
                         runner_up_votes: np.ndarray | None = None, least_voted: bool = False) -> np.ndarray:
    """Sorted ids of the units kept once the ``floor(ratio * U)`` lowest-ranked are dropped.

    Zero-vote units rank last, so they are the first to go (see :func:`rank_units_by_votes` for ties).
    ``least_voted`` keeps as many units from the other end of the ranking instead: the sanity
    ablation of the reference code's ``reverse`` flag, which should transfer worse than random.
    """
    ranking = rank_units_by_votes(votes, seed, runner_up_votes)
    return kept_units_from_ranking(ranking[::-1] if least_voted else ranking, ratio)


def kept_units_from_ranking(ranking: np.ndarray, ratio: float) -> np.ndarray:
    """Sorted ids of the units left once the last ``floor(ratio * U)`` of ``ranking`` are dropped."""
    ranking = np.asarray(ranking, np.int64)
    return np.sort(ranking[: ranking.shape[0] - units_to_drop(ranking.shape[0], ratio)])


def images_kept_per_units_dropped(ranking: np.ndarray, unit_sizes: np.ndarray) -> np.ndarray:
    """Images kept when the ``d`` lowest-ranked units are dropped, for ``d = 0..U-1``.

    Entry ``d`` is what every ratio in ``[d/U, (d+1)/U)`` keeps (``units_to_drop``): how the images
    kept grow with the ratio, read off one ranking (units differ in size, so the curve is not linear).
    """
    sizes = np.asarray(unit_sizes, dtype=np.int64)[np.asarray(ranking)]
    return np.cumsum(sizes)[::-1].copy()


@dataclass(frozen=True)
class SelectionSummary:
    """What a selection kept, in units and in images (units differ in size)."""

    units_kept: int
    units_total: int
    images_kept: int
    images_total: int
    fraction_images_removed: float
    votes_per_unit: list[float]


def summarize_selection(
    votes: np.ndarray, kept_units: np.ndarray, unit_sizes: np.ndarray
) -> SelectionSummary:
    """Summary of keeping ``kept_units``, given the number of source images in each unit."""
    votes = _checked_votes(votes)
    sizes = np.asarray(unit_sizes)
    if sizes.shape != votes.shape or not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
        raise UserError(
            f"unit sizes must be {votes.shape[0]} non-negative integers (images per unit), "
            f"got shape {sizes.shape} dtype {sizes.dtype}"
        )
    images_total = int(sizes.sum())
    if images_total == 0:
        raise UserError("source set has no images: every unit has size 0")
    kept = np.unique(np.asarray(kept_units, dtype=np.int64))
    images_kept = int(sizes[kept].sum())
    return SelectionSummary(
        units_kept=int(kept.shape[0]),
        units_total=int(votes.shape[0]),
        images_kept=images_kept,
        images_total=images_total,
        fraction_images_removed=1.0 - images_kept / images_total,
        votes_per_unit=votes.tolist(),
    )


def _checked_votes(votes: np.ndarray, task: str = "") -> np.ndarray:
    """``votes`` as a 1-D float64 array, refused if empty, negative, non-finite or all zero."""
    where = f" (task {task!r})" if task else ""
    v = np.asarray(votes, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] == 0:
        raise UserError(f"votes{where} must be a 1-D array with one entry per unit, got shape {v.shape}")
    if not np.isfinite(v).all() or (v < 0).any():
        raise UserError(f"votes{where} must be finite and non-negative")
    if v.sum() == 0:
        raise UserError(f"downstream set has no images: no votes were cast{where}")
    return v
