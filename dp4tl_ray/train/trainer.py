"""Ray Train wiring for pretraining on a keep-set: one ``TorchTrainer`` for every mode.

Resuming is Train V2's: a run restarted with the same ``out`` (storage path) and ``name`` picks up
its latest checkpoint (``ray.train.get_checkpoint()`` in the loop), so run names never contain
timestamps. Worker failures are retried from the latest checkpoint up to ``max_failures`` times.
The run's settings are :class:`~dp4tl_ray.train.pretrain_config.PretrainConfig` (importable from
here too), its checkpoints :mod:`~dp4tl_ray.train.checkpoints`, the workers' loop :mod:`~dp4tl_ray.train.loops`.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dp4tl_ray.atomic import is_uri
from dp4tl_ray.errors import UserError
from dp4tl_ray.train.checkpoints import MODEL_FILE, TrainState, check_resume, latest_checkpoint
from dp4tl_ray.train.epoch_progress import epoch_lines
from dp4tl_ray.train.pretrain_config import MODES, PretrainConfig

log = logging.getLogger(__name__)


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
        return None if self.checkpoint is None else str(Path(self.checkpoint) / MODEL_FILE)


CACHE_STORE_FRACTION = 0.25  # cache_decoded=auto: at most this share of the object store holds the cache


def decoded_bytes(cfg: PretrainConfig, images: int) -> int:
    """Object-store bytes of ``images`` decoded training rows (uint8 image + id + label)."""
    return images * (train_decode_spec(cfg).bytes_per_image() + 12)


def train_decode_spec(cfg: PretrainConfig):
    """Training decodes without the centre crop: the shorter side resized to ``resize_size``, the
    whole image kept for RandomResizedCrop (extraction and evaluation centre-crop)."""
    from dp4tl_ray.data.decode import DecodeSpec

    return DecodeSpec.for_size(cfg.image_size, cfg.resize_size, crop=False)


def decode_cache_fits(cfg: PretrainConfig, images: int, store_bytes: float) -> bool:
    """Whether to decode ``images`` once and cache them: forced by ``cache_decoded``, or (auto) when
    they fit :data:`CACHE_STORE_FRACTION` of an object store of ``store_bytes``."""
    if cfg.cache_decoded != "auto":
        return cfg.cache_decoded == "true"
    return decoded_bytes(cfg, images) <= CACHE_STORE_FRACTION * store_bytes


def use_decode_cache(cfg: PretrainConfig, images: int) -> bool:
    """:func:`decode_cache_fits` in the running cluster's object store. A sweep decides this once, from
    the dense size, and forces it on every run (the same data path for dense and pruned runs)."""
    import ray

    return decode_cache_fits(cfg, images, float(ray.cluster_resources().get("object_store_memory", 0)))


def augmented_dataset(decoded, cfg: PretrainConfig):
    """The per-mode augmentation stage over decoded rows (Ray Data CPU tasks, fresh draws each epoch)."""
    from dp4tl_ray.data.transforms import augment_batch

    return decoded.map_batches(augment_batch, fn_kwargs=cfg.augment_kwargs(), batch_size=cfg.rows_per_block, num_cpus=1)


def training_dataset(cfg: PretrainConfig):
    """Source rows -> kept rows (filtered before decoding) -> decode, lazily, plus the kept classes.

    :func:`pretrain` then either streams it (read -> filter -> decode -> augment, re-run every epoch)
    or, when the decoded keep-set fits the object store (``cache_decoded``), decodes it once
    (``materialize``); each worker then reads its share once and augments it itself every epoch
    (:mod:`~dp4tl_ray.train.memory_shard`). Small and pruned sources (the
    demo, the benchmarks, CIFAR-scale data) fit; ImageNet at 224 px (~150 KB an image decoded,
    ~190 GB for 1.28 M images) does not, and streams as before."""
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
    ds = source.decode(rows, train_decode_spec(cfg), cfg.rows_per_block)
    return ds, source, kept_classes, int(len(kept_ids))


def cached_shards(ds, workers: int) -> list[list]:
    """Each worker's share of the decode cache ``ds`` (materialized), as Arrow block refs: ``workers``
    shares of equal row counts (a remainder of fewer than ``workers`` rows is left out, as Train's own
    equal split does: DDP ranks must step together). The workers ``ray.get`` their share once
    (:meth:`~dp4tl_ray.train.memory_shard.MemoryShard.from_tables`), so a cached run starts no Ray Data
    split (its coordinator and dataset-manager actors cost every run a few CPU-seconds)."""
    parts = ds.split(workers, equal=True) if workers > 1 else [ds]
    return [p.to_arrow_refs() for p in parts]


def decode_once(decoded):
    """The decode cache: ``decoded`` (from :func:`training_dataset`) materialized in the object store."""
    from dp4tl_ray.data.cpu_view import drop_stale_no_cpu_warning

    drop_stale_no_cpu_warning()  # materialize checks Ray's resource view, which may still count its own decode tasks
    return decoded.materialize()


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
    run and training would hang waiting for its first batch. On a cluster a job attached to
    (``RAY_ADDRESS``: KubeRay, the cluster launcher) an autoscaler may still add the missing GPU or
    CPU nodes - workers scale from zero there - so a shortfall is logged, not refused."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    problem = None
    if cfg.use_gpu and gpus < cfg.num_workers:
        problem = f"{cfg.num_workers} GPU workers asked but the cluster has {gpus:g} GPUs; lower num_workers"
    elif cpus - cfg.num_workers * cfg.cpus_per_worker < 1:
        problem = (f"{cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPUs leave "
                   f"{cpus - cfg.num_workers * cfg.cpus_per_worker:g} of the cluster's {cpus:g} CPUs for data "
                   "loading; leave at least 1 (lower num_workers or cpus_per_worker)")
    if problem is None:
        return
    if os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):
        log.warning("%s - waiting for the autoscaler to add nodes", problem)
        return
    raise UserError(problem)


def check_one_batch_per_worker(images: int, cfg: PretrainConfig) -> None:
    """Refuse a keep-set that cannot fill one batch on every worker: every step takes a full batch
    (:func:`~dp4tl_ray.train.loops.train_one_epoch`), so such a run would train nothing."""
    workers = max(1, cfg.num_workers)
    if images < cfg.batch_size * workers:
        raise UserError(f"the run keeps {images} images, fewer than one batch per worker ({cfg.batch_size} x {workers} "
                        "workers); lower pretrain.batch_size or num_workers, or prune less")


def pretrain(cfg: PretrainConfig, callbacks: list | None = None, progress: str | None = None) -> PretrainResult:
    """Fit (or resume) the run ``cfg.out/cfg.name`` and return its latest checkpoint and metrics.

    A run whose checkpoint already holds all ``cfg.epochs`` is returned as is, without starting
    Ray Train. ``callbacks`` reach Ray Train's ``RunConfig`` (e.g. Tune's report callback in a sweep).
    ``progress``: the stage name under which the driver prints a line per epoch (None: no lines)."""
    from dp4tl_ray.train.loops import RunFacts

    cfg.validate()
    _check_cluster_fits(cfg)
    decoded, source, kept_classes, images = training_dataset(cfg)
    check_one_batch_per_worker(images, cfg)
    storage = cfg.out if is_uri(cfg.out) else str(Path(cfg.out).resolve())
    if cfg.num_workers == 0 and is_uri(storage):
        raise UserError("local mode (num_workers=0) keeps checkpoints on this machine; give a local --out")
    run_dir = f"{storage}/{cfg.name}" if is_uri(storage) else str(Path(storage) / cfg.name)
    done_epochs = 0
    if not is_uri(storage):  # refuse early (not inside a worker, not retried) a resume under other settings
        path = latest_checkpoint(run_dir)
        if path is not None:
            state = TrainState.read(path)
            check_resume(state, cfg)
            if state.epoch >= cfg.epochs:
                log.info("run %s already finished (%d epochs): reusing %s", cfg.name, state.epoch, path)
                return PretrainResult(run_dir=run_dir, checkpoint=str(path), metrics=dict(state.history[-1]),
                                      history=list(state.history), kept_classes=kept_classes, images=images, seconds=0.0)
            log.info("resuming run %s from epoch %d", cfg.name, state.epoch)
            done_epochs = state.epoch
    cached, cache_s = use_decode_cache(cfg, images), 0.0
    if cached:  # workers read their share once and augment it themselves every epoch
        t0 = time.perf_counter()
        cache = decode_once(decoded)  # freed when this function returns (the driver owns the blocks)
        cache_s = time.perf_counter() - t0
        log.info("decoded %d kept images into the object store in %.1fs", cache.count(), cache_s)
        ds, shards = None, cached_shards(cache, cfg.num_workers)
    else:  # read -> filter -> decode -> augment, a Ray Data execution per epoch
        ds, shards = augmented_dataset(decoded, cfg), None
    facts = RunFacts(kept_classes=kept_classes, num_source_classes=len(source.classes), run_dir=run_dir)
    # Local mode (no workers) runs no Train callbacks: its epochs print nothing.
    lines = epoch_lines(progress, cfg.epochs, done_epochs) if progress and cfg.num_workers else nullcontext()
    with lines as forward:
        result, seconds = _fit(cfg, storage, facts, ds, (callbacks or []) + ([forward] if forward else []), shards)
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    return PretrainResult(run_dir=run_dir, checkpoint=ckpt, metrics=dict(result.metrics or {}), history=list(result.return_value or []),
                          kept_classes=kept_classes,
                          images=images, seconds=seconds, cache_s=cache_s, cached=cached)


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's controller polls its workers this often (default 2 s)


def controller_poll_s(num_workers: int) -> float:
    """How often a run's Train controller polls its workers. Each start-up step and the end of the run
    wait for a poll, which at Ray's 2 s added ~3 s to every run (a sweep of 75 small trials: 4 minutes);
    a poll is one call per worker, so it slows with the worker count back to Ray's default at 40."""
    return min(2.0, max(0.25, 0.05 * num_workers))


