"""Vote rules: how the downstream images' unit choices become a ranking of the units.

- ``votes`` (the default; the paper's LM / FM rule): units ranked by how many downstream images
  pick them (:func:`dp4tl_ray.select.voting.rank_units_by_votes`).
- ``one-to-one`` (a variant beyond the paper): rounds of the greedy one-to-one frequency label
  mapping that ILM-VP (Chen et al., CVPR 2023) uses to map target classes to source classes. In
  each round every downstream class claims one still unclaimed unit, the largest remaining
  class -> unit count first; units claimed in earlier rounds rank higher. A "sink" unit that takes
  most classes' top-1 votes is claimed once, and the other classes fall back to their next choice,
  so every downstream class is represented among the kept units. ILM-VP maps one class to one unit
  with top-1 counts and redoes it during prompt training; here there is no prompt, the rounds
  extend the mapping to a full ranking, and where a class has no top-1 count left its top-k counts
  (``runner-up``) decide; units no class claims follow in the ``votes`` order.
"""

from __future__ import annotations

import numpy as np

from dp4tl_ray.errors import UserError
from dp4tl_ray.select.voting import class_unit_votes

VOTE_RULES = ("votes", "one-to-one")


def one_to_one_ranking(labels_and_units: list[tuple[np.ndarray, np.ndarray]], num_units: int,
                       fallback_ranking: np.ndarray) -> np.ndarray:
    """:func:`rank_units_one_to_one` from each task's downstream labels and images' top-k units
    ``[n, k]``: top-1 counts decide, top-k counts where they tie; every class of every task claims."""
    first = np.vstack([class_unit_votes(units, labels, num_units, 1) for labels, units in labels_and_units])
    topk = np.vstack([class_unit_votes(units, labels, num_units, units.shape[1]) for labels, units in labels_and_units])
    return rank_units_one_to_one(first, topk, fallback_ranking)


def rank_units_one_to_one(class_votes: np.ndarray, class_runner_up: np.ndarray | None,
                          fallback_ranking: np.ndarray) -> np.ndarray:
    """Unit ids from first to last claimed, given per-class unit counts ``[C, U]``.

    ``class_votes`` are top-1 counts, ``class_runner_up`` (same shape, optional) top-k counts that
    decide where top-1 counts are equal (zero, mostly); remaining ties go to the unit placed
    earlier in ``fallback_ranking`` (a ranking of all ``U`` units, e.g. by votes).
    """
    primary = np.asarray(class_votes, np.float64)
    secondary = np.zeros_like(primary) if class_runner_up is None else np.asarray(class_runner_up, np.float64)
    fallback = np.asarray(fallback_ranking, np.int64)
    if primary.ndim != 2 or secondary.shape != primary.shape:
        raise UserError(f"class votes must be [classes, units] and runner-up votes the same shape; got "
                        f"{primary.shape} and {secondary.shape}")
    if sorted(fallback.tolist()) != list(range(primary.shape[1])):
        raise UserError(f"fallback ranking must hold each of the {primary.shape[1]} units once")
    if (primary < 0).any() or (secondary < 0).any():
        raise UserError("class votes must be non-negative")
    # Columns in fallback order, so ties go to the unit the fallback ranking places first.
    score = (primary * (secondary.sum() + 1) + secondary)[:, fallback]
    claimed = np.zeros(score.shape[1], bool)
    order: list[int] = []
    while True:  # one round: each class claims at most one unclaimed unit, largest count first
        rows, cols = np.nonzero((score > 0) & ~claimed[None, :])
        if rows.size == 0:
            break
        done = np.zeros(score.shape[0], bool)
        for i in np.lexsort((rows, cols, -score[rows, cols])):
            c, u = rows[i], cols[i]
            if not done[c] and not claimed[u]:
                done[c] = claimed[u] = True
                order.append(int(u))
    rest = np.flatnonzero(~claimed)
    return fallback[np.r_[np.asarray(order, np.int64), rest]]
