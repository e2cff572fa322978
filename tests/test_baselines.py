"""Baselines: matched image budgets, random / Moderate-DS / top-score selection (the scores: test_scores.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dp4tl_ray.errors import UserError
from dp4tl_ray.select.baselines import (
    class_quotas,
    distances_to_class_median,
    image_budget,
    moderate,
    random_by_class,
    random_by_image,
    top_scores,
)
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


def test_moderate_scores_distance_to_the_class_median_and_keeps_the_middle_band():
    # Class 0 on the x axis: median (0, 0) - the mean would be (1.6, 0) - so distances are 2 1 0 1 10.
    # Class 1: median (10, 10), distances 3 1 1 4 (ids 21 and 22 tie: the smaller id ranks first).
    feats = np.array([[-2, 0], [-1, 0], [0, 0], [1, 0], [10, 0],
                      [10, 7], [10, 9], [10, 11], [10, 14]], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    ids = np.array([10, 11, 12, 13, 14, 20, 21, 22, 23])
    assert np.allclose(distances_to_class_median(feats, labels), [2, 1, 0, 1, 10, 3, 1, 1, 4])
    # budget 4 of 9: quotas 2.2 -> 2 and 1.8 -> 2; class 0 drops its closest (12) and farthest (14, 10),
    # class 1 drops its closest (21) and farthest (23)
    assert moderate(feats, labels, ids, budget=4).tolist() == [11, 13, 20, 22]
    assert moderate(feats, labels, ids, budget=9).tolist() == ids.tolist()
    perm = np.random.default_rng(0).permutation(9)
    assert moderate(feats[perm], labels[perm], ids[perm], budget=4).tolist() == [11, 13, 20, 22]
    # Xia et al.'s global band over all nine sorted distances 0 1 1 1 1 2 3 4 10 (ids 12 11 13 21 22 10 20 23 14):
    # the two closest and the three farthest dropped
    assert moderate(feats, labels, ids, budget=4, band="global").tolist() == [10, 13, 21, 22]
    with pytest.raises(UserError, match="band must be one of per-class, global"):
        moderate(feats, labels, ids, budget=4, band="classwise")


def test_moderate_keeps_the_same_fraction_of_a_tight_and_a_spread_class():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 0.1, (1000, 8)), rng.normal(5, 3.0, (1000, 8))]).astype(np.float32)
    labels, ids = np.repeat([0, 1], 1000), np.arange(2000)
    kept = moderate(feats, labels, ids, budget=600)
    assert np.bincount(labels[kept], minlength=2).tolist() == [300, 300]
    # the band drops both extremes of each class: 350 closest and 350 farthest
    dist = distances_to_class_median(feats, labels)
    for c in (0, 1):
        rows = np.flatnonzero(labels == c)
        order = rows[np.argsort(dist[rows], kind="stable")]
        assert sorted(kept[labels[kept] == c].tolist()) == sorted(order[350:650].tolist())
    # the global band: the middle 600 of all 2000 sorted distances
    glob = moderate(feats, labels, ids, budget=600, band="global")
    assert np.array_equal(glob, np.sort(np.argsort(dist, kind="stable")[700:1300]))


def test_class_quotas_share_the_budget_by_class_size_and_add_up():
    assert class_quotas(np.array([1000, 1000]), 600).tolist() == [300, 300]
    # 10 * 7/30 = 2.33, 20 * 7/30 = 4.67: floors 2 + 4, the larger remainder gets the last one
    assert class_quotas(np.array([10, 20]), 7).tolist() == [2, 5]
    # equal remainders go to the smaller class index; a quota never exceeds its class
    assert class_quotas(np.array([3, 3, 3]), 4).tolist() == [2, 1, 1]
    counts = np.random.default_rng(1).integers(1, 50, 200)
    for budget in (1, 17, int(counts.sum()) // 3, int(counts.sum())):
        q = class_quotas(counts, budget)
        assert q.sum() == budget and (q <= counts).all() and (np.abs(q - counts * budget / counts.sum()) < 1).all()


def test_top_scores_keeps_the_highest_scores_ties_by_smaller_id():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.3])
    ids = np.array([5, 4, 3, 2, 1])
    assert top_scores(scores, ids, 1).tolist() == [2]
    assert top_scores(scores, ids, 3).tolist() == [2, 3, 4]
    with pytest.raises(UserError, match="finite"):
        top_scores(np.array([np.nan, 1.0]), np.array([0, 1]), 1)