_poll_we_set: str | None = None  # the value this process put in POLL_ENV (a user's own value is left alone)


def _set_controller_poll(num_workers: int) -> None:
    global _poll_we_set
    current = os.environ.get(POLL_ENV)
    if current is None or current == _poll_we_set:
        _poll_we_set = os.environ[POLL_ENV] = str(controller_poll_s(num_workers))


def _fit(cfg: PretrainConfig, storage: str, facts, ds, callbacks: list, shards: list[list] | None = None):
    """Build the TorchTrainer of the run and fit it: its result and the fit's wall seconds. The workers
    stream ``ds`` (a Ray Dataset), or with a cached keep-set (``ds`` None) read ``shards``. The
    controller's poll interval is :func:`controller_poll_s` unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
    is set (Ray Train passes the variable on to the controller it starts)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dp4tl_ray.train.loops import loop_config, train_loop_per_worker

    _set_controller_poll(cfg.num_workers)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, facts, shards),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             callbacks=callbacks or None),
        datasets=None if ds is None else {"train": ds},
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    return result, time.perf_counter() - t0


__all__ = ["CACHE_STORE_FRACTION", "MODES", "POLL_ENV", "controller_poll_s", "PretrainConfig", "PretrainResult", "augmented_dataset", "cached_shards", "decode_cache_fits", "decode_once",
           "decoded_bytes", "pretrain", "source_labels", "train_decode_spec", "training_dataset", "use_decode_cache"]
