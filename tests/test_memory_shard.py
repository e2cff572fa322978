"""A worker's in-memory share of a cached keep-set: every row once per epoch, reshuffled, augmented (no Ray but
the last test: how a cached keep-set is split into the workers' shares)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dp4tl_ray.train.memory_shard import MemoryShard


def _shard(n: int = 10) -> MemoryShard:
    batches = [{"id": np.arange(s, min(s + 4, n)), "label": np.arange(s, min(s + 4, n)) % 3,
                "image": np.zeros((min(4, n - s), 2, 2, 3), np.uint8)} for s in range(0, n, 4)]
    return MemoryShard.from_batches(batches)


def _ids(shard: MemoryShard, epoch: int, **kw) -> list[list[int]]:
    seen = []

    def augment(batch, generator):
        assert isinstance(generator, torch.Generator)
        assert batch["image"].shape[1:] == (2, 2, 3)
        return {**batch, "image": batch["image"] + 1}

    for b in shard.epoch(epoch, seed=0, rank=kw.pop("rank", 0), augment=augment, **kw):
        assert isinstance(b["id"], torch.Tensor) and int(b["image"].min()) == 1  # augmented, as tensors
        seen.append(b["id"].tolist())
    return seen


def test_every_row_once_per_epoch_in_a_new_order():
    shard = _shard(10)
    assert len(shard) == 10
    e0, e1 = _ids(shard, 0, batch_size=4, drop_last=False), _ids(shard, 1, batch_size=4, drop_last=False)
    assert [len(b) for b in e0] == [4, 4, 2]
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(10))
    assert e0 != e1 and e0 == _ids(shard, 0, batch_size=4, drop_last=False)  # reshuffled; same seed, same order
    assert e0 != _ids(shard, 0, batch_size=4, drop_last=False, rank=1)


def test_drop_last_keeps_only_full_batches():
    assert [len(b) for b in _ids(_shard(10), 0, batch_size=4, drop_last=True)] == [4, 4]


def test_empty_shard_has_no_batches_and_ragged_columns_are_refused():
    assert _ids(MemoryShard.from_batches([]), 0, batch_size=4, drop_last=False) == []
    with pytest.raises(ValueError, match="differ in length"):
        MemoryShard({"id": np.arange(3), "label": np.arange(2)})


def test_batches_stay_on_the_cpu_without_a_cuda_device():
    for b in _shard(6).epoch(0, batch_size=4, drop_last=False, seed=0, rank=0, augment=lambda x, generator: x,
                             device=torch.device("cpu")):
        assert b["image"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_land_on_the_cuda_device():
    # The cached path feeds the model directly: its batches must be where the model is (Ray Data's
    # iter_torch_batches moves the streamed ones; a CPU batch on a GPU model fails in normalisation).
    batches = list(_shard(6).epoch(0, batch_size=4, drop_last=False, seed=0, rank=0, augment=lambda x, generator: x,
                                   device=torch.device("cuda")))
    assert all(v.device.type == "cuda" for b in batches for v in b.values())
    assert sorted(torch.cat([b["id"] for b in batches]).tolist()) == list(range(6))


def test_images_of_several_shapes_become_one_column_and_augment_to_fixed_batches():
    # Ray Data hands a block of same-shaped images as NHWC, a block of mixed shapes as an object array
    mixed = np.empty(2, object)
    mixed[0], mixed[1] = np.ones((5, 7, 3), np.uint8), np.ones((7, 5, 3), np.uint8)
    shard = MemoryShard.from_batches([{"id": np.arange(3), "image": np.ones((3, 6, 6, 3), np.uint8)},
                                      {"id": np.arange(3, 5), "image": mixed}])
    assert len(shard) == 5 and shard.columns["image"].dtype == object
    assert sorted(img.shape for img in shard.columns["image"]) == [(5, 7, 3)] + [(6, 6, 3)] * 3 + [(7, 5, 3)]
    crop = lambda b, generator: {**b, "image": np.stack([img[:4, :4] for img in b["image"]])}  # noqa: E731
    batches = list(shard.epoch(0, batch_size=2, drop_last=False, seed=0, rank=0, augment=crop))
    assert [tuple(b["image"].shape) for b in batches] == [(2, 4, 4, 3), (2, 4, 4, 3), (1, 4, 4, 3)]
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(5))


def test_an_epoch_is_reproducible_whatever_order_the_blocks_arrived_in():
    # Ray Data hands a worker its blocks in completion order; a resumed or repeated run must still
    # see the same batches with the same augmentation draws.
    blocks = [{"id": np.arange(s, s + 3), "image": np.full((3, 2, 2, 3), s, np.uint8)} for s in (0, 3, 6)]

    def noisy(batch, generator):
        return {**batch, "noise": torch.rand(len(batch["id"]), generator=generator).numpy()}

    def run(shard, epoch):
        return [(b["id"].tolist(), b["noise"].tolist()) for b in
                shard.epoch(epoch, batch_size=4, drop_last=False, seed=3, rank=0, augment=noisy)]

    in_order, shuffled = MemoryShard.from_batches(blocks), MemoryShard.from_batches(blocks[::-1])
    assert shuffled.columns["id"].tolist() == list(range(9))
    assert [int(i) for i in shuffled.columns["image"][:, 0, 0, 0]] == [0] * 3 + [3] * 3 + [6] * 3  # rows stay whole
    assert run(in_order, 0) == run(shuffled, 0) == run(shuffled, 0)
    assert run(shuffled, 1) != run(shuffled, 0)


def test_a_cached_keepset_splits_into_equal_disjoint_worker_shares_read_from_its_blocks(ray_local):
    import ray
    import ray.data

    from dp4tl_ray.train.trainer import cached_shards

    ds = ray.data.range(10, override_num_blocks=4).map_batches(
        lambda b: {"id": b["id"], "label": b["id"] % 3, "image": np.stack([np.full((2, 2, 3), i, np.uint8) for i in b["id"]])}
    ).materialize()
    whole = MemoryShard.from_tables(ray.get(cached_shards(ds, 1)[0]))
    assert whole.columns["id"].tolist() == list(range(10)) and whole.columns["image"].shape == (10, 2, 2, 3)
    assert [int(x) for x in whole.columns["image"][:, 0, 0, 0]] == list(range(10))  # each row's own pixels
    shares = [MemoryShard.from_tables(ray.get(refs)) for refs in cached_shards(ds, 3)]
    assert [len(s) for s in shares] == [3, 3, 3]  # equal (DDP ranks step together); the remainder row is left out
    ids = np.concatenate([s.columns["id"] for s in shares])
    assert len(set(ids.tolist())) == 9 and set(ids.tolist()) <= set(range(10))
    for s in shares:
        assert (s.columns["label"] == s.columns["id"] % 3).all()
