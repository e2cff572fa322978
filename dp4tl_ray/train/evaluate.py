"""Downstream evaluation of a pretrained backbone: linear probe (LP) and full finetune (FF) on Ray Train.

Model selection never looks at the test set: a stratified, seeded hold-out of the downstream *train*
set picks the epoch (best ``val_acc``) and ``test_acc`` is the test top-1 at that epoch.
``test_acc_max_over_epochs`` - the best test top-1 over all epochs, i.e. selection on the test set,
which is what the paper's reference code reports - is logged beside it for comparison only.

Downstream sets are small, so every worker decodes the task's image folder itself (threads over
:func:`~dp4tl_ray.data.decode.decode_image`) and holds it in memory as uint8: no driver-side copy,
no object-store traffic, and the eval transform is the one feature extraction uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dp4tl_ray import atomic
from dp4tl_ray.data.decode import DecodeSpec, decode_image
from dp4tl_ray.data.imagefolder import FolderIndex
from dp4tl_ray.errors import UserError
from dp4tl_ray.global_rng import seeded
from dp4tl_ray.models import ModelSpec, Surrogate, build_model, load_backbone, to_model_input
from dp4tl_ray.train.eval_config import MAX_REPORTS, SELECTION, TEST_MAX_NOTE, EvalConfig, stratified_split, task_indexes

Split = tuple[Any, Any]  # (inputs: uint8 images N x H x W x 3 or features N x D, int64 labels), numpy or torch


# ----- pure helpers (no Ray) -----


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max is the label."""
    return (logits.argmax(1) == labels).float().mean().item()


