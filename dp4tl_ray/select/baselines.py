"""The DP4TL paper's baselines: random pruning and per-image score pruning, at a matched budget.

``random_by_class`` drops whole classes (the class budget of Label Mapping). The image-level ones
keep exactly ``budget`` images, where :func:`image_budget` makes the budget equal to the images a
compared KeepSet kept, so a baseline and LM/FM train on as many images. Each returns sorted ids.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from dp4tl_ray.errors import UserError
from dp4tl_ray.select.keepset import KeepSet, keep_ids_for_units
from dp4tl_ray.select.voting import units_to_drop

# Absorbs float error in keep_fraction * total (0.7 * 10 = 6.999999999999999).
_FRACTION_EPS = 1e-9


def image_budget(images_total: int, keep_fraction: float | None = None, match_keepset: KeepSet | None = None) -> int:
    """Images to keep: ``floor(keep_fraction * images_total)``, or as many as ``match_keepset`` kept."""
    if images_total < 1:
        raise UserError(f"source set has no images (images_total={images_total})")
    if (keep_fraction is None) == (match_keepset is None):
        raise UserError("give exactly one of keep_fraction or match_keepset to set the image budget")
    if match_keepset is not None:
        budget = len(match_keepset)
    else:
        if not isinstance(keep_fraction, numbers.Real) or math.isnan(keep_fraction) or not 0 < keep_fraction <= 1:
            raise UserError(f"keep_fraction must be in (0, 1] (fraction of images kept), got {keep_fraction!r}")
        budget = math.floor(keep_fraction * images_total + _FRACTION_EPS)
    return _checked_budget(budget, images_total)


def random_by_class(labels: np.ndarray, ids: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Drop ``floor(ratio * C)`` of the ``C`` classes present, drawn uniformly with ``seed``; keep the rest's images."""
    labels, ids = np.asarray(labels), _unique_ids(ids)
    classes = np.unique(labels)
    drop = np.random.default_rng(seed).choice(classes, size=units_to_drop(classes.shape[0], ratio), replace=False)
    return keep_ids_for_units(labels, ids, np.setdiff1d(classes, drop))


def random_by_image(ids: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """``budget`` ids drawn uniformly without replacement with ``seed`` (the same for any input order)."""
    ids = np.sort(_unique_ids(ids))
    budget = _checked_budget(budget, ids.shape[0])
    return np.sort(np.random.default_rng(seed).choice(ids, size=budget, replace=False))


MODERATE_BANDS = ("per-class", "global")


def distances_to_class_median(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's Euclidean distance (float64) to its class prototype, the class's coordinate-wise median
    feature (Moderate-DS's score). A class at a time, so the same rows give the same distances in any order."""
    feats, labels = np.asarray(features), np.asarray(labels)
    dist = np.empty(feats.shape[0])
    order = np.argsort(labels, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        f = feats[rows].astype(np.float64)
        dist[rows] = np.linalg.norm(f - np.median(f, axis=0), axis=1)
    return dist


def class_quotas(counts: np.ndarray, budget: int) -> np.ndarray:
    """Images kept per class when every class keeps the fraction ``budget / n``: the floors of
    ``count * budget / n``, plus one for the largest remainders (ties to the smaller class index) so
    the quotas add up to ``budget`` exactly."""
    counts = np.asarray(counts, np.int64)
    n = int(counts.sum())
    quota, rem = np.divmod(counts * budget, n)
    quota[np.lexsort((np.arange(len(counts)), -rem))[: budget - int(quota.sum())]] += 1
    return quota


def moderate_from_distances(dist: np.ndarray, labels: np.ndarray, ids: np.ndarray, budget: int,
                            band: str = "per-class") -> np.ndarray:
    """Sorted ids in the middle band of the sorted distances, ``budget`` of them (ties by smaller id).

    ``per-class`` (DP4TL's protocol): each class keeps its :func:`class_quotas` share from the middle of
    its own sorted distances, ``(n_c - q_c) // 2`` closest and the rest of the farthest dropped.
    ``global`` (Xia et al.'s released code): one middle band over all images' distances.
    """
    dist, labels, ids = np.asarray(dist, np.float64), np.asarray(labels), _unique_ids(ids)
    if band not in MODERATE_BANDS:
        raise UserError(f"moderate band must be one of {', '.join(MODERATE_BANDS)}, got {band!r}")
    if dist.shape != ids.shape or labels.shape != ids.shape:
        raise UserError(f"distances, labels and ids must be 1-D of equal length, got {dist.shape}, {labels.shape}, {ids.shape}")
    budget = _checked_budget(budget, ids.shape[0])
    if band == "global":
        order = np.lexsort((ids, dist))
        low = (len(ids) - budget) // 2
        return np.sort(ids[order[low:low + budget]])
    classes, cls = np.unique(labels, return_inverse=True)
    counts = np.bincount(cls, minlength=len(classes))
    quota = class_quotas(counts, budget)
    order = np.lexsort((ids, dist, cls))  # by class, then distance, then id
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(len(ids)) - np.repeat(start, counts)  # position within the class
    low = np.repeat((counts - quota) // 2, counts)
    keep = (rank >= low) & (rank < low + np.repeat(quota, counts))
    return np.sort(ids[order[keep]])


def moderate(features: np.ndarray, labels: np.ndarray, ids: np.ndarray, budget: int, band: str = "per-class") -> np.ndarray:
    """Moderate-DS (Xia et al., ICLR 2023) in memory: distance to the class's median feature, middle band kept
    (see :func:`moderate_from_distances`). The reference for the distributed path in ``select.class_stats``."""
    feats = np.asarray(features)
    labels, ids = np.asarray(labels), _unique_ids(ids)
    if feats.ndim != 2 or feats.shape[0] != ids.shape[0] or labels.shape != ids.shape:
        raise UserError(
            f"features [n, d], labels [n] and ids [n] must agree; got {feats.shape}, {labels.shape}, {ids.shape}"
        )
    if not np.isfinite(feats).all():
        raise UserError("features must be finite; re-run `dp4tl extract`")
    return moderate_from_distances(distances_to_class_median(feats, labels), labels, ids, budget, band)


def top_scores(scores: np.ndarray, ids: np.ndarray, budget: int) -> np.ndarray:
    """The ``budget`` highest-scoring ids (EL2N and GraNd keep the hard examples); ties by smaller id."""
    scores, ids = np.asarray(scores, dtype=np.float64), _unique_ids(ids)
    if scores.shape != ids.shape:
        raise UserError(f"scores and ids must be 1-D of equal length, got {scores.shape} and {ids.shape}")
    if not np.isfinite(scores).all():
        raise UserError("scores must be finite (found NaN or inf); recompute them")
    return _lowest(-scores, ids, _checked_budget(budget, ids.shape[0]))


def _lowest(key: np.ndarray, ids: np.ndarray, budget: int) -> np.ndarray:
    """Sorted ids of the ``budget`` smallest keys, ties broken by smaller id."""
    return np.sort(ids[np.lexsort((ids, key))[:budget]])


def _checked_budget(budget: int, total: int) -> int:
    if not isinstance(budget, numbers.Integral) or not 1 <= budget <= total:
        raise UserError(f"image budget must be an integer in [1, {total}] (images available), got {budget!r}")
    return int(budget)


def _unique_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"ids must be a non-empty 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise UserError("ids must be unique (one per source image)")
    return ids.astype(np.int64, copy=False)
