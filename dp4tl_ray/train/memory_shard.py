"""A Train worker's share of a cached keep-set, held in its memory and augmented by the worker.

When the decoded keep-set fits the object store (``cache_decoded``), each worker reads its shard
once (in id order) and draws every epoch from memory: a fresh permutation per epoch (seeded by run
seed, epoch and rank), batches cut from it, the mode's augmentation (drawing from a generator seeded
the same way) applied by the worker's data thread
(:class:`~dp4tl_ray.train.prefetch.EpochStream`). No Ray Data execution per epoch: at small scale
its start-up was most of an epoch, and it did not shrink with the keep-set. Numpy and torch only
(and Ray's block accessor, to read the blocks).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from dp4tl_ray.data.decode import stack_images

Batch = dict[str, np.ndarray]


class MemoryShard:
    """Equal-length numpy columns (``image`` uint8 NHWC, ``label``, ...) of one worker's rows."""

    def __init__(self, columns: dict[str, np.ndarray]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns
        self.rows = lengths.pop() if lengths else 0

    @classmethod
    def from_batches(cls, batches: Iterable[Batch]) -> MemoryShard:
        """Concatenate numpy batches (e.g. a Ray Data shard's ``iter_batches(batch_format="numpy")``).
        Images of several shapes (a training decode keeps each image's aspect) may come as NHWC
        arrays from some blocks and object arrays from others: they become one object column."""
        parts: dict[str, list[np.ndarray]] = {}
        for b in batches:
            for k, v in b.items():
                parts.setdefault(k, []).append(np.asarray(v))
        columns = {k: _concatenate(v) for k, v in parts.items()}
        if "id" in columns:  # Ray Data hands blocks in completion order: id order makes the epochs reproducible
            order = np.argsort(columns["id"], kind="stable")
            columns = {k: v[order] for k, v in columns.items()}
        return cls(columns)

    @classmethod
    def from_tables(cls, tables: Iterable[Any]) -> MemoryShard:
        """:meth:`from_batches` over Ray Data blocks (Arrow tables of a materialized dataset), each
        converted as Ray Data's ``iter_batches(batch_format="numpy")`` would."""
        from ray.data.block import BlockAccessor

        return cls.from_batches(BlockAccessor.for_block(t).to_batch_format("numpy") for t in tables if t.num_rows)

    def __len__(self) -> int:
        return self.rows

    def epoch(self, epoch: int, *, batch_size: int, drop_last: bool, seed: int, rank: int,
              augment: Callable[..., Batch], device: torch.device | None = None) -> Iterator[dict[str, Any]]:
        """This epoch's batches as torch tensors: every row once, in an order fixed by (seed, epoch, rank).
        ``augment(batch, generator=...)`` draws from a torch generator seeded by the same triple, so an
        epoch is the same whether it runs in one go or after a resume.
        On a CUDA ``device`` each batch is pinned and copied there (the data thread runs ahead, so the
        copy overlaps the training step), as Ray Data's ``iter_torch_batches`` does on the streamed path."""
        cuda = device is not None and device.type == "cuda"
        order = np.random.default_rng((seed, epoch, rank)).permutation(self.rows)
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, epoch, rank)).generate_state(1)[0]))
        for start in range(0, self.rows, batch_size):
            idx = np.sort(order[start:start + batch_size])  # sorted: contiguous reads; the batch's rows stay random
            if drop_last and len(idx) < batch_size:
                return
            out = augment({k: v[idx] for k, v in self.columns.items()}, generator=generator)
            batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
            if cuda:
                batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
            yield batch


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    if len({(p.dtype, p.shape[1:]) for p in parts}) == 1:
        return np.concatenate(parts)
    return stack_images([row for p in parts for row in p])


__all__ = ["MemoryShard"]
