"""Baselines: matched image budgets, random / Moderate-DS / top-score selection (the scores: test_scores.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dp4tl_ray.errors import UserError
from dp4tl_ray.select.baselines import image_budget, moderate, random_by_class, random_by_image, top_scores
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta


def _keepset(ids: np.ndarray) -> KeepSet:
    meta = KeepSetMeta(method="lm", ratio=0.5, units_kept=1, units_total=2, votes_per_unit=[1.0, 0.0],
                       images_kept=len(ids), images_total=1000, surrogate="resnet18", source_fingerprint="x",
                       downstream=["task"], seed=0)
    return KeepSet(ids=ids, meta=meta)


def test_budget_is_a_fraction_of_images_or_the_compared_keepsets_size():
    assert image_budget(10, keep_fraction=0.7) == 7
    assert image_budget(10, keep_fraction=1.0) == 10
    assert image_budget(1000, match_keepset=_keepset(np.arange(0, 1000, 3))) == 334


@pytest.mark.parametrize("kwargs, match", [
    ({"keep_fraction": 0.0}, r"\(0, 1\]"),
    ({"keep_fraction": 1.5}, r"\(0, 1\]"),
    ({"keep_fraction": float("nan")}, r"\(0, 1\]"),
    ({"keep_fraction": 0.05}, r"\[1, 10\]"),  # floor(0.5) = 0 images
    ({}, "exactly one"),
    ({"keep_fraction": 0.5, "match_keepset": _keepset(np.arange(3))}, "exactly one"),
    ({"match_keepset": _keepset(np.arange(11))}, r"\[1, 10\]"),
])
def test_bad_budgets_are_one_line_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        image_budget(10, **kwargs)
    assert "\n" not in str(e.value)


def test_selectors_refuse_a_budget_of_zero_or_above_the_images_available():
    ids = np.arange(5)
    for budget in (0, 6):
        with pytest.raises(UserError, match=r"\[1, 5\]"):
            random_by_image(ids, budget, seed=0)
        with pytest.raises(UserError, match=r"\[1, 5\]"):
            top_scores(np.ones(5), ids, budget)
    with pytest.raises(UserError, match="unique"):
        random_by_image(np.array([1, 1, 2]), 1, seed=0)


def test_random_by_image_keeps_the_budget_and_the_same_seed_gives_the_same_ids():
    ids = np.random.default_rng(1).permutation(np.arange(100, 1100))
    kept = random_by_image(ids, 250, seed=7)
    assert kept.shape == (250,) and (np.diff(kept) > 0).all() and np.isin(kept, ids).all()
    assert np.array_equal(kept, random_by_image(ids[::-1], 250, seed=7))  # input order does not matter
    assert not np.array_equal(kept, random_by_image(ids, 250, seed=8))


def test_random_by_class_drops_whole_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=500)
    ids = rng.permutation(500).astype(np.int64)
    kept = random_by_class(labels, ids, ratio=0.3, seed=3)
    kept_classes = np.unique(labels[np.isin(ids, kept)])
    assert kept_classes.shape == (7,)  # floor(0.3 * 10) = 3 classes dropped
    assert np.array_equal(kept, np.sort(ids[np.isin(labels, kept_classes)]))  # every image of a kept class
    assert np.array_equal(kept, random_by_class(labels, ids, ratio=0.3, seed=3))
    assert np.array_equal(random_by_class(labels, ids, ratio=0.0, seed=3), np.arange(500))


def test_moderate_keeps_images_nearest_their_class_median_distance():
    # Class 0 on the x axis: distances to its centre (0, 0) are 2 1 0 1 2, median 1, scores 1 0 1 0 1.
    # Class 1 far away: distances 3.25 1.25 0.75 3.75 to its centre, median 2.25, scores 1 1 1.5 1.5.
    feats = np.array([[-2, 0], [-1, 0], [0, 0], [1, 0], [2, 0],
                      [10, 7], [10, 9], [10, 11], [10, 14]], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    ids = np.array([10, 11, 12, 13, 14, 20, 21, 22, 23])
    assert moderate(feats, labels, ids, budget=2).tolist() == [11, 13]
    # Five images tie at score 1: the smaller ids win.
    assert moderate(feats, labels, ids, budget=4).tolist() == [10, 11, 12, 13]
    assert moderate(feats, labels, ids, budget=7).tolist() == [10, 11, 12, 13, 14, 20, 21]
    perm = np.random.default_rng(0).permutation(9)
    assert moderate(feats[perm], labels[perm], ids[perm], budget=7).tolist() == [10, 11, 12, 13, 14, 20, 21]


def test_top_scores_keeps_the_highest_scores_ties_by_smaller_id():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.3])
    ids = np.array([5, 4, 3, 2, 1])
    assert top_scores(scores, ids, 1).tolist() == [2]
    assert top_scores(scores, ids, 3).tolist() == [2, 3, 4]
    with pytest.raises(UserError, match="finite"):
        top_scores(np.array([np.nan, 1.0]), np.array([0, 1]), 1)
