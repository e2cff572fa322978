"""Folder and parquet readers: stable ids, class index handling, the shared decode stage."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from dp4tl_ray.data.decode import DecodeSpec, decode_batch, decode_image
from dp4tl_ray.data.imagefolder import read_class_index, scan_image_folder, write_class_index
from dp4tl_ray.data.parquet import Reencode, open_shards, shard_image_folder
from dp4tl_ray.data.source import open_source
from dp4tl_ray.errors import UserError


def broken_relpaths(synth) -> set[str]:
    """The planted broken files, relative to the source train/ dir (as the index lists them)."""
    return {str((synth.root / b).relative_to(synth.source_dir)) for b in synth.broken_files}


def test_ids_are_sorted_relative_paths_and_stable(synth_dirty):
    a = scan_image_folder(synth_dirty.source_dir)
    b = scan_image_folder(synth_dirty.source_dir)
    assert a.paths == sorted(a.paths) and a.paths == b.paths
    assert a.fingerprint == b.fingerprint
    assert [a.classes[label] for label in a.labels] == [p.split("/")[0] for p in a.paths]
    table = a.table()
    assert table.column("id").to_pylist() == list(range(len(a)))


def test_fingerprint_changes_when_a_file_changes(tmp_path, synth_dirty):
    import shutil

    root = tmp_path / "train"
    shutil.copytree(synth_dirty.source_dir, root)
    before = scan_image_folder(root).fingerprint
    victim = root / scan_image_folder(root).paths[3]
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert scan_image_folder(root).fingerprint != before


def test_class_index_file_fixes_labels_and_refuses_unknown_folders(tmp_path, synth_dirty):
    index = scan_image_folder(synth_dirty.source_dir)
    reordered = list(reversed(index.classes)) + ["n99999999"]
    write_class_index(reordered, tmp_path / "ci.json")
    assert read_class_index(tmp_path / "ci.json") == reordered
    fixed = scan_image_folder(synth_dirty.source_dir, tmp_path / "ci.json")
    assert fixed.paths == index.paths
    assert [fixed.classes[i] for i in fixed.labels] == [index.classes[i] for i in index.labels]
    write_class_index(index.classes[1:], tmp_path / "short.json")
    with pytest.raises(UserError, match="not in the class index"):
        scan_image_folder(synth_dirty.source_dir, tmp_path / "short.json")


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no image files"):
        scan_image_folder(tmp_path / "noimg")
    (tmp_path / "gap.json").write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(UserError, match="0..N-1"):
        read_class_index(tmp_path / "gap.json")


def test_shards_carry_the_folder_ids_labels_and_bytes(tmp_path, synth_dirty):
    index = scan_image_folder(synth_dirty.source_dir)
    shards = shard_image_folder(index, tmp_path / "shards", rows_per_shard=17)
    assert len(shards.files) == -(-len(index) // 17)
    assert shards.classes == index.classes and shards.num_rows == len(index)
    table = pq.ParquetDataset(shards.files).read().sort_by("id")
    assert table.column("id").to_pylist() == list(range(len(index)))
    assert table.column("label").to_numpy().tolist() == index.labels.tolist()
    assert table.column("path").to_pylist() == index.paths
    k = 5
    assert table.column("image")[k].as_py() == (index.root / index.paths[k]).read_bytes()
    assert open_shards(tmp_path / "shards").fingerprint == shards.fingerprint
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_resized_shards_keep_ids_labels_and_record_their_provenance(tmp_path, synth_dirty):
    import io

    from PIL import Image

    index = scan_image_folder(synth_dirty.source_dir)
    plain = shard_image_folder(index, tmp_path / "plain", rows_per_shard=17)
    small = shard_image_folder(index, tmp_path / "small", rows_per_shard=17, reencode=Reencode(max_side=20, quality=80))
    a = pq.ParquetDataset(plain.files).read().sort_by("id")
    b = pq.ParquetDataset(small.files).read().sort_by("id")
    for col in ("id", "label", "path"):
        assert a.column(col).equals(b.column(col))
    broken = broken_relpaths(synth_dirty)
    for path, old, new in zip(b.column("path").to_pylist(), a.column("image").to_pylist(), b.column("image").to_pylist()):
        if path in broken:
            assert new == old  # left for the decode stage to skip and record
        else:
            with Image.open(io.BytesIO(new)) as img:
                assert max(img.size) <= 20 and img.format == "JPEG"
    meta = json.loads((tmp_path / "small" / "shards.json").read_text())
    assert meta["reencode"] == {"max_side": 20, "quality": 80} and meta["source_fingerprint"] == index.fingerprint
    assert open_shards(tmp_path / "small").reencode == Reencode(20, 80) and plain.reencode is None
    # The existing reader takes them as any shards: same identity as the folder, same rows decoded.
    source = open_source(tmp_path / "small")
    assert source.format == "parquet" and index.fingerprint in source.identities
    batch = {c: b.column(c).to_numpy(zero_copy_only=False) for c in b.column_names}
    out = decode_batch(batch, spec=DecodeSpec(16, 16))
    assert set(out["id"].tolist()) == {i for i, p in enumerate(index.paths) if p not in broken}
    assert out["image"].shape[1:] == (16, 16, 3)


def test_reencode_keeps_small_images_and_refuses_bad_settings(synth_dirty):
    data = (synth_dirty.source_dir / scan_image_folder(synth_dirty.source_dir).paths[0]).read_bytes()
    assert Reencode(max_side=32).apply(data) == data  # 32 px images: nothing to shrink, no generation loss
    with pytest.raises(UserError, match="max_side"):
        Reencode(max_side=4)
    with pytest.raises(UserError, match="quality"):
        Reencode(max_side=64, quality=0)


def test_decode_resizes_shorter_side_and_centre_crops():
    import io

    from PIL import Image

    img = np.zeros((60, 90, 3), np.uint8)
    img[:, 40:50] = 255  # a bright vertical band in the middle
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), DecodeSpec(size=32, resize=40))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 14:18].mean() > 200 and out[:, :5].mean() < 30


def test_decode_stage_drops_unreadable_files(synth_dirty):
    index = scan_image_folder(synth_dirty.source_dir)
    broken = broken_relpaths(synth_dirty)
    assert broken and broken <= set(index.paths)
    batch = {k: v.to_numpy(zero_copy_only=False) for k, v in zip(index.table().column_names, index.table().columns)}
    out = decode_batch(batch, spec=DecodeSpec(32, 32), root=str(index.root))
    kept_paths = {index.paths[i] for i in out["id"]}
    assert kept_paths == set(index.paths) - broken
    assert out["image"].shape == (len(index) - len(broken), 32, 32, 3)
    assert (out["label"] == index.labels[out["id"]]).all()


def test_decode_spec_rejects_bad_sizes():
    with pytest.raises(UserError):
        DecodeSpec(size=4, resize=4)
    with pytest.raises(UserError):
        DecodeSpec(size=64, resize=32)
