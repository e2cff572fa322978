"""The one-to-one vote rule: every downstream class claims its own unit, so a sink unit cannot crowd them out."""

from __future__ import annotations

import numpy as np
import pytest

from dp4tl_ray.errors import UserError
from dp4tl_ray.select.vote_rules import one_to_one_ranking, rank_units_one_to_one
from dp4tl_ray.select.voting import kept_units_for_ratio, kept_units_from_ranking, rank_units_by_votes, votes_from_topk

CLASSES, UNITS, SINK = 10, 30, 29


def _sink_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-3 units of 20 images per class: class c mostly puts the sink first and its own unit 2c
    second; a few images see their own unit first; the third choice is random."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), 20)
    own_first = rng.random(labels.size) < 0.2
    first = np.where(own_first, 2 * labels, SINK)
    second = np.where(own_first, SINK, 2 * labels)
    third = rng.integers(0, SINK, labels.size)
    third = np.where((third == first) | (third == second), (third + 1) % SINK, third)
    return labels, np.stack([first, second, third], 1)


def test_one_to_one_keeps_every_class_unit_past_a_sink():
    labels, topk = _sink_case()
    plain = rank_units_by_votes(votes_from_topk(topk, UNITS, 1), 0, votes_from_topk(topk, UNITS, 3))
    ranking = one_to_one_ranking([(labels, topk)], UNITS, plain)
    own = {2 * c for c in range(CLASSES)}
    kept = set(kept_units_from_ranking(ranking, 0.6).tolist())  # 12 of 30 units
    assert own <= kept and SINK in kept
    assert sorted(ranking.tolist()) == list(range(UNITS))


def test_greedy_claims_the_largest_count_first_and_one_unit_per_class_per_round():
    counts = np.array([[8.0, 2, 0, 0, 0],   # class 0: unit 0, then unit 1
                       [6.0, 0, 0, 4, 0],   # class 1 wants unit 0 too: gets unit 3 this round
                       [0.0, 0, 5, 0, 0]])
    assert rank_units_one_to_one(counts, None, np.arange(5)).tolist() == [0, 2, 3, 1, 4]


def test_runner_up_counts_decide_where_top1_counts_are_zero():
    first = np.array([[5.0, 0, 0, 0]])
    topk = np.array([[5.0, 0, 1, 3]])
    assert rank_units_one_to_one(first, topk, np.arange(4)).tolist() == [0, 3, 2, 1]


def test_ties_and_unclaimed_units_follow_the_fallback_ranking():
    counts = np.array([[1.0, 1, 0, 0]])
    assert rank_units_one_to_one(counts, None, np.array([3, 1, 2, 0])).tolist() == [1, 0, 3, 2]


def test_without_a_sink_one_to_one_keeps_what_votes_keep():
    labels = np.repeat(np.arange(4), 5)
    topk = np.stack([2 * labels, 2 * labels + 1], 1)
    votes, runner_up = votes_from_topk(topk, 10, 1), votes_from_topk(topk, 10, 2)
    plain = rank_units_by_votes(votes, 0, runner_up)
    kept = kept_units_from_ranking(one_to_one_ranking([(labels, topk)], 10, plain), 0.6)
    assert kept.tolist() == kept_units_for_ratio(votes, 0.6, 0, runner_up).tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize("fallback", [np.arange(4), np.array([0, 1, 2, 2, 3])])
def test_malformed_input_is_refused(fallback):
    with pytest.raises(UserError):
        rank_units_one_to_one(np.ones((2, 5)), None, fallback)
