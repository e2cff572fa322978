"""95% intervals of accuracy cells: Wilson for one seed's test proportion, Student t over seeds."""

from __future__ import annotations

import math

import pytest

from dp4tl_ray.intervals import Z95, t_interval, t_quantile_975, wilson_interval


def test_wilson_matches_the_textbook_values():
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # never a zero-width interval at 0
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0.8, 500) == pytest.approx((0.7627, 0.8327), abs=1e-4)


def test_wilson_holds_the_proportion_and_narrows_like_one_over_root_n():
    widths = []
    for n in (100, 400, 1600):
        lo, hi = wilson_interval(0.6, n)
        assert 0 <= lo < 0.6 < hi <= 1
        widths.append(hi - lo)
    assert widths[0] / widths[1] == pytest.approx(2, rel=0.02) and widths[1] / widths[2] == pytest.approx(2, rel=0.01)
    assert widths[2] == pytest.approx(2 * Z95 * math.sqrt(0.6 * 0.4 / 1600), rel=0.01)  # the normal limit


@pytest.mark.parametrize("p, n", [(0.5, 0), (-0.1, 10), (1.2, 10)])
def test_wilson_refuses_what_is_no_proportion(p, n):
    with pytest.raises(ValueError):
        wilson_interval(p, n)


def test_t_quantiles_and_interval_over_seeds():
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile_975(500) == pytest.approx(1.96, abs=1e-3)
    lo, hi = t_interval([50.0, 52.0, 54.0])  # mean 52, sd 2, n 3
    half = 4.3027 * 2 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((52 - half, 52 + half), abs=1e-3)
    with pytest.raises(ValueError):
        t_interval([50.0])
    with pytest.raises(ValueError):
        t_quantile_975(0)
