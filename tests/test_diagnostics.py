"""Mapping diagnostics: a planted sink unit is flagged, a healthy one-unit-per-class mapping is not."""

from __future__ import annotations

import numpy as np
import pytest

from dp4tl_ray.errors import UserError
from dp4tl_ray.select.diagnostics import mapping_diagnostics
from dp4tl_ray.select.voting import class_unit_votes

CLASSES, PER_CLASS, UNITS = 10, 30, 40


def _votes(sink_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 units: class c votes 80% for unit 3c (its own), the rest scattered; the first
    ``sink_classes`` classes instead send 70% of their votes to unit 39 (the sink)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    units = np.where(rng.random(labels.size) < 0.8, 3 * labels, rng.integers(0, UNITS, labels.size))
    sink = (labels < sink_classes) & (rng.random(labels.size) < 0.7)
    return np.where(sink, UNITS - 1, units), labels


def test_healthy_mapping_is_not_flagged():
    d = mapping_diagnostics(*_votes(sink_classes=0), UNITS)
    assert not d.flagged and d.warnings == []
    assert d.top_unit_share < 0.15 and d.mean_class_agreement > 0.7
    assert len(d.shared_majority_classes) == 1 and d.classes == CLASSES
    assert [c.modal_unit for c in d.per_class] == [3 * c for c in range(CLASSES)]


def test_planted_sink_unit_is_flagged():
    d = mapping_diagnostics(*_votes(sink_classes=7), UNITS, unit_names=[f"u{u}" for u in range(UNITS)])
    assert d.flagged and d.top_unit == UNITS - 1 and d.top_unit_share > 0.4
    assert sorted(d.shared_majority_classes) == list(range(7)) and d.shared_majority_unit == UNITS - 1
    assert any(w.startswith("sink unit: unit 39 (u39)") for w in d.warnings)
    assert any(w.startswith("shared majority: 7 of 10") for w in d.warnings)
    assert d.to_dict()["flagged"] is True and d.to_dict()["per_class"][0]["modal_unit"] == UNITS - 1


def test_three_classes_sharing_a_unit_warn_without_a_sink():
    d = mapping_diagnostics(*_votes(sink_classes=3), UNITS)
    assert [w.split(":")[0] for w in d.warnings] == ["shared majority"]


def test_two_of_many_classes_sharing_a_unit_is_normal():
    d = mapping_diagnostics(*_votes(sink_classes=2), UNITS)
    assert not d.flagged


def test_one_large_class_is_not_a_sink():
    """A unit that takes many votes because its class holds most images is not a sink."""
    labels = np.r_[np.zeros(200, int), np.repeat(np.arange(1, 5), 20)]
    d = mapping_diagnostics(3 * labels, labels, UNITS)
    assert d.top_unit_share > 0.7 and not d.flagged


def test_soft_votes_entropy_and_agreement():
    labels = np.array([0, 0, 1, 1])
    topk = np.array([[0, 1], [0, 1], [2, 3], [2, 3]])
    per_class = class_unit_votes(topk, labels, 4, k=2)
    assert per_class.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    d = mapping_diagnostics(topk, labels, 4, k=2)
    assert d.vote_entropy == pytest.approx(1.0) and d.effective_units == pytest.approx(4.0)
    assert d.mean_class_agreement == pytest.approx(0.5)


@pytest.mark.parametrize("units,labels", [(np.zeros(0, int), np.zeros(0, int)), (np.array([0, 5]), np.array([0, 1])),
                                          (np.array([0, 1]), np.array([0]))])
def test_bad_votes_are_refused_in_one_line(units, labels):
    with pytest.raises(UserError):
        mapping_diagnostics(units, labels, 4)


def test_a_mappings_warning_reaches_the_console_once_per_process(tmp_path, caplog):
    """A sweep selects a keep-set per ratio and seed from the same votes: the same warning 24 times was noise.
    Each call still returns its diagnostics (for its keep-set's manifest)."""
    import logging

    from dp4tl_ray.data.synthetic_features import ClusterSpec, write_task_store
    from dp4tl_ray.select import pipeline

    spec = ClusterSpec(classes=20, dim=8)
    task = write_task_store(tmp_path / "task", spec, task=0, rows=200, related=1, task_classes=5, top1_correct=1.0)
    names = [f"n{c:08d}" for c in range(spec.classes)]
    with caplog.at_level(logging.WARNING, logger=pipeline.log.name):
        first = pipeline._diagnostics({"t": task}, None, 1, names)
        second = pipeline._diagnostics({"t": task}, None, 1, names)
    assert first == second and first["t"]["warnings"]  # every task class sends its votes to one unit
    assert len(caplog.records) == len(first["t"]["warnings"])
