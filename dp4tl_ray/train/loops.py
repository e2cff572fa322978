"""Per-worker pretraining loop for every mode (runs inside a Ray Train worker).

A mode is a :class:`Method`: how to build the model, how to augment a batch (in a Ray Data CPU
stage, or in the worker when the keep-set is cached: :mod:`~dp4tl_ray.train.memory_shard`), and the
loss of one step. The loop around them - data shard, DDP, bf16 autocast,
checkpoints, resume, metrics - is the same for all modes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from dp4tl_ray.models import ModelSpec, Surrogate, build_model, to_model_input, unwrap_ddp
from dp4tl_ray.train.checkpoints import (TrainState, check_resume, restored_state, resume_settings, staged_checkpoint,
                                         write_checkpoint)
from dp4tl_ray.train.pretrain_config import PretrainConfig
from dp4tl_ray.train.prefetch import EpochStream, Waits


@dataclass(frozen=True)
class Method:
    """One pretraining mode."""

    name: str
    views: tuple[str, ...]  # batch columns the loss reads
    build: Callable[[ModelSpec, PretrainConfig], nn.Module]
    loss: Callable[[nn.Module, dict[str, torch.Tensor], PretrainConfig, torch.Generator | None], torch.Tensor]
    backbone: Callable[[nn.Module], Surrogate]
    ddp_kwargs: Callable[[], dict[str, Any] | None] = lambda: None


def _supervised_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: PretrainConfig,
                     rng: torch.Generator | None) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["image"]), batch["label"])


def _adversarial_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: PretrainConfig,
                      rng: torch.Generator | None) -> torch.Tensor:
    from dp4tl_ray.train.pgd import pgd_attack

    x_adv = pgd_attack(unwrap_ddp(model), batch["image"], batch["label"], eps=cfg.adv_eps, steps=cfg.adv_steps,
                       norm=cfg.adv_norm, generator=rng)
    return nn.functional.cross_entropy(model(x_adv), batch["label"])


def _build_moco(spec: ModelSpec, cfg: PretrainConfig) -> nn.Module:
    from dp4tl_ray.train.moco import MoCoV2

    return MoCoV2(spec, dim=cfg.moco_dim, K=cfg.moco_k, m=cfg.moco_m, T=cfg.moco_t, seed=cfg.seed)


def _moco_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: PretrainConfig,
               rng: torch.Generator | None) -> torch.Tensor:
    logits, labels = model(batch["q"], batch["k"])
    return nn.functional.cross_entropy(logits, labels)


def _moco_ddp_kwargs() -> dict[str, Any]:
    from dp4tl_ray.train.moco import ddp_kwargs

    return ddp_kwargs()


METHODS = {
    "supervised": Method("supervised", ("image", "label"), lambda spec, cfg: build_model(spec, cfg.seed),
                         _supervised_loss, lambda m: m),
    "adversarial": Method("adversarial", ("image", "label"), lambda spec, cfg: build_model(spec, cfg.seed),
                          _adversarial_loss, lambda m: m),
    "moco_v2": Method("moco_v2", ("q", "k"), _build_moco, _moco_loss, lambda m: m.encoder_q, _moco_ddp_kwargs),
}


@dataclass(frozen=True)
class RunFacts:
    """What the driver found out before the run that every worker needs beside its :class:`PretrainConfig`."""

    kept_classes: list[int]  # the source classes trained on, in output order (the label map)
    num_source_classes: int
    run_dir: str  # <storage>/<name>; local mode writes its checkpoints under it


def loop_config(cfg: PretrainConfig, facts: RunFacts, shards: list[list] | None = None) -> dict[str, Any]:
    """``train_loop_config`` for :func:`train_loop_per_worker`: plain values, rebuilt into the dataclasses there,
    and with a cached keep-set each rank's Arrow block refs (:func:`~dp4tl_ray.train.trainer.cached_shards`;
    None: the workers stream the run's dataset)."""
    return {"cfg": asdict(cfg), "facts": asdict(facts), "shards": shards}


def _build_training(method: Method, cfg: PretrainConfig, spec: ModelSpec, cuda: bool, state: TrainState | None):
    """The (DDP-prepared) model, its optimizer and LR schedule, restored from ``state`` if given."""
    import ray.train.torch

    model = method.build(spec, cfg)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=method.ddp_kwargs())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if state is not None:
        unwrap_ddp(model).load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
    return model, opt, sched


