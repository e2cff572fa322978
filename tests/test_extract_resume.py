"""Extraction survives a lost node: a SIGKILLed `dp4tl extract` resumes from its committed parts and
ends equal to an uninterrupted run; the part bookkeeping on its own, without Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dp4tl_ray.errors import UserError
from dp4tl_ray.features import ExtractConfig, extract_features
from dp4tl_ray.featurestore import MANIFEST, FeatureStore, feature_matrix, feature_table
from dp4tl_ray.parts import PartStaging, commit_part, commit_skips, part_rows

REPO = Path(__file__).resolve().parents[1]
# Small and quick, but many parts: 16 rows each, so a kill lands with most of the rows still to do.
SETTINGS = dict(image_size=32, resize_size=32, batch_size=16, topk=3, rows_per_block=32, num_actors=1)


def _rows(ids: list[int]) -> pa.Table:
    n = len(ids)
    return feature_table(ids, np.zeros(n), np.ones((n, 4), np.float32), np.zeros((n, 2)), np.zeros((n, 2)))


def test_parts_are_named_by_their_ids_and_a_row_committed_twice_is_refused(tmp_path):
    staging = PartStaging.for_store(tmp_path / "store", "ab" * 32)
    assert staging.path == tmp_path / f"store.parts-{'ab' * 8}"
    assert staging.committed_ids().size == 0
    commit_part(_rows([5, 3]), staging=str(staging.path))
    commit_part(_rows([3, 5]), staging=str(staging.path))  # a retried task: the same part again, not a copy
    (staging.path / ".part-x.parquet.tmp-1234").write_bytes(b"half a file")  # a write the kill cut short
    assert len(staging.parts()) == 1
    assert staging.committed_ids().tolist() == [3, 5]
    assert not list(staging.path.glob(".*"))
    commit_part(_rows([1, 5]), staging=str(staging.path))
    with pytest.raises(UserError, match="two parts"):
        staging.committed_ids()


def test_a_part_an_orphaned_actor_committed_after_a_resume_read_the_staging_is_dropped_as_a_copy(tmp_path):
    staging = PartStaging.for_store(tmp_path / "store", "ef" * 32)
    staging.path.mkdir(parents=True)
    commit_part(_rows([1, 2]), staging=str(staging.path))  # the killed run's orphan, landing late
    for ids in ([0, 1], [2, 3]):  # the resumed run had batched those rows differently
        commit_part(_rows(ids), staging=str(staging.path))
    assert staging.committed_ids().tolist() == [0, 1, 2, 3] and len(staging.parts()) == 2
    commit_part(_rows([3, 4]), staging=str(staging.path))  # a copy of row 3 only, row 4 in no other part: refused
    with pytest.raises(UserError, match="two parts"):
        staging.committed_ids()


def test_unreadable_images_are_recorded_once_and_a_resumed_run_skips_them_with_the_committed_rows(tmp_path):
    staging = PartStaging.for_store(tmp_path / "store", "cd" * 32)
    staging.path.mkdir(parents=True)
    commit_part(_rows([0, 2]), staging=str(staging.path))
    commit_skips([(7, "a/x.jpg", "OSError: truncated"), (4, "b/y.jpg", "empty")], staging=str(staging.path))
    commit_skips([(4, "b/y.jpg", "empty"), (7, "a/x.jpg", "OSError: truncated")], staging=str(staging.path))  # retried
    assert len(list(staging.path.glob("skip-*.json"))) == 1
    assert [(r["id"], r["path"]) for r in staging.skipped()] == [(4, "b/y.jpg"), (7, "a/x.jpg")]
    assert staging.done_ids().tolist() == [0, 2, 4, 7] and staging.committed_ids().tolist() == [0, 2]


def test_part_size_is_about_a_hundredth_within_a_batch_and_10k_rows():
    assert part_rows(6000, 128) == 128
    assert part_rows(200_000, 128) == 2000
    assert part_rows(13_000_000, 128) == 10_000


@pytest.fixture(scope="module")
def synth_resume(tmp_path_factory):
    """400 images at 32 px (4 domains x 5 classes x 20), with planted unreadable files."""
    from dp4tl_ray.data.synthetic import SynthConfig, generate

    return generate(SynthConfig(root=str(tmp_path_factory.mktemp("resume") / "data"), num_domains=4, classes_per_domain=5,
                                images_per_class=20, image_size=32, tasks=0, dirty=True))


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the extraction's process group (driver, GCS, raylet), then its Ray workers (own groups,
    same session), as a reclaimed node would lose them all."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.ray
def test_a_killed_extraction_resumes_and_equals_a_clean_run(ray_local, synth_resume, tmp_path):
    source = str(synth_resume.source_dir)
    clean = extract_features(ExtractConfig(source=source, out=str(tmp_path / "clean"), **SETTINGS), progress=False)

    out = tmp_path / "cut"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    # RAY_ADDRESS=local: a Ray of its own, never another Ray already running on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("dp4tl")), "extract", "--source", source, "--out", str(out),
                             *flags], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob("cut.parts-*/run-*.json")):  # a part committed and its run recorded
            assert proc.poll() is None, f"the extraction to kill exited: {(tmp_path / 'killed.log').read_text()[-2000:]}"
            assert time.time() < deadline, "no part committed within 240 s"
            time.sleep(0.1)
    finally:
        _kill_session(proc)
        log.close()
    assert not (out / MANIFEST).exists(), "the kill came after the extraction had finished"
    # the embedded Ray starts with token auth set explicitly: no notice about its default on the console
    console = (tmp_path / "killed.log").read_text(errors="replace")
    assert "Token authentication" not in console
    # nor core_worker's warning about Ray Data's actor pool (harmless: ray_console says why), once its actors ran
    assert "constructor arguments in the object store" not in console
    assert "deprecated" not in console  # e.g. Ray Data 2.60 on map_batches(concurrency=...)
    resumed = extract_features(ExtractConfig(source=source, out=str(out), **SETTINGS), progress=False)

    a, b = clean.read(), FeatureStore.open(out).read()
    assert a.column("id").equals(b.column("id")) and a.column("label").equals(b.column("label"))
    assert np.allclose(feature_matrix(a.column("feature")), feature_matrix(b.column("feature")), atol=1e-5)
    assert a.column("topk_idx").equals(b.column("topk_idx"))
    m, mc = resumed.manifest, clean.manifest
    assert m["store_key"] == mc["store_key"]
    assert m["num_rows"] == mc["num_rows"] == b.num_rows and m["num_inputs"] == mc["num_inputs"]
    assert [(s["id"], s["path"]) for s in m["skipped"]] == [(s["id"], s["path"]) for s in mc["skipped"]]
    assert len(m["skipped"]) == len(synth_resume.broken_files) > 0  # the planted broken files, each once
    assert len(m["runs"]) == 2 and len(mc["runs"]) == 1 and mc["runs"][0]["rows"] == mc["num_rows"]
    killed, last = m["runs"]
    assert 0 < last["rows"] < m["num_rows"]  # the resumed run only extracted what the kill left
    assert killed["rows"] + last["rows"] <= m["num_rows"]
    assert m["seconds"] == pytest.approx(killed["seconds"] + last["seconds"], abs=2e-3)
    assert not list(tmp_path.glob("cut.parts-*"))  # the staging directory is gone once the store is in place
