"""95% intervals for accuracy cells, pure maths.

One seed: the test top-1 is a proportion of ``n`` test images, and its Wilson score interval counts
the test set's sampling noise only (not the training run's). Several seeds: a Student t interval of
the mean over seeds, which counts both, since every seed retrains and re-probes.
"""

from __future__ import annotations

import math
import statistics

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30; beyond, the normal one is within 2%.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` trials (both ends in [0, 1])."""
    if n < 1:
        raise ValueError(f"a proportion needs n >= 1 trials, got {n}")
    if not 0 <= p <= 1:
        raise ValueError(f"a proportion lies in [0, 1], got {p}")
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom (table to 30, then the normal quantile)."""
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else Z95


def t_interval(values: list[float]) -> tuple[float, float]:
    """95% Student t interval of the mean of ``values`` (two or more)."""
    if len(values) < 2:
        raise ValueError("a t interval over seeds needs at least two values")
    mean = statistics.fmean(values)
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


__all__ = ["Z95", "t_interval", "t_quantile_975", "wilson_interval"]
