"""Surrogate feature extraction with Ray Data, and the FeatureStore it writes.

Pipeline: index/shards -> an actor pool of :class:`ExtractWorker` -> parquet parts committed by the
actors as they finish (:mod:`dp4tl_ray.parts`), so a killed run resumes where it stopped. On CPU each
actor decodes its own images (:mod:`dp4tl_ray.data.decode`) and runs the model on them: a core does
both, no decoded image crosses the object store, and no decode or write process has to start. On
GPU, CPU decode tasks feed one actor per GPU, so the GPU never waits on a decode. Per row the store
holds ``id, label, feature`` (L2-normalised penultimate feature), ``topk_idx, topk_logit``.
The store is content-addressed: its ``store_key`` hashes everything the rows depend on, so a
second run on unchanged inputs reuses it and a changed input rebuilds it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dp4tl_ray import atomic
from dp4tl_ray.data.decode import DecodeSpec, decode_batch
from dp4tl_ray.data.device_decode import decode_batch_on_device
from dp4tl_ray.data.source import open_source
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import MANIFEST, FeatureStore, feature_table
from dp4tl_ray.parts import PartStaging, commit_part, commit_skips, discard_staging, part_rows
from dp4tl_ray.pool import InferencePool
from dp4tl_ray.progress import EVERY_S, Progress, say

if TYPE_CHECKING:
    from dp4tl_ray.model_spec import ModelSpec

log = logging.getLogger(__name__)
STORE_FORMAT = 1
JPEG_DECODERS = ("pil", "torchvision")


class SurrogateEmbedder:
    """Ray Data callable class: ``id, label, image`` uint8 batches -> feature rows (a pyarrow Table).

    On GPU it runs bf16 autocast with channels_last; on CPU fp32 with ``torch_threads`` threads.
    Without a ``classifier`` (a self-supervised checkpoint: a backbone only) rows hold no top-k.
    """

    def __init__(self, spec: ModelSpec, checkpoint: str | None, topk: int = 5, seed: int = 0, torch_threads: int = 1,
                 classifier: bool = True):
        import torch

        from dp4tl_ray.models import load_backbone, load_model

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, torch_threads))
        model = load_model(spec, checkpoint, seed) if classifier else load_backbone(checkpoint, spec.arch, spec.small_input)
        model = model.eval().to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.topk = min(topk, spec.num_classes) if classifier else 0

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        torch = self.torch
        from dp4tl_ray.models import to_model_input

        images = batch["image"]  # uint8 NHWC: numpy from a CPU decode, a tensor on our device from decode_batch_on_device
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
        x = to_model_input(images, self.device, non_blocking=True, channels_last=self.device.type == "cuda")
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            feats = self.model.features(x)
            logits = self.model.net.fc(feats) if self.topk else feats[:, :0]
        feats = torch.nn.functional.normalize(feats.float(), dim=1).cpu().numpy()
        top_logit, top_idx = logits.float().topk(self.topk, dim=1)
        return feature_table(batch["id"], batch["label"], feats, top_idx.cpu().numpy(), top_logit.cpu().numpy())


class ExtractWorker(SurrogateEmbedder):
    """Ray Data callable class: one part's rows in, its feature rows committed as a part, ``rows`` out.

    With ``decode`` (CPU pools, or ``jpeg_decoder="torchvision"``) the rows are undecoded (``id,
    label`` and ``path`` or ``image`` bytes) and the actor decodes them itself, ``batch_size`` at a
    time - with PIL, or with ``device_decode`` torchvision's decoder on its own device (nvjpeg on a
    GPU) - handing the unreadable images to ``on_skip``; without it (GPU pools) they come decoded
    from CPU tasks. A part is written by the actor that computed it (temp + rename), so a kill loses
    only the parts in flight."""

    def __init__(self, *, staging: str, batch_size: int, decode: DecodeSpec | None = None, root: str | None = None,
                 on_skip=None, device_decode: bool = False, **embedder):
        super().__init__(**embedder)
        self.staging, self.batch_size = staging, batch_size
        self.decode, self.root, self.on_skip, self.device_decode = decode, root, on_skip, device_decode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tables = []
        for start in range(0, len(batch["id"]), self.batch_size):
            rows = {k: v[start:start + self.batch_size] for k, v in batch.items()}
            if self.device_decode:
                rows = decode_batch_on_device(rows, spec=self.decode, device=self.device, root=self.root,
                                              on_skip=self.on_skip)
            elif self.decode is not None:
                rows = decode_batch(rows, spec=self.decode, root=self.root, on_skip=self.on_skip)
            if len(rows["id"]):
                tables.append(super().__call__(rows))
        if not tables:  # every image of the part was unreadable (and recorded)
            return {"rows": np.zeros(1, dtype=np.int64)}
        return commit_part(pa.concat_tables(tables), staging=self.staging)


@dataclass
class ExtractConfig:
    """One extraction run: which images, which surrogate, how to run the pool."""

    source: str  # an ImageNet-style folder (``train/``) or a directory of parquet shards
    out: str  # the FeatureStore directory
    format: str = "auto"  # folder | parquet | auto (parquet if the dir holds *.parquet)
    class_index: str | None = None  # JSON {class: index}; default: sorted class folders
    arch: str = "resnet18"
    checkpoint: str | None = None  # local weights; None = seeded random init (smoke tests only)
    num_classes: int | None = None  # default: number of source classes
    small_input: bool = False
    image_size: int = 224
    resize_size: int | None = None  # default: image_size * 8/7 (224 -> 256)
    topk: int = 5
    batch_size: int = 128
    num_actors: int | None = None  # default: number of GPUs, else one per CPU (see InferencePool)
    rows_per_block: int = 256  # rows per decode task (where CPU tasks decode; where the actors do, a block is a part)
    decode_in_actors: bool | None = None  # CPU pools: default yes; GPU pools only with jpeg_decoder torchvision
    jpeg_decoder: str = "pil"  # pil (CPU stage) | torchvision (torchvision.io in the model actors: nvjpeg on a GPU)
    seed: int = 0
    mean: tuple[float, ...] | None = None  # default: the checkpoint's, else ImageNet's
    std: tuple[float, ...] | None = None

    def decode_spec(self) -> DecodeSpec:
        return DecodeSpec.for_size(self.image_size, self.resize_size)

    def validate(self) -> None:
        for name in ("topk", "batch_size", "rows_per_block"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_actors is not None and self.num_actors < 1:
            raise UserError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.jpeg_decoder not in JPEG_DECODERS:
            raise UserError(f"jpeg_decoder must be one of {', '.join(JPEG_DECODERS)}, got {self.jpeg_decoder!r}")
        if self.jpeg_decoder != "pil" and self.decode_in_actors is False:
            raise UserError("jpeg_decoder torchvision decodes in the model actors: drop decode_in_actors false")
        self.decode_spec()


def _surrogate_identity(cfg: ExtractConfig, num_source_classes: int) -> tuple[ModelSpec, dict[str, Any]]:
    from dp4tl_ray.model_spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
    from dp4tl_ray.train.pretrain_config import SELF_SUPERVISED_MODES

    base = ModelSpec(cfg.arch, cfg.num_classes or num_source_classes, cfg.small_input, cfg.mean or IMAGENET_MEAN, cfg.std or IMAGENET_STD)
    if cfg.checkpoint:  # torch on the driver only here: a seeded random init needs no model to check
        from dp4tl_ray.models import load_backbone, load_checkpoint, load_model, spec_from_checkpoint

        saved = spec_from_checkpoint(cfg.checkpoint, base)
        # The checkpoint's normalisation wins unless given explicitly: the surrogate sees what it was trained on.
        base = ModelSpec(base.arch, base.num_classes, base.small_input, cfg.mean or saved.mean, cfg.std or saved.std)
        mode = load_checkpoint(cfg.checkpoint).get("mode")  # how it was pretrained (our checkpoints record it)
        classifier = mode not in SELF_SUPERVISED_MODES  # a self-supervised one gives features only (FM, not LM)
        # a checkpoint of another model fails here, on the driver, in one line
        load_model(base, cfg.checkpoint) if classifier else load_backbone(cfg.checkpoint, base.arch, base.small_input)
        ident = {"checkpoint": str(cfg.checkpoint), "checkpoint_sha256": atomic.sha256_file(cfg.checkpoint),
                 "mode": mode, "classifier": classifier}
    else:
        ident = {"checkpoint": None, "random_init_seed": cfg.seed, "mode": None, "classifier": True}
    return base, {"name": cfg.arch, **asdict(base), **ident}


DECODED_PART_BYTES = 256 << 20  # at most this much decoded image data in one actor call (GPU pools)


def extract_features(cfg: ExtractConfig, progress: bool = False) -> FeatureStore:
    """Run the surrogate over ``cfg.source`` and write (or reuse) the FeatureStore at ``cfg.out``, printing
    rows done / total as parts commit. ``progress`` also shows Ray Data's own progress bars (``--verbose``)."""
    import ray

    cfg.validate()
    source = open_source(cfg.source, cfg.format, cfg.class_index)
    classes, n_rows, fingerprint = source.classes, source.num_rows, source.fingerprint
    spec, surrogate = _surrogate_identity(cfg, len(classes))
    decode = cfg.decode_spec()
    key_doc = {"format": STORE_FORMAT, "surrogate": surrogate, "source_fingerprint": fingerprint,
               "decode": asdict(decode), "topk": cfg.topk}
    if cfg.jpeg_decoder != "pil":  # other pixels, other features (PIL stores keep the key they always had)
        key_doc["jpeg_decoder"] = cfg.jpeg_decoder
    store_key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()
    out = Path(cfg.out)
    if (out / MANIFEST).is_file():
        existing = FeatureStore.open(out)
        if existing.manifest.get("store_key") == store_key:
            say(f"extract {out.name}", f"FeatureStore {out} is up to date: reusing its {existing.manifest['num_rows']:,} rows")
            discard_staging(out)  # left over if a run was killed between its rename and its clean-up
            return existing
        log.info("FeatureStore %s is stale (inputs changed): rebuilding", out)
    staging = PartStaging.for_store(out, store_key)
    done = staging.done_ids()  # rows committed, or found unreadable, by a run a kill stopped
    if done.size:
        log.info("Resuming %s: %d of %d rows were extracted or skipped before (%s)", out, done.size, n_rows, staging.path)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    part = part_rows(n_rows, cfg.batch_size)
    # sized for the parts left: a resumed run near its end needs no more actors than it has parts
    device_decode = cfg.jpeg_decoder == "torchvision"
    pool = InferencePool.plan(cfg.num_actors, max_inputs=max(1, -(-(n_rows - done.size) // part)),
                              decodes=cfg.decode_in_actors is not False, gpu_decodes=device_decode)

    # A block of a folder's rows is one part where the actors decode: Ray Data hands an actor whole blocks, so
    # larger ones would leave actors idle on a small source.
    rows = source.rows(part if pool.decodes else cfg.rows_per_block, exclude=done)
    worker = {"spec": spec, "checkpoint": cfg.checkpoint, "topk": cfg.topk, "seed": cfg.seed,
              "torch_threads": pool.threads, "classifier": surrogate["classifier"],
              "staging": str(staging.path), "batch_size": cfg.batch_size}
    record_skips = functools.partial(commit_skips, staging=str(staging.path))  # whichever stage decodes
    if pool.decodes:
        worker.update(decode=decode, root=source.decode_root, on_skip=record_skips, device_decode=device_decode)
        parts = rows
    else:  # a part's decoded images are held at once: bounded in bytes
        parts = source.decode(rows, decode, cfg.rows_per_block, record_skips)
        part = min(part, max(cfg.batch_size, DECODED_PART_BYTES // decode.bytes_per_image()))
    commits = parts.map_batches(ExtractWorker, fn_constructor_kwargs=worker, batch_size=part,
                                **pool.map_batches_kwargs(), batch_format="numpy")
    if done.size < n_rows:  # else a kill came after every part was committed: only the assembly is left
        run, new_rows, t0 = staging.new_run(), 0, time.perf_counter()
        shown = Progress(f"extract {out.name}", total=n_rows, unit="rows", rate_unit="images/s", start=done.size,
                         every_s=EVERY_S, rate_from_first=True)  # ETAs from the parts' pace, not the actors' start
        for commit in commits.iter_rows():
            new_rows += int(commit["rows"])
            staging.record_run(run, time.perf_counter() - t0, new_rows)
            shown.update(done.size + new_rows)
        staging.record_run(run, time.perf_counter() - t0, new_rows)
        shown.finish(done.size + new_rows)
    skipped = staging.skipped()
    files, written = staging.parts(), staging.committed_ids().size  # refused if a row was committed twice
    if written + len(skipped) != n_rows:
        raise RuntimeError(f"extraction lost rows: {written} written + {len(skipped)} skipped != {n_rows} inputs")
    if not files:
        discard_staging(out)
        raise UserError(f"no readable image in {cfg.source}: all {n_rows} files were skipped (see e.g. {skipped[:1]})")
    runs = staging.runs()
    seconds = sum(r["seconds"] for r in runs)  # the work behind the committed parts, summed over runs
    manifest = {
        "store_key": store_key, "format": STORE_FORMAT, "source": str(cfg.source), "source_format": source.format,
        "source_fingerprint": fingerprint, "surrogate": surrogate, "decode": asdict(decode),
        "dim": pq.read_schema(files[0]).field("feature").type.list_size, "topk": min(cfg.topk, spec.num_classes) if surrogate["classifier"] else 0,
        "num_rows": written,
        "num_inputs": n_rows, "classes": classes, "skipped": skipped, "seconds": round(seconds, 3),
        "images_per_s": round(written / max(seconds, 1e-9), 2), "num_actors": pool.size, "device": "gpu" if pool.gpus else "cpu",
        "decoded_by": ("model actors (torchvision)" if device_decode else "model actors" if pool.decodes
                       else "cpu tasks"),
        "runs": runs, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    staging.assemble(out, manifest)
    return FeatureStore(out, manifest)


__all__ = ["ExtractConfig", "ExtractWorker", "SurrogateEmbedder", "extract_features"]
