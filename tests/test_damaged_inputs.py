"""Damaged artifacts (truncated, garbled, empty, wrong schema) are one-line errors naming the file and the fix.

One table-driven test per reader: each damages one file of a real artifact, expects a single-line
``UserError`` naming that file, and checks that nothing on disk was deleted or changed by the read.
No Ray, except where the reader is a Ray actor (FeatureStore shards read by k-means and class-statistics
actors): those go through the CLI on the session's local Ray.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dp4tl_ray.cli import run
from dp4tl_ray.config import load_yaml
from dp4tl_ray.data.imagefolder import read_class_index, scan_image_folder, write_class_index
from dp4tl_ray.data.parquet import open_shards, shard_image_folder
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import MANIFEST, FeatureStore, feature_table, read_rows, write_shard
from dp4tl_ray.kmeans.distributed import _reusable, _write_result, load_assignments, load_centroids
from dp4tl_ray.models import load_checkpoint
from dp4tl_ray.parts import PartStaging
from dp4tl_ray.select.keepset import IDS_FILE, META_FILE, KeepSet, KeepSetMeta
from dp4tl_ray.select.scores_io import load_scores
from dp4tl_ray.train.checkpoints import TrainState

DAMAGES = ("truncated", "garbled", "empty", "wrong_schema")
OTHER_TABLE = pa.table({"x": pa.array([1, 2, 3], pa.int64())})  # a valid parquet file of another artifact


def damage(path: Path, kind: str, wrong_schema: Callable[[Path], None]) -> None:
    """Damage ``path`` the way a killed copy, a bad disk, ``: > file`` or a mix-up of files would."""
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbled":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        wrong_schema(path)


def garble_inside(path: Path, column: str) -> None:
    """Overwrite 8 bytes in the middle of ``column``'s pages in the first row group, the file's size and
    footer kept (a bad sector or copy): opening the file cannot tell."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.split(".")[0] == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(path.read_bytes())
    middle = start + chunk.total_compressed_size // 2
    data[middle:middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def write_json_list(path: Path) -> None:
    path.write_text(json.dumps(["not", "a", "mapping"]))


def write_other_parquet(path: Path) -> None:
    pq.write_table(OTHER_TABLE, path)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(read: Callable[[], object], path: Path, fix: str, root: Path) -> str:
    """``read()`` raises one UserError line naming ``path`` and ``fix``, and leaves ``root`` as it was."""
    before = snapshot(root)
    with pytest.raises(UserError) as e:
        read()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and fix in msg, msg
    assert snapshot(root) == before  # nothing deleted or rewritten by a failed read
    return msg


# --- YAML configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_yaml_config_is_one_line(tmp_path, kind):
    path = tmp_path / "select.yaml"
    path.write_text("method: lm\nratio: [0.5, 0.7, 0.9]\nsource_features: /data/src\n")
    damage(path, kind, lambda p: p.write_text("- method: lm\n- ratio: 0.5\n"))
    msg = assert_refused(lambda: load_yaml(path), path, "jobs/configs", tmp_path)
    if kind == "truncated":
        assert "line 2" in msg  # the parser's position, so the user can find the mistake


# --- class index ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("wrong", [write_json_list, lambda p: p.write_text('{"cat": "0", "dog": "1"}')],
                         ids=["list", "string_labels"])
def test_damaged_class_index_is_one_line(tmp_path, kind, wrong):
    path = write_class_index(["cat", "dog", "emu"], tmp_path / "class_index.json")
    damage(path, kind, wrong)
    assert_refused(lambda: read_class_index(path), path, "dp4tl data index", tmp_path)


# --- parquet image shards -------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path) -> Path:
    """Image shards of a 3-class folder tree (the bytes need not decode: sharding copies them as they are)."""
    root = tmp_path / "train"
    for c in ("cat", "dog", "emu"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_bytes(f"{c}{i}".encode())
    out = tmp_path / "shards"
    shard_image_folder(scan_image_folder(root), out, rows_per_shard=4)
    return out


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name,wrong", [("part-00001.parquet", write_other_parquet),
                                        ("class_index.json", write_json_list), ("shards.json", write_json_list)])
def test_damaged_image_shards_are_one_line(shards, kind, name, wrong):
    damage(shards / name, kind, wrong)
    fix = "dp4tl data index" if name == "class_index.json" else "dp4tl data shard"
    assert_refused(lambda: open_shards(shards), shards / name, fix, shards)


