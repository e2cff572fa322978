"""Surrogate feature extraction on a local Ray: rows, norms, reuse, rebuild, both readers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dp4tl_ray.data.imagefolder import scan_image_folder
from dp4tl_ray.data.parquet import shard_image_folder
from dp4tl_ray.errors import UserError
from dp4tl_ray.features import ExtractConfig, extract_features
from dp4tl_ray.featurestore import FeatureStore
from dp4tl_ray.models import ModelSpec, build_model, save_checkpoint

pytestmark = pytest.mark.ray


def _cfg(source, out, **kw) -> ExtractConfig:
    base = dict(image_size=32, resize_size=32, small_input=True, batch_size=16, topk=3, rows_per_block=32)
    return ExtractConfig(source=str(source), out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def folder_store(ray_local, synth_dirty, tmp_path_factory):
    return extract_features(_cfg(synth_dirty.source_dir, tmp_path_factory.mktemp("fs") / "store"), progress=False)


def test_rows_match_ids_and_corrupt_files_are_counted(folder_store, synth_dirty):
    index = scan_image_folder(synth_dirty.source_dir)
    broken = {str((synth_dirty.root / b).relative_to(synth_dirty.source_dir)) for b in synth_dirty.broken_files}
    ids, labels, feats, topk = folder_store.arrays()
    expected = [i for i, p in enumerate(index.paths) if p not in broken]
    assert ids.tolist() == expected
    assert (labels == index.labels[ids]).all()
    m = folder_store.manifest
    assert m["num_rows"] == len(expected) and m["num_inputs"] == len(index)
    assert {s["path"] for s in m["skipped"]} == broken
    assert feats.shape == (len(expected), 512)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert topk.shape == (len(expected), 3) and topk.min() >= 0 and topk.max() < len(index.classes)


def test_decode_tasks_feeding_the_actors_give_the_same_store(folder_store, synth_dirty, tmp_path):
    """The GPU pipeline's shape (CPU decode tasks feed the model actors), run on CPU: the rows, the skipped files
    and the key are those of the actors that decode their own images."""
    store = extract_features(_cfg(synth_dirty.source_dir, tmp_path / "store", decode_in_actors=False), progress=False)
    assert (folder_store.manifest["decoded_by"], store.manifest["decoded_by"]) == ("model actors", "cpu tasks")
    assert store.manifest["store_key"] == folder_store.manifest["store_key"]
    a, b = folder_store.read(), store.read()
    assert a.column("id").equals(b.column("id")) and a.column("topk_idx").equals(b.column("topk_idx"))
    np.testing.assert_allclose(folder_store.arrays()[2], store.arrays()[2], atol=1e-5)
    skipped = [[(r["id"], r["path"]) for r in st.manifest["skipped"]] for st in (folder_store, store)]
    assert skipped[0] == skipped[1] and skipped[0]


def test_the_torchvision_jpeg_decoder_gives_the_same_rows_and_features_under_a_key_of_its_own(folder_store, synth_dirty,
                                                                                              tmp_path):
    """``jpeg_decoder: torchvision`` (nvjpeg in GPU actors; on CPU torchvision's own decoder, the same path): the
    rows and skipped files of PIL's stage, features as close as the pixels (here not resized: equal), and a key
    of its own, since resized pixels would differ."""
    store = extract_features(_cfg(synth_dirty.source_dir, tmp_path / "store", jpeg_decoder="torchvision"),
                             progress=False)
    assert store.manifest["decoded_by"] == "model actors (torchvision)"
    assert store.manifest["store_key"] != folder_store.manifest["store_key"]
    (ids_a, _, feats_a, topk_a), (ids_b, _, feats_b, topk_b) = folder_store.arrays(), store.arrays()
    assert ids_a.tolist() == ids_b.tolist()
    assert np.einsum("ij,ij->i", feats_a, feats_b).min() > 0.999 and (topk_a[:, 0] == topk_b[:, 0]).mean() > 0.95
    skipped = [[(r["id"], r["path"]) for r in st.manifest["skipped"]] for st in (folder_store, store)]
    assert skipped[0] == skipped[1] and skipped[0]


def test_features_equal_a_direct_forward_pass(folder_store, synth_dirty):
    from dp4tl_ray.data.decode import DecodeSpec, decode_image

    ids, _, feats, topk = folder_store.arrays()
    index = scan_image_folder(synth_dirty.source_dir)
    model = build_model(ModelSpec("resnet18", len(index.classes), True), seed=0).eval()
    pick = ids[[0, len(ids) // 2, -1]]
    x = np.stack([decode_image((index.root / index.paths[i]).read_bytes(), DecodeSpec(32, 32)) for i in pick])
    with torch.inference_mode():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        f = torch.nn.functional.normalize(model.features(t), dim=1).numpy()
        top = model(t).topk(3, dim=1).indices.numpy()
    rows = np.searchsorted(ids, pick)
    np.testing.assert_allclose(feats[rows], f, atol=1e-4)
    assert (topk[rows] == top).all()


def test_unchanged_inputs_reuse_the_store(folder_store, synth_dirty):
    again = extract_features(_cfg(synth_dirty.source_dir, folder_store.path), progress=False)
    assert again.manifest["created"] == folder_store.manifest["created"]
    assert again.manifest["store_key"] == folder_store.manifest["store_key"]


def test_parquet_shards_give_the_same_rows_as_the_folder(folder_store, synth_dirty, tmp_path):
    shards = shard_image_folder(scan_image_folder(synth_dirty.source_dir), tmp_path / "shards", rows_per_shard=25)
    store = extract_features(_cfg(shards.root, tmp_path / "store"), progress=False)
    a, b = folder_store.read(), store.read()
    assert a.column("id").equals(b.column("id")) and a.column("label").equals(b.column("label"))
    np.testing.assert_allclose(folder_store.arrays()[2], store.arrays()[2], atol=1e-5)
    assert len(store.manifest["skipped"]) == len(synth_dirty.broken_files)


def test_a_changed_image_rebuilds_the_store(ray_local, synth_dirty, tmp_path):
    src = tmp_path / "train"
    shutil.copytree(synth_dirty.source_dir, src)
    first = extract_features(_cfg(src, tmp_path / "store"), progress=False)
    bad = next(p for p in sorted(src.rglob("*.JPEG")) if p.stat().st_size > 100)
    bad.write_bytes(bad.read_bytes()[:60])  # now truncated: must be skipped, not crash
    second = extract_features(_cfg(src, tmp_path / "store"), progress=False)
    assert second.manifest["store_key"] != first.manifest["store_key"]
    assert second.manifest["num_rows"] == first.manifest["num_rows"] - 1
    assert FeatureStore.open(tmp_path / "store").manifest["store_key"] == second.manifest["store_key"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "train"]  # no temp leftovers


def test_bad_inputs_are_one_line_errors(ray_local, synth_dirty, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        extract_features(_cfg(tmp_path / "missing", tmp_path / "o"))
    with pytest.raises(UserError, match="not found"):
        extract_features(_cfg(synth_dirty.source_dir, tmp_path / "o", checkpoint=str(tmp_path / "none.pt")))
    n = len(scan_image_folder(synth_dirty.source_dir).classes)
    save_checkpoint(build_model(ModelSpec("resnet34", n, True)), tmp_path / "r34.pt")
    with pytest.raises(UserError, match="arch='resnet34'") as e:
        extract_features(_cfg(synth_dirty.source_dir, tmp_path / "o", checkpoint=str(tmp_path / "r34.pt")))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="batch_size"):
        extract_features(_cfg(synth_dirty.source_dir, tmp_path / "o", batch_size=0))
    with pytest.raises(UserError, match="jpeg_decoder must be one of pil, torchvision, got 'nvjpeg'"):
        extract_features(_cfg(synth_dirty.source_dir, tmp_path / "o", jpeg_decoder="nvjpeg"))
    with pytest.raises(UserError, match="drop decode_in_actors false"):
        extract_features(_cfg(synth_dirty.source_dir, tmp_path / "o", jpeg_decoder="torchvision", decode_in_actors=False))
    assert not (tmp_path / "o").exists()


def test_a_self_supervised_surrogate_gives_features_but_no_class_predictions(ray_local, synth_dirty, tmp_path):
    from dp4tl_ray.data.decode import DecodeSpec, decode_image
    from dp4tl_ray.select.pipeline import SelectConfig, select_keepset
    from dp4tl_ray.train.moco import MoCoV2

    moco = MoCoV2(ModelSpec("resnet18", small_input=True), dim=16, K=32, seed=3)
    ckpt = save_checkpoint(moco.encoder_q, tmp_path / "moco.pt", {"mode": "moco_v2"})  # as a moco_v2 run saves it
    store = extract_features(_cfg(synth_dirty.source_dir, tmp_path / "store", checkpoint=str(ckpt)), progress=False)
    ids, _, feats, topk = store.arrays()
    assert store.manifest["surrogate"]["classifier"] is False and store.manifest["surrogate"]["mode"] == "moco_v2"
    assert store.manifest["topk"] == 0 and topk.shape == (len(ids), 0)
    index = scan_image_folder(synth_dirty.source_dir)  # the features are the MoCo backbone's
    x = np.stack([decode_image((index.root / index.paths[i]).read_bytes(), DecodeSpec(32, 32)) for i in ids[:3]])
    with torch.inference_mode():
        f = moco.encoder_q.eval().features(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(feats[:3], torch.nn.functional.normalize(f, dim=1).numpy(), atol=1e-4)
    select = dict(ratio=0.5, source_features=str(store.path), downstream_features=[str(store.path)])
    kept = select_keepset(SelectConfig(method="fm-classmean", out=str(tmp_path / "fm"), **select))
    assert kept.meta.units_kept == len(index.classes) - len(index.classes) // 2  # FM needs features only
    with pytest.raises(UserError, match="LM needs class predictions"):
        select_keepset(SelectConfig(method="lm", out=str(tmp_path / "lm"), **select))
