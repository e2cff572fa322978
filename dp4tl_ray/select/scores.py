"""EL2N and GraNd per-image scores (Paul et al., NeurIPS 2021, "Deep Learning on a Data Diet").

One model of the surrogate architecture per seed is trained briefly on the source
(:func:`train_briefly`, on the driver); an actor pool of :class:`ScoreEmbedder` then scores every
decoded source image with each model and averages over the seeds:

- EL2N: ``||softmax(f(x)) - onehot(y)||_2``.
- GraNd: ``||grad_theta CE(f(x), y)||_2`` over all parameters, per sample with ``torch.func``
  (BatchNorm in eval mode); or, with ``grand_params="last"``, over the classifier layer only, whose
  closed form is ``||softmax(f(x)) - onehot(y)|| * sqrt(||h||^2 + 1)`` (``h`` the penultimate
  feature; weight and bias): a cheap variant, one forward pass per image.

The paper computes GraNd at initialisation and EL2N after a few epochs; here both come from the
same briefly trained models (``epochs=0`` scores the models at initialisation).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import read_parquet
from dp4tl_ray.data.decode import DecodeSpec
from dp4tl_ray.data.source import open_source
from dp4tl_ray.errors import UserError
from dp4tl_ray.pool import InferencePool
from dp4tl_ray.models import ModelSpec, Surrogate, build_model, to_model_input

if TYPE_CHECKING:
    import ray.data

SCORES_FILE = "scores.parquet"
SCHEMA = pa.schema([("id", pa.int64()), ("el2n", pa.float32()), ("grand", pa.float32())])
GRAND_PARAMS = ("all", "last")
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
SHUFFLE_BUFFER_BATCHES = 8  # local shuffle buffer of the training stream, in batches
GRAD_CHUNK = 16  # samples whose full per-sample gradients are held at once (memory: GRAD_CHUNK x model size)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_briefly(
    source_ds: ray.data.Dataset, spec: ModelSpec, epochs: int, seed: int, batch_size: int = 128, lr: float = 0.1
) -> Surrogate:
    """A model of ``spec`` trained ``epochs`` epochs on the decoded ``id, label, image`` stream.

    Plain SGD (momentum 0.9, weight decay 5e-4, constant ``lr``) on cross-entropy, random horizontal
    flips as the only augmentation, on the driver (CUDA if present). The initial weights, flips and
    shuffle are seeded; the order in which Ray delivers blocks may still vary between runs.
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise UserError(f"need epochs >= 0, batch_size >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    device = _device()
    model = build_model(spec, seed).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    rng = torch.Generator().manual_seed(seed)  # draws the flips and each epoch's shuffle seed
    for _ in range(epochs):
        batches = source_ds.iter_torch_batches(
            batch_size=batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size,
            local_shuffle_seed=int(torch.randint(2**31 - 1, (), generator=rng)), device="cpu",
        )
        for batch in batches:
            y = batch["label"].to(device, torch.long)
            if y.shape[0] < 2:  # BatchNorm cannot train on a single sample
                continue
            x = to_model_input(batch["image"], device, non_blocking=True)
            flip = (torch.rand(y.shape[0], generator=rng) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval().cpu()


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


def sample_scores(model: Surrogate, x: torch.Tensor, labels: torch.Tensor, grand_params: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """``(el2n, grand)`` of each image in ``x`` (floats in [0, 1]) under ``model`` in eval mode."""
    with torch.no_grad():
        h = model.features(x)
        score = el2n(model.net.fc(h), labels)
    if grand_params == "last":  # d CE / d(W, b) = (p - y) (h, 1)^T, so its norm factorises
        return score, score * torch.sqrt(h.float().pow(2).sum(dim=1) + 1)
    return score, grand_all(model, x, labels)


class ScoreEmbedder:
    """Ray Data callable class: ``id, label, image`` batches -> ``id, el2n, grand`` averaged over models.

    ``states`` is the list of the seed models' ``net`` state dicts, or an ObjectRef to it (Ray Data
    passes constructor kwargs as they are, so the actor fetches the ref here).
    """

    def __init__(self, spec: ModelSpec, states: Any, grand_params: str = "all", torch_threads: int = 1):
        import ray

        if isinstance(states, ray.ObjectRef):
            states = ray.get(states)
        self.device = _device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, torch_threads))
        self.models = []
        for state in states:
            model = build_model(spec, seed=None)
            model.net.load_state_dict(state)
            self.models.append(model.eval().to(self.device))
        self.grand_params = _checked_grand_params(grand_params)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = np.require(batch["image"], requirements=["C", "W"])  # Ray batches are read-only: copy if so
        x = to_model_input(torch.from_numpy(image), self.device, non_blocking=True)
        y = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64)).to(self.device)
        el2ns, grands = zip(*(sample_scores(m, x, y, self.grand_params) for m in self.models))
        return {"id": np.asarray(batch["id"], dtype=np.int64), "el2n": _mean(el2ns), "grand": _mean(grands)}


