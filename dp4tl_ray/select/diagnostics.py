"""Diagnostics of a downstream -> unit mapping: does it look like it can be trusted?

On shifted downstream images (low-resolution scans of objects the source holds as sharp photos,
inverted or tinted images) the surrogate can send most votes to one "sink" unit; pruning then
drops the truly relevant units and nothing else says so. From each downstream image's top-k units
and its downstream class this module computes a few figures and warns when they look wrong.

Thresholds (general, not tuned to a dataset; ``C`` = downstream classes with images):

- **sink unit**: the top unit takes more than ``SINK_MIN_SHARE`` (1/3) of all votes *and* more than
  ``SINK_CLASS_FACTOR`` (2) times the share of the largest downstream class - at least two classes'
  worth of votes land on one unit, which one-unit-per-class mappings never produce.
- **shared majority**: at least ``max(SHARED_MIN_CLASSES, SHARED_MIN_FRACTION * C)`` (3 and 20%)
  downstream classes send their majority to the same unit. Two classes sharing a unit is normal
  (two dog breeds, one source "dog"); three or more, or a fifth of the task, is suspect.

A warning is a reason to look, not proof of failure: several fine-grained downstream classes can
legitimately share one coarse source class (the generated test task does: 4 of its 8 new classes
mostly vote for one source class of their domain). Check that the named unit is relevant.

When it is not, the remedy measured on real shifted images (``benchmarks/real_shift.py``, README) is a
surrogate trained with ``--augment shift`` and the ``--vote-rule one-to-one`` ranking: :data:`REMEDY`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dp4tl_ray.select.voting import class_unit_votes

REMEDY = "a surrogate trained with --augment shift, and --vote-rule one-to-one"
SINK_MIN_SHARE = 1 / 3
SINK_CLASS_FACTOR = 2.0
SHARED_MIN_CLASSES = 3
SHARED_MIN_FRACTION = 0.2


@dataclass(frozen=True)
class ClassAgreement:
    """One downstream class: its images, the unit most of its votes go to, and that unit's share."""

    label: int
    images: int
    modal_unit: int
    agreement: float


@dataclass(frozen=True)
class MappingDiagnostics:
    """How concentrated and how consistent a task's votes are, and the warnings they raise."""

    images: int
    classes: int
    num_units: int
    top_unit: int
    top_unit_share: float
    vote_entropy: float  # normalised: H(votes) / log(min(num_units, images)), 1 = as spread as possible
    effective_units: float  # exp(H(votes)): how many equally voted units the votes are worth
    mean_class_agreement: float
    per_class: list[ClassAgreement]
    shared_majority_unit: int
    shared_majority_classes: list[int]  # the largest group of classes whose modal unit is the same
    warnings: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flagged": self.flagged}


def mapping_diagnostics(unit_idx: np.ndarray, labels: np.ndarray, num_units: int, k: int = 1,
                        unit_names: list[str] | None = None) -> MappingDiagnostics:
    """Diagnostics of the votes of downstream images (``unit_idx``: top-1 ``[n]`` or top-k ``[n, >=k]``);
    ``unit_names`` only make the warnings readable."""
    per_class = class_unit_votes(unit_idx, labels, num_units, k)
    images_per_class = per_class.sum(axis=1)
    present = np.flatnonzero(images_per_class > 0)
    votes = per_class.sum(axis=0)
    n = float(votes.sum())
    top_unit = int(votes.argmax())
    top_share = float(votes[top_unit] / n)
    p = votes[votes > 0] / n
    entropy = float(-(p * np.log(p)).sum())
    max_entropy = math.log(min(num_units, int(round(n)))) if min(num_units, n) > 1 else 1.0
    modal = per_class[present].argmax(axis=1)
    agreements = per_class[present, modal] / images_per_class[present]
    classes = [ClassAgreement(int(c), int(round(images_per_class[c])), int(u), float(a))
               for c, u, a in zip(present, modal, agreements)]
    group_sizes = np.bincount(modal, minlength=num_units)
    shared_unit = int(group_sizes.argmax())
    shared = [int(c) for c, u in zip(present, modal) if u == shared_unit]
    largest_class_share = float(images_per_class.max() / n)
    name = (lambda u: f"{u} ({unit_names[u]})") if unit_names else str
    warnings = _warnings(name(top_unit), top_share, largest_class_share, name(shared_unit), len(shared), len(present))
    return MappingDiagnostics(images=int(round(n)), classes=len(present), num_units=num_units, top_unit=top_unit,
                              top_unit_share=top_share, vote_entropy=entropy / max_entropy if max_entropy else 0.0,
                              effective_units=math.exp(entropy), mean_class_agreement=float(agreements.mean()),
                              per_class=classes, shared_majority_unit=shared_unit, shared_majority_classes=shared,
                              warnings=warnings)


def thresholds_text() -> str:
    """The documented thresholds in a sentence, for readers of a report (see the module docstring)."""
    return (f"A mapping is flagged when the top unit takes more than {SINK_MIN_SHARE:.0%} of all votes and more than "
            f"{SINK_CLASS_FACTOR:g}x the share of the largest downstream class (sink unit), or when at least "
            f"max({SHARED_MIN_CLASSES}, {SHARED_MIN_FRACTION:.0%} of the classes) downstream classes send most of their "
            "votes to the same unit (shared majority). A warning is a reason to look, not proof of failure: several "
            f"fine-grained classes may rightly share one coarse source unit; check that the named unit is relevant (if it is not: {REMEDY}).")


def _warnings(top_unit: str, top_share: float, largest_class_share: float, shared_unit: str, shared: int,
              num_classes: int) -> list[str]:
    """The documented threshold checks (see the module docstring)."""
    out = []
    if top_share > SINK_MIN_SHARE and top_share > SINK_CLASS_FACTOR * largest_class_share:
        out.append(f"sink unit: unit {top_unit} takes {top_share:.0%} of all votes (largest downstream class "
                   f"{largest_class_share:.0%}); if it is not relevant to the task, the surrogate does not recognise the "
                   f"downstream images (e.g. shifted in resolution or colour): {REMEDY}")
    if shared >= max(SHARED_MIN_CLASSES, SHARED_MIN_FRACTION * num_classes):
        out.append(f"shared majority: {shared} of {num_classes} downstream classes send most votes to unit "
                   f"{shared_unit}; units relevant to them rank on few votes and may be dropped (if that unit is not relevant: {REMEDY})")
    return out
