"""Transfer on the demo data: pretraining on the source domains a task draws from must help that task.

The check the whole method rests on - if a backbone pretrained on the task's relevant source classes
did not probe better than an untrained one, no keep-set could be told from another on this data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dp4tl_ray.config import from_dict
from dp4tl_ray.data.imagefolder import scan_image_folder
from dp4tl_ray.data.synthetic import SynthConfig, generate
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta, keep_ids_for_units
from dp4tl_ray.train.evaluate import EvalConfig, evaluate
from dp4tl_ray.train.trainer import PretrainConfig, pretrain

pytestmark = pytest.mark.ray

DEMO = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"


def test_lp_of_relevant_domain_backbone_beats_random_init(ray_local, tmp_path):
    """The demo sweep's data and recipes (Ray Train local mode, to keep the suite quick)."""
    plan = yaml.safe_load(DEMO.read_text())
    synth = generate(from_dict(SynthConfig, {**plan["synth"], "root": str(tmp_path / "data")}, "synth"))
    task = synth.task_dirs[0]
    relevant = json.loads((task / "ground_truth.json").read_text())["relevant_class_indices"]
    index = scan_image_folder(synth.source_dir)
    assert 0 < len(relevant) < len(index.classes)
    ids = keep_ids_for_units(index.labels, np.arange(len(index)), np.asarray(relevant))
    meta = KeepSetMeta(method="ground-truth", ratio=1 - len(relevant) / len(index.classes), units_kept=len(relevant),
                       units_total=len(index.classes), votes_per_unit=[0.0] * len(index.classes), images_kept=len(ids),
                       images_total=len(index), surrogate="none", source_fingerprint=index.fingerprint,
                       downstream=[task.name], seed=0)
    KeepSet(ids, meta).write(tmp_path / "relevant")

    run = pretrain(from_dict(PretrainConfig, {**plan["pretrain"], "source": str(synth.source_dir), "out": str(tmp_path / "runs"),
                                              "name": "relevant", "keepset": str(tmp_path / "relevant"), "num_workers": 0},
                             "pretrain"))
    assert run.kept_classes == sorted(relevant) and run.history[-1]["loss"] < run.history[0]["loss"]

    def lp(checkpoint: str | None, name: str) -> dict:
        return evaluate(from_dict(EvalConfig, {**plan["evaluate"], "task_dir": str(task), "checkpoint": checkpoint,
                                               "mode": "lp", "num_workers": 0, "out": str(tmp_path / f"{name}.json")},
                                  "evaluate"))

    pretrained, untrained = lp(run.model_path, "pretrained"), lp(None, "random-init")
    assert pretrained["num_test"] == untrained["num_test"] > 0
    # Measured on this data: ~0.6-0.7 vs ~0.3-0.4; a margin well above the test set's noise (100 images).
    assert pretrained["test_acc"] >= untrained["test_acc"] + 0.15, (pretrained["test_acc"], untrained["test_acc"])