# --- FeatureStore ---------------------------------------------------------------------------------


def write_store(path: Path, n: int = 12, d: int = 4, k: int = 2, files: int = 2, classes: int = 3) -> Path:
    """A FeatureStore written by hand in the store's schema (what `dp4tl extract` writes, minus the model)."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = np.arange(n) % classes
    topk = np.stack([labels, (labels + 1) % classes], axis=1)
    path.mkdir(parents=True)
    for i, rows in enumerate(np.array_split(np.arange(n), files)):
        write_shard(feature_table(rows, labels[rows], feats[rows], topk[rows], np.ones((len(rows), k))),
                    path / f"part-{i}.parquet")
    manifest = {"dim": d, "num_rows": n, "topk": k, "classes": [f"c{i}" for i in range(classes)],
                "surrogate": {"arch": "resnet18"}, "source_fingerprint": "f", "source": "/nowhere"}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name,wrong", [
    ("part-1.parquet", write_other_parquet),
    (MANIFEST, lambda p: p.write_text(json.dumps({"dim": 4, "num_rows": 12}))),  # topk missing
])
def test_damaged_featurestore_is_one_line(tmp_path, kind, name, wrong):
    store = write_store(tmp_path / "store")
    damage(store / name, kind, wrong)
    assert_refused(lambda: FeatureStore.open(store), store / name, "re-run `dp4tl extract`", tmp_path)


@pytest.mark.parametrize("column", ["id", "feature"])
@pytest.mark.parametrize("read", [
    lambda s: s.read(), lambda s: s.arrays(), lambda s: read_rows(s.files), lambda s: read_rows(s.files, (0, 2)),
], ids=["read", "arrays", "read_rows", "read_rows_of_classes"])
def test_featurestore_shard_damaged_inside_is_one_line(tmp_path, read, column):
    """Bytes damaged inside a data page, the footer intact: the page's CRC32 refuses what would otherwise
    read back as other ids or features without an error."""
    store = write_store(tmp_path / "store")
    garble_inside(store / "part-1.parquet", column)
    opened = FeatureStore.open(store)  # footers only: cannot tell
    assert_refused(lambda: read(opened), store / "part-1.parquet", f"delete {store} and re-run `dp4tl extract`", tmp_path)


@pytest.mark.parametrize("change,problem", [
    (lambda s: pq.write_table(pq.read_table(s / "part-1.parquet").drop_columns(["topk_logit"]), s / "part-1.parquet"),
     r"lacks column 'topk_logit'"),
    (lambda s: pq.write_table(pq.read_table(s / "part-1.parquet").slice(1), s / "part-1.parquet"),
     r"shards hold 11 rows, manifest\.json says 12"),
    (lambda s: (s / MANIFEST).write_text(json.dumps({**json.loads((s / MANIFEST).read_text()), "dim": 8})),
     r"column 'feature' is fixed_size_list<\w+: float>\[4\], expected fixed_size_list<\w+: float>\[8\]"),
])
def test_featurestore_shards_must_match_the_manifest(tmp_path, change, problem):
    store = write_store(tmp_path / "store")
    change(store)
    with pytest.raises(UserError, match="re-run `dp4tl extract`") as e:
        FeatureStore.open(store)
    assert re.search(problem, str(e.value))


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name,read,wrong", [
    ("part-a.parquet", PartStaging.committed_ids, write_other_parquet),
    ("run-1.json", PartStaging.runs, lambda p: p.write_text(json.dumps({"seconds": 1.0}))),
])
def test_damaged_extraction_part_is_one_line(tmp_path, kind, name, read, wrong):
    """A resumed extraction reads its committed parts and run records: a damaged one is named, kept."""
    staging = PartStaging.for_store(tmp_path / "store", "k" * 64)
    staging.path.mkdir()
    pq.write_table(pq.read_table(write_store(tmp_path / "rows") / "part-0.parquet"), staging.path / "part-a.parquet")
    staging.record_run("1", 2.0, 6)
    damage(staging.path / name, kind, wrong)
    assert_refused(lambda: read(staging), staging.path / name, f"delete {staging.path / name}", tmp_path)


# --- keep-sets ------------------------------------------------------------------------------------


def write_keepset(path: Path) -> Path:
    meta = KeepSetMeta(method="lm", ratio=0.5, units_kept=1, units_total=2, votes_per_unit=[2.0, 1.0],
                       images_kept=3, images_total=6, surrogate="resnet18", source_fingerprint="f",
                       downstream=["t"], seed=0)
    return KeepSet(np.array([1, 3, 5]), meta).write(path)


def keep_parquet_of_another_schema(path: Path) -> None:
    """A valid parquet of another schema whose sha256 is recorded: only the schema check can refuse it."""
    write_other_parquet(path)
    meta = json.loads((path.parent / META_FILE).read_text())
    from dp4tl_ray.atomic import sha256_file

    (path.parent / META_FILE).write_text(json.dumps({**meta, "sha256": sha256_file(path)}))


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name,wrong", [
    (IDS_FILE, keep_parquet_of_another_schema),
    (META_FILE, lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "ratios": 0.5}))),  # a misspelt key
])
def test_damaged_keepset_is_one_line(tmp_path, kind, name, wrong):
    path = write_keepset(tmp_path / "ks")
    damage(path / name, kind, wrong)
    msg = assert_refused(lambda: KeepSet.load(path), path, "dp4tl select", tmp_path)
    assert name in msg


# --- k-means results ------------------------------------------------------------------------------


@pytest.fixture
def kmeans_dir(tmp_path) -> Path:
    out = tmp_path / "store" / "kmeans" / "k2"
    ids = np.arange(6)
    _write_result(out, np.eye(2, 4, dtype=np.float32), ids, ids % 2, np.ones(6, np.float32),
                  {"k": 2, "objective": [1.0], "backend": "faiss-cpu", "sizes": [3, 3], "seconds": 0.1})
    return out


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name,read,wrong", [
    ("kmeans.json", lambda d: _reusable(d, {"k": 2}), lambda p: p.write_text(json.dumps({"k": 2}))),
    ("centroids.npy", load_centroids, lambda p: np.save(p, np.zeros(5, np.float32))),
    ("assign.parquet", load_assignments, write_other_parquet),
])
def test_damaged_kmeans_result_is_one_line(kmeans_dir, kind, name, read, wrong):
    damage(kmeans_dir / name, kind, wrong)
    assert_refused(lambda: read(kmeans_dir), kmeans_dir / name, f"delete {kmeans_dir} and re-run k-means",
                   kmeans_dir.parent)


def test_intact_kmeans_result_reads_back(kmeans_dir):
    assert _reusable(kmeans_dir, {"k": 2})["sizes"] == [3, 3]
    assert load_centroids(kmeans_dir, (2, 4)).shape == (2, 4)
    assert load_assignments(kmeans_dir).column("cluster").to_pylist() == [0, 1, 0, 1, 0, 1]


# --- EL2N / GraNd scores --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_scores_are_one_line(tmp_path, kind):
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"id": pa.array([0, 1], pa.int64()), "el2n": pa.array([0.1, 0.2], pa.float32())}), path)
    assert load_scores(path, "el2n").table.column("el2n").to_pylist() == pytest.approx([0.1, 0.2])
    damage(path, kind, lambda p: pq.write_table(pa.table({"id": [0, 1], "grand": [1.0, 2.0]}), p))
    assert_refused(lambda: load_scores(path, "el2n"), path, "pass another", tmp_path)


# --- checkpoints ----------------------------------------------------------------------------------


def write_checkpoint_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    TrainState(model={"w": torch.zeros(3)}, optimizer={}, scheduler={}, epoch=2, history=[{"loss": 1.0}]).write(path)
    torch.save({"model": {"fc.weight": torch.zeros(2, 3)}, "spec": {"arch": "resnet18"}}, path / "model.pt")
    return path


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name,read,wrong,fix", [
    ("state.pt", TrainState.read, lambda p: torch.save({"model": {}, "epochs": 2}, p), "training resumes"),
    ("model.pt", lambda d: load_checkpoint(d / "model.pt"), lambda p: torch.save({"model": [1, 2]}, p),
     "not a state dict"),
])
def test_damaged_checkpoint_is_one_line(tmp_path, kind, name, read, wrong, fix):
    ckpt = write_checkpoint_dir(tmp_path / "checkpoint_epoch00002")
    damage(ckpt / name, kind, wrong)
    fix = fix if kind == "wrong_schema" else "cannot be read safely" if name == "model.pt" else fix
    assert_refused(lambda: read(ckpt), ckpt / name, fix, tmp_path)


def test_intact_train_state_reads_back(tmp_path):
    state = TrainState.read(write_checkpoint_dir(tmp_path / "c"))
    assert state.epoch == 2 and state.history == [{"loss": 1.0}] and torch.equal(state.model["w"], torch.zeros(3))


# --- sweep plans and results -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_sweep_plan_is_one_line(tmp_path, kind):
    from dp4tl_ray.sweep import load_plan

    path = tmp_path / "sweep.yaml"
    path.write_text((Path(__file__).parents[1] / "jobs" / "configs" / "demo.yaml").read_text())
    damage(path, kind, lambda p: p.write_text("sweep: [lm, fm]\npretrain:\n  epochs: 1\n"))
    assert_refused(lambda: load_plan(path), path, "jobs/configs", tmp_path)


def write_results_file(sweep: Path) -> Path:
    from dp4tl_ray.results import write_results

    records = [{"trial_id": f"t{i}", "status": "ok", "error": None, "method": "lm", "ratio": 0.5, "lp_acc": 0.1 * i}
               for i in range(4)]
    return Path(write_results(str(sweep), records))


@pytest.mark.parametrize("kind", ["garbled", "wrong_schema"])
def test_damaged_results_are_one_line(tmp_path, kind):
    from dp4tl_ray.results import load_results

    path = write_results_file(tmp_path / "sweep")
    damage(path, kind, lambda p: p.write_text('{"ratio": 0.5}\n[1, 2]\nsweep: x\n'))  # JSON, but no trial record
    assert_refused(lambda: load_results(tmp_path / "sweep"), path, "re-run the same `dp4tl sweep`", tmp_path)


def test_truncated_or_empty_results_keep_every_readable_trial(tmp_path):
    """A cut results.jsonl is still a report: whole lines are trials, the cut one is a counted error trial;
    an empty one says to run the sweep (the file is never rewritten by a read)."""
    from dp4tl_ray.results import load_results

    path = write_results_file(tmp_path / "sweep")
    damage(path, "truncated", write_other_parquet)
    trials = load_results(tmp_path / "sweep")
    assert [t["status"] for t in trials] == ["ok", "ok", "error"]
    assert trials[-1]["error"] == "unreadable line (not a JSON object)"
    damage(path, "empty", write_other_parquet)
    assert_refused(lambda: load_results(tmp_path / "sweep"), tmp_path / "sweep", "run the sweep first", tmp_path)


# --- the two cases of the issue, through the CLI ----------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("dp4tl: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_yaml_syntax_error_exits_2_with_one_line(tmp_path, capsys):
    config = tmp_path / "select.yaml"
    config.write_text("method: lm\nratio: [1,\n")
    assert run(["select", "--config", str(config)]) == 2
    err = _one_line_error(capsys)
    assert str(config) in err and "line" in err


@pytest.mark.ray
@pytest.mark.parametrize("method,flags", [("fm", ["--k", "2"]), ("fm-classmean", []), ("moderate", [])])
def test_cli_shard_damaged_inside_is_one_line_from_the_actors_that_read_it(ray_local, tmp_path, capsys, method, flags):
    """Ids and labels intact (the driver's reads pass), features damaged: the k-means (fm) and class-statistics
    (fm-classmean, moderate: by class range) actors find it, and their error reaches the user as one line."""
    source, task = write_store(tmp_path / "source"), write_store(tmp_path / "task")
    shard = source / "part-1.parquet"
    garble_inside(shard, "feature")
    assert run(["select", "--method", method, "--ratio", "0.5", "--source-features", str(source),
                "--downstream-features", str(task), "--out", str(tmp_path / "ks"), *flags]) == 2
    err = _one_line_error(capsys)
    assert str(shard) in err and f"delete {source} and re-run `dp4tl extract`" in err
    assert not (tmp_path / "ks").exists()


def test_cli_truncated_featurestore_shard_exits_2_with_one_line(tmp_path, capsys):
    source, task = write_store(tmp_path / "source"), write_store(tmp_path / "task")
    shard = source / "part-0.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    assert run(["select", "--method", "lm", "--ratio", "0.5", "--source-features", str(source),
                "--downstream-features", str(task), "--out", str(tmp_path / "ks")]) == 2
    err = _one_line_error(capsys)
    assert str(shard) in err and f"delete {source} and re-run `dp4tl extract`" in err
    assert not (tmp_path / "ks").exists()