def select_epoch(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch with the best ``val_acc`` (earliest on ties), its accuracies, and the test-set maximum."""
    best = max(history, key=lambda h: (h["val_acc"], -h["epoch"]))
    return {"best_epoch": best["epoch"], "val_acc": best["val_acc"], "test_acc": best["test_acc"],
            "test_acc_max_over_epochs": max(h["test_acc"] for h in history)}


def train_linear_head(head: nn.Linear, train: Split, evals: dict[str, Split], epochs: int, lr: float,
                      batch_size: int, seed: int, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Fit ``head`` on fixed features with Adam + per-epoch cosine LR; after each epoch record
    ``<name>_acc`` for every split in ``evals`` (tensors on the head's device). Returns the history."""
    x, y = train
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        head.train()
        lr_now, total = opt.param_groups[0]["lr"], 0.0
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            idx = idx.to(y.device)
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        head.eval()
        with torch.no_grad():
            accs = {f"{name}_acc": top1_accuracy(head(fx), fy) for name, (fx, fy) in evals.items()}
        history.append({"epoch": epoch, "train_loss": total / len(y), "lr": lr_now, **accs})
        if on_epoch is not None:
            on_epoch(history[-1])
    return history


def reported_epochs(epochs: int, max_reports: int = MAX_REPORTS) -> set[int]:
    """The epochs (1-based) whose metrics go to Ray Train: evenly spaced, the last always included.
    A pure function of the epoch count, so every rank reports the same epochs."""
    step = -(-epochs // max(1, max_reports))
    return {e for e in range(1, epochs + 1) if e % step == 0 or e == epochs}


def _reporter(report: Callable[[dict[str, Any]], None], epochs: int) -> Callable[[dict[str, Any]], None]:
    chosen = reported_epochs(epochs)
    return lambda metrics: report(metrics) if metrics["epoch"] in chosen else None


# ----- worker side -----


def _decode_split(index: FolderIndex, spec: DecodeSpec) -> tuple[Split, list[str]]:
    """Decode every image of ``index`` with a few threads (PIL decodes outside the GIL); unreadable files are skipped."""
    def one(rel: str) -> np.ndarray | None:
        try:
            return decode_image((index.root / rel).read_bytes(), spec)
        except Exception:  # noqa: BLE001 - any unreadable file is skipped and listed in the results
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(one, index.paths))
    ok = [i for i, im in enumerate(images) if im is not None]
    skipped = [str(index.root.name + "/" + index.paths[i]) for i, im in enumerate(images) if im is None]
    if not ok:
        raise UserError(f"no readable image in {index.root}")
    return (np.stack([images[i] for i in ok]), index.labels[ok].astype(np.int64)), skipped


def _build_classifier(cfg: EvalConfig, num_classes: int) -> Surrogate:
    """The backbone (checkpoint or seeded random init) under a fresh, seeded ``num_classes`` head."""
    if cfg.checkpoint is None:
        return build_model(ModelSpec(cfg.arch, num_classes, cfg.small_input), seed=cfg.seed)
    model = load_backbone(cfg.checkpoint, cfg.arch, cfg.small_input, num_classes)
    with seeded(cfg.seed):
        model.net.fc.reset_parameters()
    return model


class _Worker:
    """This worker's view of the run: rank, device, and the collectives that are no-ops on one worker."""

    def __init__(self, rank: int, world: int, device: torch.device, in_train: bool = False) -> None:
        self.rank, self.world, self.device, self.in_train = rank, world, device, in_train
        self.cuda = device.type == "cuda"

    @classmethod
    def of_train_worker(cls) -> _Worker:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), in_train=True)

    @classmethod
    def this_process(cls, use_gpu: bool) -> _Worker:
        if use_gpu and not torch.cuda.is_available():
            raise UserError("use_gpu with num_workers 0 evaluates in this process, which sees no CUDA device; "
                            "run it on a GPU node or use num_workers >= 1 (Ray Train places the worker on a GPU)")
        return cls(0, 1, torch.device("cuda" if use_gpu else "cpu"))

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` on this worker's device, wrapped in DDP by Ray Train when there are several workers."""
        if not self.in_train:  # num_workers 0: this process, no Train context
            return model.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def shard(self, n: int) -> torch.Tensor:
        return torch.arange(self.rank, n, self.world)

    def gather_rows(self, idx: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Every worker's ``rows`` (at positions ``idx``) assembled into one ``n``-row tensor on all workers."""
        if self.world == 1:
            return rows
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, (idx, rows.cpu()))
        out = torch.empty(n, *rows.shape[1:], dtype=rows.dtype)
        for i, r in parts:
            out[i] = r
        return out.to(rows.device)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda)


def _features(model: Surrogate, images: torch.Tensor, w: _Worker, batch_size: int) -> torch.Tensor:
    """Frozen-backbone features of every image, each worker computing its shard."""
    idx = w.shard(len(images))
    out = []
    with torch.inference_mode(), w.autocast():
        for part in idx.split(batch_size):
            out.append(model.features(to_model_input(images[part.to(images.device)], channels_last=w.cuda)).float())
    rows = torch.cat(out) if out else torch.empty(0, model.feature_dim, device=w.device)
    return w.gather_rows(idx, rows, len(images))


def _accuracy(model: Surrogate, split: tuple[torch.Tensor, torch.Tensor], w: _Worker, batch_size: int) -> float:
    """Top-1 of ``model`` in eval mode on ``split``, each worker scoring its shard."""
    images, labels = split
    correct = 0.0
    model.eval()
    with torch.inference_mode(), w.autocast():
        for part in w.shard(len(labels)).split(batch_size):
            part = part.to(images.device)
            correct += (model(to_model_input(images[part], channels_last=w.cuda)).argmax(1) == labels[part]).sum().item()
    total_correct, = w.sum([correct])
    return total_correct / len(labels)


# BatchNorm in training mode needs two values per channel: a batch of one image raises "Expected more than 1
# value per channel when training". Full finetuning steps on full batches only, as pretraining does
# (loops.train_one_epoch): a short last batch is left for the next epoch's reshuffle. A worker's shard smaller
# than one batch trains as one batch, and it must hold MIN_TRAIN_BATCH images.
MIN_TRAIN_BATCH = 2


def _finetune(model: Surrogate, train: Split, evals: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: EvalConfig, w: _Worker,
              on_epoch: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Train the whole network (DDP over workers) on augmented ``train`` batches; score ``evals`` each epoch."""
    from dp4tl_ray.data.transforms import finetune_augment

    lr, epochs = cfg.recipe
    images, labels = train
    ddp = w.prepare(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    order_gen = torch.Generator().manual_seed(cfg.seed)  # the same epoch order on every worker
    aug_gen = torch.Generator().manual_seed(cfg.seed * 1000 + w.rank)
    usable = len(labels) - len(labels) % w.world  # equal shards, so every worker takes the same number of steps
    per_worker = usable // w.world
    if per_worker < MIN_TRAIN_BATCH:
        raise UserError(f"full finetuning needs at least {MIN_TRAIN_BATCH} training images per worker; {cfg.task} "
                        f"leaves {per_worker} for each of {w.world} (lower val_fraction or num_workers)")
    step = min(cfg.batch_size, per_worker)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        lr_now, loss_sum, seen = opt.param_groups[0]["lr"], 0.0, 0
        mine = torch.randperm(len(labels), generator=order_gen)[:usable][w.rank::w.world]
        for idx in mine.split(step):
            if len(idx) < step:  # full batches only; every worker skips it alike (equal shards)
                continue
            idx = idx.numpy()
            batch = finetune_augment({"image": images[idx]}, cfg.image_size, generator=aug_gen)["image"]
            x = to_model_input(torch.from_numpy(batch), w.device, non_blocking=True, channels_last=w.cuda)
            y = torch.from_numpy(labels[idx]).to(w.device)
            with w.autocast():
                loss = nn.functional.cross_entropy(ddp(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
        sched.step()
        loss_sum, seen = w.sum([loss_sum, seen])
        accs = {f"{name}_acc": _accuracy(model, split, w, cfg.batch_size) for name, split in evals.items()}
        history.append({"epoch": epoch, "train_loss": loss_sum / seen, "lr": lr_now, **accs})
        on_epoch(history[-1])
    return history


def _eval_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train loop: :func:`_run_eval` on this worker, every epoch reported to Ray Train."""
    import ray.train

    return _run_eval(config, _Worker.of_train_worker(), ray.train.report)


def _run_eval(config: dict[str, Any], w: _Worker, report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Decode the task, build the model, run LP or FF, ``report`` every epoch; rank 0 writes the JSON."""
    start = time.perf_counter()
    cfg = EvalConfig(**config["cfg"])
    lr, epochs = cfg.recipe
    train_index, test_index = task_indexes(cfg.task_dir)
    spec = cfg.decode_spec()
    (train_x, train_y), skipped = _decode_split(train_index, spec)
    test, skipped_test = _decode_split(test_index, spec)
    fit_idx, val_idx = stratified_split(train_y, cfg.val_fraction, cfg.seed, train_index.classes)
    fit = (train_x[fit_idx], train_y[fit_idx])
    evals = {name: (torch.from_numpy(x).to(w.device), torch.from_numpy(y).to(w.device))
             for name, (x, y) in (("val", (train_x[val_idx], train_y[val_idx])), ("test", test))}
    model = _build_classifier(cfg, len(train_index.classes)).to(w.device)
    if w.cuda:
        model = model.to(memory_format=torch.channels_last)
    if cfg.mode == "lp":
        model.eval()
        feats = {name: (_features(model, x, w, cfg.batch_size), y) for name, (x, y) in evals.items()}
        fit_x = torch.from_numpy(fit[0]).to(w.device)
        train_feats = (_features(model, fit_x, w, cfg.batch_size), torch.from_numpy(fit[1]).to(w.device))
        history = train_linear_head(model.net.fc, train_feats, feats, epochs, lr, cfg.batch_size, cfg.seed,
                                    _reporter(report, epochs))
    else:
        history = _finetune(model, fit, evals, cfg, w, _reporter(report, epochs))

    results = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("lr", "epochs", "out", "storage_path")},
        "task": cfg.task, "lr": lr, "epochs": epochs, "resize_size": spec.resize,
        "checkpoint_sha256": config["checkpoint_sha256"], "device": str(w.device), "world_size": w.world,
        "classes": list(train_index.classes), "num_train": len(fit_idx), "num_val": len(val_idx),
        "num_test": len(test[1]), "skipped": skipped + skipped_test,
        "selection": SELECTION, **select_epoch(history), "test_acc_max_over_epochs_note": TEST_MAX_NOTE,
        "history": history, "seconds": round(time.perf_counter() - start, 3),
    }
    if w.rank == 0:
        atomic.write_json(config["out"], results)
    return results


def _loop_config(cfg: EvalConfig) -> dict[str, Any]:
    sha = atomic.sha256_file(cfg.checkpoint) if cfg.checkpoint else None
    # Workers may run elsewhere (another cwd or node): hand them absolute paths.
    paths = {"task_dir": str(Path(cfg.task_dir).resolve()),
             "checkpoint": cfg.checkpoint and str(Path(cfg.checkpoint).resolve())}
    return {"cfg": {**asdict(cfg), **paths}, "checkpoint_sha256": sha, "out": str(cfg.out_path().resolve())}


def eval_trainer(cfg: EvalConfig, callbacks: list | None = None):
    """The validated ``TorchTrainer`` of ``cfg``; ``fit().return_value`` is the results dict. Every epoch's
    metrics reach ``callbacks`` (``ray.train.UserCallback``, or Tune's report callback in a sweep)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg.validate()
    config = _loop_config(cfg)
    # A stable name (no timestamp): the same evaluation lands in the same run directory.
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return TorchTrainer(
        _eval_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=f"eval-{cfg.task}-{cfg.mode}-{key}", storage_path=cfg.storage_path, callbacks=callbacks),
    )


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run ``cfg`` and return its results (also written to ``cfg.out_path()``): on Ray Train workers, or
    with ``num_workers=0`` in this process - no Train run, so it also works inside a Tune trial (a
    sweep), where Ray Train's own local mode refuses ``ray.train.get_context``."""
    if cfg.num_workers == 0:
        cfg.validate()
        return _run_eval(_loop_config(cfg), _Worker.this_process(cfg.use_gpu), report=lambda metrics: None)
    return eval_trainer(cfg).fit().return_value


__all__ = ["EvalConfig", "eval_trainer", "evaluate", "reported_epochs", "select_epoch", "stratified_split", "task_indexes", "top1_accuracy",
           "train_linear_head"]
