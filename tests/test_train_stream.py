"""The training data path: decoded keep-set cached or streamed, and the epoch stream that runs ahead."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from dp4tl_ray.data.imagefolder import scan_image_folder
from dp4tl_ray.errors import UserError
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta, keep_ids_for_units
from dp4tl_ray.train.prefetch import EpochStream, Waits
from dp4tl_ray.train.memory_shard import MemoryShard
from dp4tl_ray.train.trainer import (PretrainConfig, augmented_dataset, decoded_bytes, pretrain, training_dataset,
                                     use_decode_cache)


def _epochs(stream: EpochStream, epochs: range) -> list[list[int]]:
    return [list(stream.batches(e, Waits())) for e in epochs]


def test_epoch_stream_keeps_epoch_boundaries_and_order():
    stream = EpochStream(lambda e: iter(range(10 * e, 10 * e + 3)), range(2, 5), depth=2)
    try:
        assert _epochs(stream, range(2, 5)) == [[20, 21, 22], [30, 31, 32], [40, 41, 42]]
    finally:
        stream.close()


def test_epoch_stream_opens_the_next_epoch_while_this_one_is_consumed():
    opened: list[tuple[int, float]] = []

    def open_epoch(e):
        opened.append((e, time.monotonic()))
        return iter([e])

    stream = EpochStream(open_epoch, range(2), depth=4)
    try:
        waits = Waits()
        assert list(stream.batches(0, waits)) == [0] and waits.count == 2  # one batch, then the epoch's end
        deadline = time.monotonic() + 5
        while len(opened) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e for e, _ in opened] == [0, 1]  # epoch 1 opened before anyone asked for it
        assert list(stream.batches(1, Waits())) == [1]
    finally:
        stream.close()


def test_epoch_stream_raises_the_producers_error_in_the_consumer():
    def open_epoch(e):
        yield 1
        raise OSError("disk gone")

    stream = EpochStream(open_epoch, range(1))
    try:
        with pytest.raises(OSError, match="disk gone"):
            list(stream.batches(0, Waits()))
    finally:
        stream.close()


def test_closing_stops_a_producer_that_is_ahead():
    stream = EpochStream(lambda e: iter(range(1000)), range(3), depth=1)
    next(stream.batches(0, Waits()))
    stream.close()
    assert not stream._thread.is_alive()


def test_cache_decision(ray_local, tmp_path):
    cfg = PretrainConfig(source=str(tmp_path), out=str(tmp_path), image_size=32)
    # decoded for training: the shorter side at resize (37 = 32 * 8/7), the longer estimated at 4:3
    assert decoded_bytes(cfg, 10) == 10 * (37 * 49 * 3 + 12)
    assert use_decode_cache(cfg, 1000)  # 3 MB: fits any object store
    assert not use_decode_cache(cfg, 10**9)  # 3 TB: streams
    assert use_decode_cache(PretrainConfig(source="s", out="o", cache_decoded="true"), 10**9)
    assert not use_decode_cache(PretrainConfig(source="s", out="o", cache_decoded="false"), 10)
    with pytest.raises(UserError, match="cache_decoded must be"):
        PretrainConfig(source="s", out="o", cache_decoded="yes").validate()


def test_training_rows_keep_each_aspect_on_the_cached_and_the_streamed_path(ray_local, tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / "src" / f"c{c}").mkdir(parents=True)
        for i, (w, h) in enumerate([(60, 40), (40, 60), (48, 48)]):
            Image.fromarray(np.full((h, w, 3), 40 * i + c, np.uint8)).save(tmp_path / "src" / f"c{c}" / f"{i}.png")
    cfg = PretrainConfig(source=str(tmp_path / "src"), out=str(tmp_path), image_size=24, resize_size=32, rows_per_block=2)
    decoded, _, _, images = training_dataset(cfg)
    decoded = decoded.materialize()
    assert images == 6 and sorted(r["image"].shape for r in decoded.take_all()) == [(32, 32, 3)] * 2 + [(32, 48, 3)] * 2 + [(48, 32, 3)] * 2
    cached = MemoryShard.from_batches(decoded.iter_batches(batch_size=4, batch_format="numpy"))  # a worker's cache
    assert len(cached) == 6 and sorted(img.shape for img in cached.columns["image"])[-1] == (48, 32, 3)
    streamed = augmented_dataset(decoded, cfg).take_all()  # the augmentation stage: fixed-size crops again
    assert len(streamed) == 6 and {r["image"].shape for r in streamed} == {(24, 24, 3)}


@pytest.fixture(scope="module")
def keep_4_classes(synth_dirty, tmp_path_factory):
    index = scan_image_folder(synth_dirty.source_dir)
    ids = keep_ids_for_units(index.labels, np.arange(len(index)), np.arange(4))
    meta = KeepSetMeta(method="manual", ratio=2 / 3, units_kept=4, units_total=12, votes_per_unit=[1.0] * 12,
                       images_kept=len(ids), images_total=len(index), surrogate="none",
                       source_fingerprint=index.fingerprint, downstream=["test"], seed=0)
    path = tmp_path_factory.mktemp("ks") / "keep4"
    KeepSet(ids, meta).write(path)
    broken = {str((synth_dirty.root / b).relative_to(synth_dirty.source_dir)) for b in synth_dirty.broken_files}
    return path, sum(1 for i in ids if index.paths[i] not in broken)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_cached_and_streamed_runs_train_on_the_same_kept_images(ray_local, synth_dirty, keep_4_classes, tmp_path, cache):
    path, readable = keep_4_classes
    assert readable % 8 == 0  # every step takes a full batch: with batches of 8, an epoch sees every readable image
    cfg = PretrainConfig(source=str(synth_dirty.source_dir), out=str(tmp_path), name=f"c{cache}", keepset=str(path),
                         arch="resnet18", image_size=32, resize_size=32, epochs=2, batch_size=8, lr=0.01,
                         num_workers=0, shuffle_buffer=0, rows_per_block=16, cache_decoded=cache)
    r = pretrain(cfg)
    assert r.cached == (cache == "true") and (r.cache_s > 0) == r.cached
    assert [h["images"] for h in r.history] == [readable, readable]  # unreadable files skipped, every epoch
    assert r.kept_classes == [0, 1, 2, 3]


def test_a_cached_run_repeats_exactly(ray_local, synth_dirty, keep_4_classes, tmp_path):
    # The worker augments in its data thread while its main thread builds the model: both seed torch's
    # global RNG, and two runs of one config differed until every seeded block took one lock.
    cfg = PretrainConfig(source=str(synth_dirty.source_dir), out=str(tmp_path), keepset=str(keep_4_classes[0]),
                         arch="resnet18", image_size=32, resize_size=32, epochs=2, batch_size=8, lr=0.05,
                         num_workers=0, shuffle_buffer=0, rows_per_block=8, cache_decoded="true")
    first, second = (torch.load(pretrain(replace(cfg, name=n)).model_path, weights_only=True)["model"] for n in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