def train_one_epoch(model: nn.Module, method: Method, opt: torch.optim.Optimizer, batches: Iterable[dict[str, torch.Tensor]],
                    remap: torch.Tensor, cfg: PretrainConfig, device: torch.device,
                    rng: torch.Generator | None = None) -> tuple[int, float]:
    """One pass of SGD steps over the full batches of ``batches`` (already on ``device``; bf16 autocast on
    CUDA); returns this worker's ``(images seen, summed loss)``. Source labels become kept-class indices
    through ``remap``.

    Every step takes a full batch: an epoch's short last batch is skipped (the next epoch reshuffles, so no
    image is left out for good). DDP's lock-step and MoCo's queue slots need this anyway, and a short batch of
    a few images in BatchNorm's training mode destabilises SGD: in P5 v2 (batch 32) the 6 runs whose keep-set
    left 2-4 images over ended at 1.15-2x their other seeds' training loss, one (random-class 0.5, 2 left
    over) below the untrained backbone's LP accuracy. :func:`train_loop_per_worker`'s data paths do not even
    cut such a batch (``drop_last``), and ``pretrain`` refuses a keep-set smaller than one batch per worker.

    ``rng`` (on ``device``) feeds the loss's own draws (PGD's random starts): not torch's global RNG,
    which the worker's data thread seeds for each batch it augments."""
    model.train()
    seen, loss_sum = 0, 0.0
    for batch in batches:
        n = len(batch[method.views[0]])
        if n < cfg.batch_size:
            continue
        inputs = {k: to_model_input(batch[k], channels_last=True) for k in method.views if k != "label"}
        if "label" in method.views:
            inputs["label"] = remap[batch["label"].long()]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = method.loss(model, inputs, cfg, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n = next(iter(inputs.values())).shape[0]
        seen += n
        loss_sum += float(loss.detach()) * n
    return seen, loss_sum


def _label_remap(kept_classes: list[int], num_source_classes: int, device: torch.device) -> torch.Tensor:
    """Source class -> index among the kept classes (-1 for the others)."""
    remap = torch.full((num_source_classes,), -1, dtype=torch.long)
    remap[torch.tensor(kept_classes, dtype=torch.long)] = torch.arange(len(kept_classes))
    return remap.to(device)


def _sum_over_workers(values: list[float], world: int) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    return totals.tolist()


def _report_epoch(cfg: PretrainConfig, facts: RunFacts, method: Method, rank: int, model: nn.Module, opt, sched,
                  history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """Report the epoch's metrics to Ray Train, with a checkpoint (written by rank 0) when one is due."""
    import ray.train
    from ray.train import Checkpoint

    epoch = metrics["epoch"]
    if epoch % cfg.checkpoint_every and epoch != cfg.epochs:
        ray.train.report(metrics)
        return
    with staged_checkpoint(facts.run_dir, epoch, local_mode=cfg.num_workers == 0) as tmp:
        if rank == 0:
            inner = unwrap_ddp(model)
            state = TrainState(model=inner.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                               epoch=epoch, history=history, resume_keys=resume_settings(cfg))
            write_checkpoint(tmp, state, method.backbone(inner), cfg, facts.kept_classes)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray Train loop (``config`` from :func:`loop_config`): resume from the latest checkpoint,
    train to ``cfg.epochs``, report per epoch. Returns the per-epoch metrics of the whole run
    (earlier attempts included)."""
    import ray.train
    import ray.train.torch

    cfg, facts = PretrainConfig(**config["cfg"]), RunFacts(**config["facts"])
    method = METHODS[cfg.mode]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)
    rng = torch.Generator(device=device).manual_seed(cfg.seed + rank)  # this run's draws in the losses

    state = restored_state(ray.train.get_checkpoint())
    if state is not None:
        check_resume(state, cfg)
    start_epoch, history = (state.epoch, list(state.history)) if state is not None else (0, [])

    shard = ray.train.get_dataset_shard("train") if config["shards"] is None else None
    held: list = []  # a cached keep-set: this worker's share of the decoded rows, read once (in the data thread)

    def open_epoch(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if shard is not None:  # augmented rows streamed by Ray Data, a new execution per epoch
            return shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                            local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank)
        from dp4tl_ray.data.transforms import augment_batch
        from dp4tl_ray.train.memory_shard import MemoryShard

        if not held:
            held.append(MemoryShard.from_tables(ray.get(config["shards"][rank])))
        augment = functools.partial(augment_batch, **cfg.augment_kwargs())
        return held[0].epoch(epoch, batch_size=cfg.batch_size, drop_last=True, seed=cfg.seed, rank=rank,
                             augment=augment, device=device)

    # Started before the model is built, so the data processes start meanwhile.
    stream = EpochStream(open_epoch, range(start_epoch, cfg.epochs), depth=cfg.prefetch_batches)
    try:
        # The head covers the kept classes (MoCo's is its feature dimension instead).
        spec = ModelSpec(cfg.arch, cfg.moco_dim if cfg.mode == "moco_v2" else len(facts.kept_classes), cfg.small_input)
        model, opt, sched = _build_training(method, cfg, spec, cuda, state)
        remap = _label_remap(facts.kept_classes, facts.num_source_classes, device)
        for epoch in range(start_epoch, cfg.epochs):
            started_at, t0, cpu0 = time.time(), time.perf_counter(), time.process_time()
            waits = Waits()
            seen, loss_sum = train_one_epoch(model, method, opt, stream.batches(epoch, waits), remap, cfg, device, rng)
            sched.step()
            seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
            images, loss_total = _sum_over_workers([seen, loss_sum], world)
            images = int(images)
            metrics = {"epoch": epoch + 1, "loss": loss_total / max(images, 1), "images": images,
                       "images_per_s": images / max(seconds, 1e-9), "epoch_s": seconds, "first_batch_s": waits.first,
                       "data_wait_s": waits.total, "cpu_s": cpu_s, "started_at": started_at, "lr": sched.get_last_lr()[0],
                       "start_epoch": start_epoch, "world_size": world}
            history.append(metrics)
            _report_epoch(cfg, facts, method, rank, model, opt, sched, history, metrics)
    finally:
        stream.close()
    return history


__all__ = ["METHODS", "Method", "RunFacts", "loop_config", "train_loop_per_worker", "train_one_epoch"]
