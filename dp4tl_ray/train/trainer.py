"""Ray Train wiring for pretraining on a keep-set: one ``TorchTrainer`` for every mode.

Resuming is Train V2's: a run restarted with the same ``out`` (storage path) and ``name`` picks up
its latest checkpoint (``ray.train.get_checkpoint()`` in the loop), so run names never contain
timestamps. Worker failures are retried from the latest checkpoint up to ``max_failures`` times.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dp4tl_ray.errors import UserError

log = logging.getLogger(__name__)
MODES = ("supervised", "moco_v2", "adversarial")


@dataclass
class PretrainConfig:
    """One pretraining run. Defaults are the usual ImageNet recipe; presets scale them down."""

    source: str  # the source images: folder tree or parquet shards
    out: str  # Ray Train storage path (local dir, NFS, or s3://); checkpoints go under out/name
    name: str = "pretrain"  # stable run name: the same out + name resumes
    mode: str = "supervised"  # supervised | moco_v2 | adversarial
    keepset: str | None = None  # KeepSet directory; None = the whole source (dense)
    class_index: str | None = None
    arch: str = "resnet50"
    small_input: bool = False
    image_size: int = 224
    resize_size: int | None = None  # decode resize before the random crop; default image_size * 8/7
    crop_scale_min: float = 0.08  # RandomResizedCrop lower scale (MoCo v2 uses 0.2)
    epochs: int = 90
    batch_size: int = 256  # per worker
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    num_workers: int = 1  # 0 = Ray Train's local mode: the loop runs in this process (debugging, quick tests)
    use_gpu: bool = False
    cpus_per_worker: float = 1  # fractions allowed (e.g. 0.5 to fit 2 workers + data on 2 CPUs)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always checkpoints)
    keep_checkpoints: int = 2
    max_failures: int = 1
    shuffle_buffer: int = 2048  # rows in each worker's local shuffle buffer (0 = off)
    prefetch_batches: int = 2  # batches each worker's data thread runs ahead, across epoch ends
    rows_per_block: int = 256
    # Decode the kept images once and keep them (resized uint8, before augmentation) in the object
    # store for every epoch: "auto" = when they fit CACHE_STORE_FRACTION of it, "true", "false".
    cache_decoded: str = "auto"
    seed: int = 0
    # MoCo v2 (He et al. 2020 / Chen et al. 2020): feature dim, queue size, key momentum, temperature
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.2
    # PGD adversarial training (Madry et al.; the paper's robust pretraining): L-inf eps 3/255, 3 steps
    adv_eps: float = 3 / 255
    adv_steps: int = 3
    adv_norm: str = "linf"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.cpus_per_worker <= 0:
            raise UserError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0 (0 = local mode), got {self.num_workers}")
        for name in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "prefetch_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise UserError(f"max_failures must be >= -1 (-1 = retry forever), got {self.max_failures}")
        if not 0 < self.crop_scale_min <= 1:
            raise UserError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.cache_decoded not in ("auto", "true", "false"):
            raise UserError(f"cache_decoded must be auto, true or false, got {self.cache_decoded!r}")
        if self.adv_norm not in ("linf", "l2"):
            raise UserError(f"adv_norm must be linf or l2, got {self.adv_norm!r}")
        global_batch = self.batch_size * max(1, self.num_workers)
        if self.mode == "moco_v2" and self.moco_k % global_batch:
            raise UserError(f"moco_k={self.moco_k} must be a multiple of batch_size x num_workers = {global_batch}")
        if "/" in self.name or not self.name:
            raise UserError(f"name must be a plain directory name, got {self.name!r}")


@dataclass
class PretrainResult:
    """Where the run's checkpoints are, and its per-epoch metrics (of the last attempt)."""

    run_dir: str
    checkpoint: str | None  # directory holding model.pt / state.pt of the latest checkpoint
    metrics: dict[str, Any]  # the last epoch's
    history: list[dict[str, Any]]  # every epoch's, across resumes
    kept_classes: list[int]
    images: int
    seconds: float  # trainer.fit(): Train start-up, the epochs, checkpoints
    cache_s: float = 0.0  # decoding the kept images into the cache, before fit (0 when streamed)
    cached: bool = False  # whether the decoded images were cached (see training_dataset)

    @property
    def model_path(self) -> str | None:
        from dp4tl_ray.train.loops import MODEL_FILE

        return None if self.checkpoint is None else str(Path(self.checkpoint) / MODEL_FILE)


