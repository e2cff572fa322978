"""Selection maths: votes, tie-breaking, ratio -> units dropped, summaries (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dp4tl_ray.errors import UserError
from dp4tl_ray.select.voting import (
    combine_task_votes,
    images_kept_per_units_dropped,
    kept_units_for_ratio,
    rank_units_by_votes,
    summarize_selection,
    units_to_drop,
    votes_from_topk,
)


def test_all_votes_on_one_unit_rank_it_first():
    votes = votes_from_topk(np.full((50, 1), 3), num_units=5)
    assert votes.tolist() == [0, 0, 0, 50, 0]
    assert rank_units_by_votes(votes, seed=0)[0] == 3
    assert kept_units_for_ratio(votes, 0.8, seed=0).tolist() == [3]


def test_ties_broken_deterministically_per_seed():
    votes = np.ones(20)
    first = rank_units_by_votes(votes, seed=1)
    assert np.array_equal(first, rank_units_by_votes(votes, seed=1))
    other = rank_units_by_votes(votes, seed=2)
    assert np.array_equal(other, rank_units_by_votes(votes, seed=2))
    assert not np.array_equal(first, other)
    assert sorted(first.tolist()) == list(range(20))


def test_ties_only_reorder_equal_votes():
    votes = np.array([5.0, 1.0, 5.0, 0.0, 1.0])
    for seed in range(5):
        ranking = rank_units_by_votes(votes, seed)
        assert set(ranking[:2]) == {0, 2} and set(ranking[2:4]) == {1, 4} and ranking[4] == 3


def test_ratio_zero_keeps_all_units():
    assert kept_units_for_ratio(np.arange(1.0, 11.0), 0.0, seed=0).tolist() == list(range(10))


def test_ratio_099_of_100_units_keeps_one():
    votes = np.arange(100, dtype=float) + 1
    assert kept_units_for_ratio(votes, 0.99, seed=0).tolist() == [99]


def test_ratio_03_of_10_units_drops_three_despite_float_error():
    assert units_to_drop(10, 0.3) == 3
    assert 0.29 * 100 < 29  # the float error the rounding must absorb
    assert units_to_drop(100, 0.29) == 29
    assert units_to_drop(1000, 0.7) == 700
    assert units_to_drop(7, 0.5) == 3


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, math.nan])
def test_ratio_outside_unit_interval_is_refused_in_one_line(ratio):
    with pytest.raises(UserError, match=r"ratio must be in \[0, 1\)") as err:
        units_to_drop(10, ratio)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("topk", [np.zeros((0, 1), dtype=int), np.array([], dtype=int)])
def test_empty_downstream_is_refused(topk):
    with pytest.raises(UserError, match="downstream set has no images"):
        votes_from_topk(topk, num_units=4)


def test_no_votes_at_all_is_refused():
    with pytest.raises(UserError, match="downstream set has no images"):
        kept_units_for_ratio(np.zeros(4), 0.5, seed=0)


@pytest.mark.parametrize("votes", [np.array([1.0, -1.0, 2.0]), np.ones((2, 2)), np.array([])])
def test_malformed_votes_are_refused(votes):
    with pytest.raises(UserError, match="votes"):
        rank_units_by_votes(votes, seed=0)


def test_out_of_range_unit_index_is_refused():
    with pytest.raises(UserError, match=r"\[0, 4\)"):
        votes_from_topk(np.array([[0], [4]]), num_units=4)


def test_zero_vote_units_are_dropped_first():
    votes = np.array([3.0, 0.0, 1.0, 0.0, 2.0, 0.0])
    for seed in range(5):
        assert kept_units_for_ratio(votes, 0.5, seed).tolist() == [0, 2, 4]
    kept = kept_units_for_ratio(votes, 0.34, seed=0)  # drops 2 of the 3 zero-vote units
    assert len(kept) == 4 and {0, 2, 4} <= set(kept.tolist())


def test_soft_topk_votes_sum_to_number_of_images():
    rng = np.random.default_rng(0)
    topk = np.stack([rng.permutation(10)[:5] for _ in range(37)])
    for k in (1, 3, 5):
        votes = votes_from_topk(topk, num_units=10, k=k)
        assert votes.sum() == pytest.approx(37)
    assert votes_from_topk(np.array([[2, 1, 0]]), num_units=3, k=2).tolist() == [0, 0.5, 0.5]


def test_multi_task_votes_weigh_each_task_equally():
    big = votes_from_topk(np.zeros(1000, dtype=int), num_units=2)  # 1000 images, all unit 0
    small = votes_from_topk(np.ones(10, dtype=int), num_units=2)  # 10 images, all unit 1
    combined = combine_task_votes({"big": big, "small": small})
    assert combined.tolist() == [1.0, 1.0]


def test_multi_task_votes_of_different_unit_counts_are_refused():
    with pytest.raises(UserError, match="same units"):
        combine_task_votes({"a": np.ones(3), "b": np.ones(4)})


def test_summary_counts_images_of_unequal_units():
    votes = np.array([4.0, 0.0, 1.0, 2.0])
    sizes = np.array([100, 10, 50, 40])
    kept = kept_units_for_ratio(votes, 0.5, seed=0)
    summary = summarize_selection(votes, kept, sizes)
    assert kept.tolist() == [0, 3]
    assert (summary.units_kept, summary.units_total) == (2, 4)
    assert (summary.images_kept, summary.images_total) == (140, 200)
    assert summary.fraction_images_removed == pytest.approx(0.3)
    assert summary.votes_per_unit == [4.0, 0.0, 1.0, 2.0]


def test_runner_up_votes_break_ties_before_the_seeded_key():
    from dp4tl_ray.select.voting import kept_units_for_ratio

    votes = np.array([5.0, 0.0, 0.0, 0.0])
    runner_up = np.array([5.0, 0.0, 2.0, 1.0])  # unit 2 was often a second choice, unit 3 once
    for seed in range(5):
        assert kept_units_for_ratio(votes, 0.5, seed, runner_up).tolist() == [0, 2]
    with pytest.raises(UserError, match="one entry per unit"):
        kept_units_for_ratio(votes, 0.5, 0, np.ones(3))


def test_least_voted_keeps_the_other_end_of_the_ranking():
    votes = np.array([9.0, 0.0, 4.0, 1.0, 0.0, 7.0])
    assert kept_units_for_ratio(votes, 0.5, seed=0).tolist() == [0, 2, 5]
    for seed in range(5):  # as many units, the least voted: both zero-vote units and the single vote
        assert kept_units_for_ratio(votes, 0.5, seed, least_voted=True).tolist() == [1, 3, 4]
    # ties at the cut are still broken by the seed, never by index
    kept = {tuple(kept_units_for_ratio(np.array([3.0, 0.0, 0.0, 0.0]), 0.5, s, least_voted=True)) for s in range(20)}
    assert len(kept) > 1 and all(0 not in k for k in kept)


def test_images_kept_curve_matches_the_selection_at_every_ratio():
    rng = np.random.default_rng(7)
    votes = rng.poisson(2.0, size=13).astype(np.float64)  # zeros and ties included
    runner_up = rng.random(13)
    sizes = rng.integers(1, 50, size=13)
    ranking = rank_units_by_votes(votes, seed=3, runner_up_votes=runner_up)
    curve = images_kept_per_units_dropped(ranking, sizes)
    assert curve.shape == (13,) and curve[0] == sizes.sum() and (np.diff(curve) <= 0).all()
    for ratio in np.linspace(0, 0.99, 37):
        kept = kept_units_for_ratio(votes, float(ratio), seed=3, runner_up_votes=runner_up)
        assert curve[units_to_drop(13, float(ratio))] == summarize_selection(votes, kept, sizes).images_kept
