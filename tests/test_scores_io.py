"""The scores file (``select/scores_io.py``): one path rule, its record in the parquet metadata, and
selection from a given scores file without torch (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dp4tl_ray
from dp4tl_ray import atomic
from dp4tl_ray.featurestore import MANIFEST, feature_table
from dp4tl_ray.select.keepset import KeepSet
from dp4tl_ray.select.scores_io import DECLARED_FILE, META_KEY, SCORES_FILE, load_scores, scores_file, write_scores


def _table(n: int = 6) -> pa.Table:
    return pa.table({"id": pa.array(np.arange(n), pa.int64()), "el2n": pa.array(np.arange(n) / n, pa.float32())})


def test_a_path_names_the_file_itself_or_the_scores_file_in_its_directory(tmp_path):
    assert scores_file(tmp_path / "mine.parquet") == tmp_path / "mine.parquet"
    assert scores_file(tmp_path / "scores-el2n-abc") == tmp_path / "scores-el2n-abc" / SCORES_FILE
    assert scores_file(str(tmp_path)) == tmp_path / SCORES_FILE


def test_the_record_lives_in_the_parquet_file_alone(tmp_path):
    """One copy of the record: in the file's schema metadata (it travels with a copied file), no scores.json."""
    meta = {"scores_seconds": 12.5, "settings": {"score": "el2n", "seeds": [0, 1]}}
    written = write_scores(tmp_path, _table(), meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SCORES_FILE]
    assert json.loads(pq.read_schema(tmp_path / SCORES_FILE).metadata[META_KEY]) == meta
    copy = tmp_path / "elsewhere" / "copied.parquet"
    copy.parent.mkdir()
    copy.write_bytes((tmp_path / SCORES_FILE).read_bytes())
    for path in (tmp_path, tmp_path / SCORES_FILE, copy):
        read = load_scores(path, "el2n")
        assert read.table.equals(written.table.replace_schema_metadata(None))
        assert read.meta == {**meta, "path": str(scores_file(path))}


def test_a_file_written_elsewhere_takes_its_declared_record_from_scores_json_beside_it(tmp_path):
    pq.write_table(_table(), tmp_path / SCORES_FILE)
    assert load_scores(tmp_path, "el2n").meta == {"path": str(tmp_path / SCORES_FILE)}
    (tmp_path / DECLARED_FILE).write_text(json.dumps({"scores_seconds": 99.0}))
    assert load_scores(tmp_path, "el2n").meta["scores_seconds"] == 99.0
    write_scores(tmp_path, _table(), {"scores_seconds": 1.0})  # a file with its own record: that one counts
    assert load_scores(tmp_path, "el2n").meta["scores_seconds"] == 1.0


def _source_store(out: Path, n: int) -> Path:
    """A FeatureStore of ``n`` rows in 3 classes, as `dp4tl extract` writes one (no images needed here)."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, 4)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    topk = np.zeros((n, 1), np.int32)
    out.mkdir(parents=True)
    pq.write_table(feature_table(np.arange(n), np.arange(n) % 3, feats, topk, topk.astype(np.float32)), out / "part-0.parquet")
    atomic.write_json(out / MANIFEST, {"source": str(out / "images"), "source_format": "folder", "source_fingerprint": "f",
                                       "classes": ["a", "b", "c"], "dim": 4, "topk": 1, "num_rows": n,
                                       "surrogate": {"name": "resnet18", "arch": "resnet18", "checkpoint": None}})
    return out


def test_selecting_from_a_given_scores_file_does_not_import_torch(tmp_path):
    """EL2N/GraNd from a given scores file is numpy and pyarrow only: the driver (P6 measures its RSS)
    does not load torch. A fresh interpreter imports the pipeline and selects; torch stays out."""
    n = 12
    store = _source_store(tmp_path / "f-src", n)
    score = np.zeros(n, np.float32)
    score[[2, 5, 7]] = 1.0  # the three highest
    write_scores(tmp_path / "scores", pa.table({"id": np.arange(n), "el2n": score}), {"scores_seconds": 7.0})
    code = ("import sys\n"
            "from dp4tl_ray.select.pipeline import SelectConfig, select_keepset\n"
            f"select_keepset(SelectConfig(method='el2n', ratio=0.75, source_features={str(store)!r}, "
            f"scores={str(tmp_path / 'scores')!r}, out={str(tmp_path / 'ks')!r}))\n"
            "sys.exit(sorted(m for m in ('torch', 'torchvision') if m in sys.modules) or None)")
    root = str(Path(dp4tl_ray.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ks = KeepSet.load(tmp_path / "ks")
    assert ks.ids.tolist() == [2, 5, 7]
    assert ks.meta.extra["costs"]["scores_s"] == pytest.approx(7.0)