def augment_batch(batch: dict[str, np.ndarray], *, mode: str, size: int, scale: tuple[float, float]) -> dict[str, np.ndarray]:
    """The mode's augmentation of a decoded batch (fresh random draws every call): a Ray Data UDF on the
    streamed path, called by the worker itself on a cached keep-set.

    It lives here, not in :mod:`dp4tl_ray.data.transforms`, so that the processes which only unpickle
    the dataset plan (Ray Train's dataset manager, the split coordinator) need not import torch and
    torchvision (several seconds each on a busy machine); only the task that augments does."""
    from dp4tl_ray.data import transforms

    if mode == "moco_v2":
        return transforms.moco_v2_augment(batch, size)
    return transforms.supervised_augment(batch, size, scale=scale)


CACHE_STORE_FRACTION = 0.25  # cache_decoded=auto: at most this share of the object store holds the cache


def decoded_bytes(cfg: PretrainConfig, images: int) -> int:
    """Object-store bytes of ``images`` decoded rows (uint8 image + id + label)."""
    return images * (3 * cfg.image_size * cfg.image_size + 12)


def use_decode_cache(cfg: PretrainConfig, images: int) -> bool:
    """Whether to decode once and cache: forced by ``cache_decoded``, or (auto) when the kept images
    fit :data:`CACHE_STORE_FRACTION` of the cluster's object store."""
    if cfg.cache_decoded != "auto":
        return cfg.cache_decoded == "true"
    import ray

    store = float(ray.cluster_resources().get("object_store_memory", 0))
    return decoded_bytes(cfg, images) <= CACHE_STORE_FRACTION * store


def augmented_dataset(decoded, cfg: PretrainConfig):
    """The per-mode augmentation stage over decoded rows (Ray Data CPU tasks, fresh draws each epoch)."""
    kwargs = {"mode": cfg.mode, "size": cfg.image_size, "scale": (cfg.crop_scale_min, 1.0)}
    return decoded.map_batches(augment_batch, fn_kwargs=kwargs, batch_size=cfg.rows_per_block, num_cpus=1)


def training_dataset(cfg: PretrainConfig):
    """Source rows -> kept rows (filtered before decoding) -> decode, lazily, plus the kept classes.

    :func:`pretrain` then either streams it (read -> filter -> decode -> augment, re-run every epoch)
    or, when the decoded keep-set fits the object store (``cache_decoded``), decodes it once
    (``materialize``); each worker then reads its share once and augments it itself every epoch
    (:mod:`~dp4tl_ray.train.memory_shard`). Small and pruned sources (the
    demo, the benchmarks, CIFAR-scale data) fit; ImageNet at 224 px (~150 KB an image decoded,
    ~190 GB for 1.28 M images) does not, and streams as before."""
    from dp4tl_ray.data.decode import DecodeSpec
    from dp4tl_ray.data.source import open_source
    from dp4tl_ray.select.keepset import KeepSet

    source = open_source(cfg.source, "auto", cfg.class_index)
    labels = source_labels(source)
    rows = source.rows(cfg.rows_per_block)
    if cfg.keepset:
        keep = KeepSet.load(cfg.keepset)
        if keep.meta.source_fingerprint not in source.identities:
            raise UserError(f"keep-set {cfg.keepset} was selected on another source (fingerprint differs); re-run `dp4tl select`")
        if len(keep.ids) and keep.ids[-1] >= len(labels):
            raise UserError(f"keep-set {cfg.keepset} holds ids beyond the source's {len(labels)} images")
        kept_ids = keep.ids
        rows = keep.filter(rows)
    else:
        kept_ids = np.arange(len(labels))
    kept_classes = np.unique(labels[kept_ids]).tolist()
    decode = DecodeSpec.for_size(cfg.image_size, cfg.resize_size)
    ds = source.decode(rows, decode, cfg.rows_per_block)
    return ds, source, kept_classes, int(len(kept_ids))


