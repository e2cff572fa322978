"""EL2N and GraNd per-image scores as Paul et al. define them (NeurIPS 2021, "Deep Learning on a Data Diet").

- **GraNd at initialisation**: ``||grad_theta CE(f(x), y)||_2`` under freshly initialised models, no
  training. Only the BatchNorm running statistics are set, estimated on a seeded sample of source
  images with the weights frozen (:func:`estimate_bn_statistics`): eval-mode BN on torch's initial
  statistics (mean 0, variance 1) is no normalisation at all, and train-mode BN would make an
  image's gradient depend on the other images of its batch. Estimated statistics keep the gradient
  per-sample and normalise each layer as the network does when it trains.
- **EL2N after a few epochs**: ``||softmax(f(x)) - onehot(y)||_2`` under models trained ``epochs``
  epochs on the whole source, one Ray Train run per seed (:func:`dp4tl_ray.train.trainer.pretrain`,
  supervised, on the workers, GPUs when configured; a killed run resumes from its checkpoint).

Each is the mean over one model per seed (the paper averages 10; :data:`DEFAULT_SEEDS` here). The
source is scored on a Ray Data actor pool (:class:`ScoreEmbedder`). A score's directory holds
``scores.parquet`` (:mod:`dp4tl_ray.select.scores_io`: ``id, <score>`` and, in its metadata, the
settings and the cost, ``scores_seconds`` = building the models + scoring, which every keep-set
that uses it counts).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import read_json
from dp4tl_ray.data.cpu_view import drop_stale_no_cpu_warning
from dp4tl_ray.data.decode import DecodeSpec
from dp4tl_ray.data.source import ImageSource, open_source
from dp4tl_ray.errors import UserError
from dp4tl_ray.models import ModelSpec, Surrogate, build_model, load_model, save_checkpoint, to_model_input
from dp4tl_ray.pool import InferencePool
from dp4tl_ray.select.scores_io import SCORES_FILE, Scores, load_scores, write_scores

if TYPE_CHECKING:
    import ray.data

SCORES = ("el2n", "grand")
RUNS_DIR = "runs"  # EL2N: the Ray Train runs, one per seed
INIT_DIR = "init"  # GraNd: the models at initialisation with their estimated BN statistics
DEFAULT_SEEDS = (0, 1, 2, 3)
GRAND_PARAMS = ("all", "last")
BN_SAMPLE_SEED = 0  # draws the images that estimate BN statistics: the same for every seed set
GRAD_CHUNK = 16  # samples whose full per-sample gradients are held at once (memory: GRAD_CHUNK x model size)
METHOD = {  # what each score is, in its metadata
    "grand": "GraNd at initialisation (Paul et al. 2021): mean over seeds of the per-sample loss-gradient norm "
             "under the initial weights, BatchNorm statistics estimated on source images",
    "el2n": "EL2N (Paul et al. 2021): mean over seeds of ||softmax - onehot|| after a few epochs of supervised training",
}


@dataclass(frozen=True)
class ScoreConfig:
    """One score's recipe, and where its work runs."""

    score: str  # el2n | grand
    seeds: tuple[int, ...] = DEFAULT_SEEDS  # one model per seed; the score is their mean
    epochs: int = 2  # EL2N: supervised epochs on the whole source (the paper: 20 of 200 on CIFAR-10)
    batch_size: int = 128  # EL2N training (per worker), BN estimation and scoring
    lr: float = 0.1  # EL2N training (the pretraining recipe otherwise: SGD, cosine, RandomResizedCrop + flip)
    grand_params: str = "all"  # GraNd over every parameter, or "last": the classifier only (a cheap variant)
    bn_images: int = 4096  # GraNd: source images (a seeded sample) estimating the BN statistics at init
    num_workers: int = 1  # EL2N: Ray Train workers per run
    use_gpu: bool = False  # EL2N: train on GPUs
    cpus_per_worker: float = 1
    num_actors: int | None = None  # scoring pool: default one actor per GPU, else CPUs - 1
    rows_per_block: int = 256

    def validate(self) -> None:
        if self.score not in SCORES:
            raise UserError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"give at least one seed, each once: the score is the mean over one model per seed (got {list(self.seeds)})")
        if self.grand_params not in GRAND_PARAMS:
            raise UserError(f"grand_params must be one of {', '.join(GRAND_PARAMS)}, got {self.grand_params!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.bn_images < 2:
            raise UserError(f"need epochs >= 1, batch_size >= 1, lr > 0 and bn_images >= 2; got {self.epochs}, "
                            f"{self.batch_size}, {self.lr}, {self.bn_images}")
        if self.num_actors is not None and self.num_actors < 1:
            raise UserError(f"num_actors must be >= 1, got {self.num_actors}")

    def settings(self) -> dict[str, Any]:
        """What the score's values depend on (the cache key); where the work runs is left out,
        except the Train workers, which set EL2N's global batch."""
        common = {"score": self.score, "seeds": list(self.seeds), "batch_size": self.batch_size}
        if self.score == "grand":
            return {**common, "grand_params": self.grand_params, "bn_images": self.bn_images}
        return {**common, "epochs": self.epochs, "lr": self.lr, "num_workers": self.num_workers}

    def dir_name(self) -> str:
        """``scores-<score>-<hash of settings()>``: one directory per distinct score."""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]
        return f"scores-{self.score}-{digest}"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def estimate_bn_statistics(models: Sequence[nn.Module], batches: Iterable[torch.Tensor]) -> int:
    """Set the BatchNorm running statistics of ``models`` to their mean over ``batches`` (float images
    in [0, 1]), the weights untouched; returns the number of batches used.

    Train-mode forward passes without gradients and a cumulative average (``momentum=None``), as
    "precise BN" does; each batch goes through every model, so the images are decoded once."""
    bns = [m for model in models for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    used = 0
    with torch.no_grad():
        for model in models:
            model.train()
        for x in batches:
            if x.shape[0] < 2:  # one image has no variance
                continue
            for model in models:
                model(x)
            used += 1
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    for model in models:
        model.eval()
    return used


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||softmax(logits) - onehot(labels)||_2``."""
    probs = logits.float().softmax(dim=1)
    return (probs - F.one_hot(labels, probs.shape[1])).norm(dim=1)


def grand_all(model: Surrogate, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample norm of the cross-entropy gradient w.r.t. every parameter (``model`` in eval mode)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    def norm(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(sum(g.pow(2).sum() for g in grad(loss)(p, xi, yi).values()))

    return vmap(norm, in_dims=(None, 0, 0), chunk_size=GRAD_CHUNK)(params, x, labels)


def image_scores(model: Surrogate, x: torch.Tensor, labels: torch.Tensor, score: str, grand_params: str = "all") -> torch.Tensor:
    """``score`` of each image in ``x`` (floats in [0, 1]) under ``model`` in eval mode.

    GraNd over the classifier only (``grand_params="last"``) has a closed form: d CE / d(W, b) =
    (p - y) (h, 1)^T, so its norm is ``el2n * sqrt(||h||^2 + 1)`` (``h`` the penultimate feature)."""
    if score == "grand" and grand_params == "all":
        return grand_all(model, x, labels)
    with torch.no_grad():
        h = model.features(x)
        error = el2n(model.net.fc(h), labels)
    return error if score == "el2n" else error * torch.sqrt(h.float().pow(2).sum(dim=1) + 1)


class ScoreEmbedder:
    """Ray Data callable class: ``id, label, image`` batches -> ``id, <score>``, the mean over the
    models saved in ``checkpoints`` (local files every actor reads)."""

    def __init__(self, spec: ModelSpec, checkpoints: list[str], score: str, grand_params: str = "all", torch_threads: int = 1):
        self.device = _device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, torch_threads))
        self.models = [load_model(spec, path).eval().to(self.device) for path in checkpoints]
        self.score, self.grand_params = score, grand_params

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = np.require(batch["image"], requirements=["C", "W"])  # Ray batches are read-only: copy if so
        x = to_model_input(torch.from_numpy(image), self.device, non_blocking=True)
        y = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64)).to(self.device)
        per_model = torch.stack([image_scores(m, x, y, self.score, self.grand_params) for m in self.models])
        return {"id": np.asarray(batch["id"], dtype=np.int64),
                self.score: per_model.mean(dim=0).cpu().numpy().astype(np.float32)}


def score_dataset(ds: ray.data.Dataset, spec: ModelSpec, checkpoints: list[str], cfg: ScoreConfig) -> pa.Table:
    """``id, <cfg.score>`` of every row of the decoded ``ds`` under the models in ``checkpoints``, sorted by id.

    The pool has one actor per GPU, else one single-threaded actor per CPU (``InferencePool``)."""
    import ray

    pool = InferencePool.plan(cfg.num_actors)
    scored = ds.map_batches(
        ScoreEmbedder,
        fn_constructor_kwargs={"spec": spec, "checkpoints": list(checkpoints), "score": cfg.score,
                               "grand_params": cfg.grand_params, "torch_threads": pool.threads},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        **pool.map_batches_kwargs(),
    )
    schema = pa.schema([("id", pa.int64()), (cfg.score, pa.float32())])
    drop_stale_no_cpu_warning()  # to_arrow_refs checks a resource view that may still count finished tasks
    tables = [t for t in ray.get(scored.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise UserError("no readable image to score: the decoded source is empty")
    return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]).sort_by("id")


def _init_checkpoints(ds: ray.data.Dataset, spec: ModelSpec, seeds: list[int], batch_size: int, out_dir: str) -> list[str]:
    """(A Ray task.) Each seed's model at its initial weights, BN statistics estimated on ``ds``,
    saved under ``out_dir``; ``[]`` when no batch of two images could be read."""
    device = _device()
    models = [build_model(spec, seed).to(device) for seed in seeds]
    batches = (to_model_input(b["image"], device, non_blocking=True) for b in ds.iter_torch_batches(batch_size=batch_size, device="cpu"))
    if not estimate_bn_statistics(models, batches):
        return []
    return [str(save_checkpoint(m.cpu(), Path(out_dir) / f"seed{seed}.pt", {"seed": seed, "bn_estimated": True}))
            for m, seed in zip(models, seeds)]


def grand_init_checkpoints(source: ImageSource, spec: ModelSpec, decode: DecodeSpec, cfg: ScoreConfig, out: Path) -> list[str]:
    """GraNd's models: one per seed at initialisation, BN statistics estimated on ``cfg.bn_images``
    source images drawn with :data:`BN_SAMPLE_SEED`, in one Ray task (on a GPU when the cluster has one)."""
    import ray

    from dp4tl_ray.select.keepset import filter_by_ids

    n = min(cfg.bn_images, source.num_rows)
    ids = np.sort(np.random.default_rng(BN_SAMPLE_SEED).choice(source.num_rows, size=n, replace=False))
    ds = source.decode(filter_by_ids(source.rows(cfg.rows_per_block), ids), decode, cfg.rows_per_block)
    ds.context.execution_options.preserve_order = True  # the same batches every run: reproducible statistics
    gpus = InferencePool.plan(1).gpus
    task = ray.remote(_init_checkpoints).options(num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0)
    paths = ray.get(task.remote(ds, spec, list(cfg.seeds), cfg.batch_size, str(out / INIT_DIR)))
    if not paths:
        raise UserError(f"fewer than 2 readable images among the {n} sampled from {source.path} to estimate BatchNorm statistics")
    return paths


def training_seconds(history: list[dict[str, Any]], wall_s: float, trained_now: bool) -> float:
    """What a Train run cost: the wall time of the call that finished it plus the epochs earlier,
    killed attempts had finished (from its history); for a run finished before, without a record,
    the floor: the sum of its epochs."""
    if not trained_now:
        return float(sum(h.get("epoch_s", 0.0) for h in history))
    start = history[-1].get("start_epoch", 0) if history else 0
    return wall_s + float(sum(h.get("epoch_s", 0.0) for h in history if h.get("epoch", 0) <= start))


def el2n_checkpoints(source: ImageSource, spec: ModelSpec, decode: DecodeSpec, cfg: ScoreConfig, out: Path) -> tuple[list[str], list[float]]:
    """EL2N's models: per seed, a supervised Ray Train run of ``cfg.epochs`` on the whole source
    (named ``el2n-seed<s>`` under ``out/runs``, so a killed run resumes); their model files and costs.

    A run's cost is recorded next to it once it finishes, so scoring again later still counts it."""
    from dp4tl_ray.train.trainer import PretrainConfig, pretrain

    paths, seconds = [], []
    for seed in cfg.seeds:
        run = PretrainConfig(source=str(source.path), out=str(out / RUNS_DIR), name=f"el2n-seed{seed}", mode="supervised",
                             arch=spec.arch, small_input=spec.small_input, image_size=decode.size,
                             resize_size=decode.resize, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                             num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
                             rows_per_block=cfg.rows_per_block, seed=seed)
        t0 = time.perf_counter()
        result = pretrain(run)
        cost = out / RUNS_DIR / f"{run.name}.cost.json"
        if result.seconds > 0 or not cost.is_file():
            atomic.write_json(cost, {"train_s": training_seconds(result.history, time.perf_counter() - t0, result.seconds > 0)})
        if result.kept_classes != list(range(len(source.classes))):
            missing = sorted(set(range(len(source.classes))) - set(result.kept_classes))
            raise UserError(f"source {source.path} has no image of class(es) {[source.classes[c] for c in missing[:5]]}; "
                            "remove their folders")
        paths.append(result.model_path)
        seconds.append(read_json(cost, f"delete {cost} and score again (its run is not redone)", ("train_s",))["train_s"])
    return paths, seconds


def compute_scores(source_path: str | os.PathLike, spec: ModelSpec, decode_spec: DecodeSpec, cfg: ScoreConfig,
                   out: str | os.PathLike) -> Scores:
    """``cfg.score`` of every readable source image, written to ``out`` (scores.parquet with its record,
    atomically) and returned; ``out`` already holding this score of this source and surrogate is read
    instead. Unreadable images are absent from the table."""
    cfg.validate()
    source = open_source(source_path)
    if spec.num_classes < len(source.classes):
        raise UserError(f"model has {spec.num_classes} classes but the source has {len(source.classes)}; raise num_classes")
    out = Path(out)
    provenance = json.loads(json.dumps({
        "settings": cfg.settings(), "spec": asdict(spec), "decode": asdict(decode_spec), "source": str(source_path),
        "source_fingerprint": source.fingerprint}))
    if (out / SCORES_FILE).is_file():
        cached = load_scores(out, cfg.score)
        if all(cached.meta.get(k) == v for k, v in provenance.items()):
            return cached
    t0 = time.perf_counter()
    if cfg.score == "grand":
        checkpoints = grand_init_checkpoints(source, spec, decode_spec, cfg, out)
        seconds, extra = {"bn_estimate_s": time.perf_counter() - t0}, {}
        score_spec = spec
    else:
        checkpoints, per_seed = el2n_checkpoints(source, spec, decode_spec, cfg, out)
        seconds = {"train_s": sum(per_seed)}
        extra = {"train_s_per_seed": per_seed, "train": {"num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu}}
        score_spec = ModelSpec(spec.arch, len(source.classes), spec.small_input)  # as pretrain builds it
    t1 = time.perf_counter()
    table = score_dataset(source.decoded(decode_spec, cfg.rows_per_block), score_spec, checkpoints, cfg)
    seconds["score_s"] = time.perf_counter() - t1
    meta = {**provenance, **extra, "method": METHOD[cfg.score], "models": checkpoints, "images": table.num_rows,
            "seconds": seconds, "scores_seconds": sum(seconds.values())}
    return write_scores(out, table, meta)