def _mean(per_model: tuple[torch.Tensor, ...]) -> np.ndarray:
    return torch.stack(per_model).mean(dim=0).cpu().numpy().astype(np.float32)


def score_dataset(
    ds: ray.data.Dataset, spec: ModelSpec, states: list[dict[str, torch.Tensor]], batch_size: int = 64,
    num_actors: int | None = None, grand_params: str = "all",
) -> pa.Table:
    """Scores of every row of the decoded ``ds`` under the models ``states``, sorted by id.

    The pool has one actor per GPU, else ``CPUs - 1`` actors (one CPU left for the decode tasks).
    """
    import ray

    if not states:
        raise UserError("need at least one trained model (seed) to score with")
    if batch_size < 1 or (num_actors is not None and num_actors < 1):
        raise UserError(f"batch_size and num_actors must be >= 1, got {batch_size} and {num_actors}")
    _checked_grand_params(grand_params)
    pool = InferencePool.plan(num_actors)
    scored = ds.map_batches(
        ScoreEmbedder,
        # One ObjectRef instead of the weights themselves keeps the UDF small (Ray warns above 1 MiB).
        fn_constructor_kwargs={"spec": spec, "states": ray.put(states), "grand_params": grand_params,
                               "torch_threads": pool.threads},
        batch_size=batch_size,
        batch_format="numpy",
        **pool.map_batches_kwargs(),
    )
    tables = [t for t in ray.get(scored.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise UserError("no readable image to score: the decoded source is empty")
    return pa.concat_tables([t.select(SCHEMA.names).cast(SCHEMA) for t in tables]).sort_by("id")


def compute_scores(
    source_path: str | os.PathLike, spec: ModelSpec, decode_spec: DecodeSpec, epochs: int = 2,
    seeds: tuple[int, ...] = (0, 1), batch_size: int = 64, num_actors: int | None = None,
    out: str | os.PathLike | None = None, grand_params: str = "all", lr: float = 0.1, rows_per_block: int = 256,
) -> pa.Table:
    """EL2N and GraNd of every readable source image (``id, el2n, grand``, sorted by id).

    Trains one model per seed (``batch_size`` for training and scoring alike), scores the source on
    an actor pool, and with ``out`` writes ``out/scores.parquet`` atomically, its provenance in the
    schema metadata. Unreadable images are absent from the table.
    """
    source = open_source(source_path)
    if spec.num_classes < len(source.classes):
        raise UserError(f"model has {spec.num_classes} classes but the source has {len(source.classes)}; raise num_classes")
    if not seeds:
        raise UserError("give at least one seed: scores are averaged over one model per seed")
    _checked_grand_params(grand_params)
    ds = source.decoded(decode_spec, rows_per_block)
    states = [train_briefly(ds, spec, epochs, s, batch_size, lr).net.state_dict() for s in seeds]
    table = score_dataset(ds, spec, states, batch_size, num_actors, grand_params)
    provenance = {"spec": asdict(spec), "decode": asdict(decode_spec), "epochs": epochs, "seeds": list(seeds),
                  "lr": lr, "batch_size": batch_size, "grand_params": grand_params,
                  "source": str(source_path), "source_fingerprint": source.fingerprint}
    table = table.replace_schema_metadata({"dp4tl_scores": json.dumps(provenance, sort_keys=True)})
    if out is not None:
        with atomic.file_path(Path(out) / SCORES_FILE) as tmp:
            pq.write_table(table, tmp)
    return table


def read_scores(file: str | os.PathLike) -> pa.Table:
    """A ``scores.parquet`` written by :func:`compute_scores` (``id, el2n, grand``); a damaged one is one line."""
    fix = f"delete {file} and select again (the scores are recomputed), or pass another --scores"
    return read_parquet(file, fix, SCHEMA.names)


def _checked_grand_params(grand_params: str) -> str:
    if grand_params not in GRAND_PARAMS:
        raise UserError(f"grand_params must be one of {', '.join(GRAND_PARAMS)}, got {grand_params!r}")
    return grand_params