def source_labels(source) -> np.ndarray:
    """Label of every source id (index = id), from the folder index or the shards' label column."""
    from dp4tl_ray.data.imagefolder import FolderIndex

    if isinstance(source.handle, FolderIndex):
        return source.handle.labels
    import pyarrow.parquet as pq

    t = pq.ParquetDataset(source.handle.files).read(columns=["id", "label"]).sort_by("id")
    ids = t.column("id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise UserError(f"shards under {source.path} do not hold ids 0..N-1; re-create them with `dp4tl data shard`")
    return t.column("label").to_numpy()


def _check_cluster_fits(cfg: PretrainConfig) -> None:
    """Refuse a run whose workers would take every CPU: Ray Data's decode tasks would then never
    run and training would hang waiting for its first batch."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    if cfg.use_gpu and gpus < cfg.num_workers:
        raise UserError(f"{cfg.num_workers} GPU workers asked but the cluster has {gpus:g} GPUs; lower num_workers")
    left = cpus - cfg.num_workers * cfg.cpus_per_worker
    if left < 1:
        raise UserError(f"{cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPUs leave {left:g} of the cluster's {cpus:g} "
                        "CPUs for data loading; leave at least 1 (lower num_workers or cpus_per_worker)")


def pretrain(cfg: PretrainConfig, callbacks: list | None = None) -> PretrainResult:
    """Fit (or resume) the run ``cfg.out/cfg.name`` and return its latest checkpoint and metrics.

    A run whose checkpoint already holds all ``cfg.epochs`` is returned as is, without starting
    Ray Train. ``callbacks`` reach Ray Train's ``RunConfig`` (e.g. Tune's report callback in a sweep)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dp4tl_ray.train.loops import STATE_FILE, check_resume_keys, latest_checkpoint, train_loop_per_worker

    cfg.validate()
    _check_cluster_fits(cfg)
    decoded, source, kept_classes, images = training_dataset(cfg)
    spec = {"arch": cfg.arch, "num_classes": len(kept_classes) if cfg.mode != "moco_v2" else cfg.moco_dim,
            "small_input": cfg.small_input}
    loop_cfg = {**asdict(cfg), "spec": spec, "kept_classes": kept_classes, "num_source_classes": len(source.classes),
                "public_config": asdict(cfg)}
    storage = cfg.out if "://" in cfg.out else str(Path(cfg.out).resolve())
    if cfg.num_workers == 0 and "://" in storage:
        raise UserError("local mode (num_workers=0) keeps checkpoints on this machine; give a local --out")
    loop_cfg["local_checkpoints"] = str(Path(storage) / cfg.name / "local")
    run_dir = str(Path(storage) / cfg.name) if "://" not in storage else f"{storage}/{cfg.name}"
    if "://" not in storage:  # refuse early (not inside a worker, not retried) a resume under other settings
        path = latest_checkpoint(run_dir)
        if path is not None:
            import torch

            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
            check_resume_keys(state, loop_cfg, cfg.name)
            if state["epoch"] >= cfg.epochs:
                log.info("run %s already finished (%d epochs): reusing %s", cfg.name, state["epoch"], path)
                return PretrainResult(run_dir=run_dir, checkpoint=str(path), metrics=dict(state["history"][-1]),
                                      history=list(state["history"]), kept_classes=kept_classes, images=images, seconds=0.0)
            log.info("resuming run %s from epoch %d", cfg.name, state["epoch"])
    cached, cache_s = use_decode_cache(cfg, images), 0.0
    if cached:  # workers read their share once and augment it themselves every epoch
        t0 = time.perf_counter()
        ds = decoded.materialize()  # freed when this function returns (the driver owns the blocks)
        cache_s = time.perf_counter() - t0
        log.info("decoded %d kept images into the object store in %.1fs", ds.count(), cache_s)
    else:  # read -> filter -> decode -> augment, a Ray Data execution per epoch
        ds = augmented_dataset(decoded, cfg)
    loop_cfg["in_memory"] = cached
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             callbacks=callbacks),
        datasets={"train": ds},
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    return PretrainResult(run_dir=run_dir, checkpoint=ckpt, metrics=dict(result.metrics or {}), history=list(result.return_value or []),
                          kept_classes=kept_classes,
                          images=images, seconds=seconds, cache_s=cache_s, cached=cached)
