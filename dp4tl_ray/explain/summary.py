"""The explorer's PNG summary: votes per unit in ranked order with the cut, and images kept against ratio."""

from __future__ import annotations

import io

import numpy as np

from dp4tl_ray.explain.evidence import Evidence

KEPT_COLOUR, DROPPED_COLOUR = "#2b7bba", "#b8b8b8"


def summary_png(ev: Evidence) -> bytes:
    """Two panels drawn off-screen (Agg): the ranking the selection cut, and what every ratio would keep."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meta = ev.keepset.meta
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    votes_ax, curve_ax = fig.subplots(1, 2)

    ranked_votes = ev.votes[ev.ranking]
    rank = np.arange(1, ev.num_units + 1)
    colours = [KEPT_COLOUR] * ev.units_kept + [DROPPED_COLOUR] * (ev.num_units - ev.units_kept)
    votes_ax.bar(rank, ranked_votes, width=1.0 if ev.num_units > 60 else 0.8, color=colours)
    votes_ax.axvline(ev.units_kept + 0.5, color="#d62728", linestyle="--",
                     label=f"cut: {ev.units_kept} of {ev.num_units} units kept")
    votes_ax.set(xlabel="unit rank (most voted first)", ylabel="votes",
                 title=f"{meta.method.upper()} votes per unit, ranked")
    votes_ax.legend(loc="upper right")

    ratios, kept = ev.images_kept_curve()
    total = kept[0]
    curve_ax.step(ratios, kept / total, where="post", color=KEPT_COLOUR, label="this ranking")
    curve_ax.plot([0, 1], [1, 0], color="#888888", linestyle=":", label="equal-sized units")
    curve_ax.plot([meta.ratio], [meta.images_kept / meta.images_total], "o", color="#d62728",
                  label=f"this keep-set: ratio {meta.ratio:g}, {meta.images_kept} images")
    curve_ax.set(xlabel="ratio (fraction of units removed)", ylabel=f"fraction of the {total} images kept",
                 xlim=(0, 1), ylim=(0, 1.02), title="images kept as the ratio grows")
    curve_ax.legend(loc="upper right")

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
