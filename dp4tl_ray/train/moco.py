"""MoCo v2 (He et al. 2020; Chen et al. 2020): momentum key encoder, a queue of negative keys, InfoNCE.

Under ``torch.distributed`` (world size > 1) the keys of every rank are enqueued, so the queue is
identical everywhere, and the key encoder runs on a batch shuffled across ranks (shuffle-BN) so
BatchNorm cannot use batch statistics to tell positives apart. On one worker the same is emulated
as the official single-GPU demo does with its SplitBatchNorm: the key batch is shuffled and
normalised in groups (about :data:`MOCO_BN_GROUP` images, at least 2), then the keys are put back
in order. Wrap with DDP using
:func:`ddp_kwargs` (no buffer broadcast per step): the queue needs none, since every rank writes
the same keys, and broadcasting a 128 x 65536 queue each step would cost 32 MiB of traffic for
nothing. BN running statistics then stay per rank (rank 0's are saved; evaluation does not need them).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dp4tl_ray.errors import UserError
from dp4tl_ray.global_rng import seeded
from dp4tl_ray.models import ModelSpec, Surrogate
from dp4tl_ray.train.pretrain_config import MOCO_DIM, MOCO_K, MOCO_M, MOCO_T

# The MoCo v2 defaults (MOCO_DIM, MOCO_K, MOCO_M, MOCO_T) are written once, beside PretrainConfig's fields that
# default to them (torch-free, so the CLI builds its flags without importing torch). The rest of v2 is --mlp
# (the MLP head below, always on), --aug-plus (dp4tl_ray.data.transforms.MOCO_V2_*) and --cos (the cosine LR
# schedule every pretraining mode uses).
# Images per GPU in MoCo's 8-GPU recipe (batch 256): the BN batch of one emulated GPU on one worker.
MOCO_BN_GROUP = 32


def ddp_kwargs() -> dict[str, bool]:
    """DDP options for :class:`MoCoV2`: buffers in sync at start, never broadcast per step.

    torch >= 2.14 spells this ``forward_sync_buffers=False`` (and deprecates ``broadcast_buffers``,
    which also skipped the start-up sync: harmless here, as every rank builds the same queue)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank, rank order (no gradient flows back)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class MoCoV2(nn.Module):
    """Query encoder, momentum key encoder and key queue; ``forward`` returns InfoNCE logits and labels."""

    def __init__(self, spec: ModelSpec, dim: int = MOCO_DIM, K: int = MOCO_K, m: float = MOCO_M, T: float = MOCO_T,
                 seed: int = 0, bn_group: int = MOCO_BN_GROUP):
        super().__init__()
        self.K, self.m, self.T, self.bn_group, self.seed = K, m, T, bn_group, seed
        self._shuffle_gen: torch.Generator | None = None  # the key shuffles' own draws (not torch's global RNG,
        #                                                   which the worker's data thread seeds per batch)
        with seeded(seed):  # same initial weights and queue on every rank
            self.encoder_q = Surrogate(replace(spec, num_classes=dim))
            hidden = self.encoder_q.feature_dim
            self.encoder_q.net.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
            queue = F.normalize(torch.randn(dim, K), dim=0)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The query encoder's torchvision state dict (``fc.*`` is the MLP head, ignored by evaluation)."""
        return self.encoder_q.net.state_dict()

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for pk, pq in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            pk.lerp_(pq, 1.0 - self.m)  # pk = m * pk + (1 - m) * pq

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys of this rank's ``im_k``, and of every rank's (rank order) for the queue."""
        if not _distributed():
            k = self._split_bn_keys(im_k)
            return k, k
        sizes = _gather(torch.tensor([len(im_k)], device=im_k.device))
        if bool((sizes != sizes[0]).any()):
            raise UserError(f"MoCo needs the same batch size on every rank, got {sizes.tolist()}; drop the last partial batch")
        rank, world = dist.get_rank(), dist.get_world_size()
        perm = self._randperm(int(sizes.sum()), im_k.device)
        dist.broadcast(perm, src=0)
        shuffled = F.normalize(self.encoder_k(_gather(im_k)[perm.view(world, -1)[rank]]).float(), dim=1)
        k_all = _gather(shuffled)[torch.argsort(perm)]  # back to rank order
        return k_all.view(world, -1, k_all.shape[1])[rank], k_all

    def _randperm(self, n: int, device: torch.device) -> torch.Tensor:
        if self._shuffle_gen is None or self._shuffle_gen.device != device:
            self._shuffle_gen = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randperm(n, generator=self._shuffle_gen, device=device)

    @torch.no_grad()
    def _split_bn_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Shuffle-BN on one worker: the shuffled key batch goes through the key encoder in groups,
        each normalised by its own batch statistics as on separate GPUs; keys come back in order."""
        n = len(im_k)
        perm = self._randperm(n, im_k.device)
        groups = im_k[perm].tensor_split(min(n, max(2, n // self.bn_group)))
        k = torch.cat([self.encoder_k(g) for g in groups])
        return F.normalize(k.float(), dim=1)[torch.argsort(perm)]

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        n = len(keys)
        if self.K % n:
            raise UserError(f"MoCo queue size K={self.K} is not a multiple of the global batch {n}; "
                            "choose K divisible by batch_size x world size and drop partial batches")
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + n] = keys.T
        self.queue_ptr[0] = (ptr + n) % self.K

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[N, 1 + K]`` (positive key first) and labels (all 0); updates the key encoder and queue."""
        q = self.encoder_q(im_q)
        self._momentum_update()
        k, k_all = self._keys(im_k)
        with torch.autocast(q.device.type, enabled=False):  # logits in fp32 even under bf16 autocast
            q = F.normalize(q.float(), dim=1)
            l_pos = (q * k).sum(1, keepdim=True)
            l_neg = q @ self.queue.clone()  # clone: the enqueue below writes the queue in place
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        self._enqueue(k_all)
        return logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device)


__all__ = ["MOCO_BN_GROUP", "MOCO_DIM", "MOCO_K", "MOCO_M", "MOCO_T", "MoCoV2", "ddp_kwargs"]
