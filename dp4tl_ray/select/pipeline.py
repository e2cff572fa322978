"""``dp4tl select``: FeatureStores in, a KeepSet out, for any selection method.

LM and FM rank *units* (source classes / k-means clusters) by downstream votes and drop the lowest
``ratio`` of them; the baselines prune images to the same image budget.

A selection caches itself, as extraction and k-means do: ``cfg.out`` already holding a keep-set
selected from the same inputs (the config but ``out``, the stores' keys, the match keep-set's hash,
the scores file's hash) is returned as it is. The keep-set records what it cost (``extra.costs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dp4tl_ray import atomic
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import FeatureStore
from dp4tl_ray.select.diagnostics import mapping_diagnostics
from dp4tl_ray.select.feature_mapping import class_means_of_store, feature_mapping_image_units, feature_mapping_votes
from dp4tl_ray.select.keepset import META_FILE, KeepSet, KeepSetMeta, keep_ids_for_units
from dp4tl_ray.select.label_mapping import label_mapping_image_units, label_mapping_votes
from dp4tl_ray.select.voting import (
    combine_task_votes,
    kept_units_for_ratio,
    summarize_selection,
    units_to_drop,
)

log = logging.getLogger(__name__)
UNIT_METHODS = ("lm", "fm", "fm-classmean")
IMAGE_METHODS = ("random-image", "moderate", "el2n", "grand")  # prune images to an image budget
METHODS = UNIT_METHODS + ("random-class",) + IMAGE_METHODS


@dataclass
class SelectConfig:
    """One keep-set: method, pruning ratio, the FeatureStores it reads, where it goes."""

    method: str
    ratio: float
    source_features: str  # FeatureStore of the source (from `dp4tl extract`)
    downstream_features: list[str] = field(default_factory=list)  # one FeatureStore per downstream task
    out: str = "keepset"
    seed: int = 0  # tie-breaking, k-means and random baselines
    vote_topk: int = 1  # 1 = hard votes; k > 1 = each image gives 1/k to its top-k units
    runner_up_topk: int = 3  # ties in votes (zero votes, mostly) go to units more often in images' top-k; 0 = off
    k: int | None = None  # FM clusters; default: number of source classes
    kmeans_niter: int = 20
    kmeans_actors: int = 2
    kmeans_gpus_per_actor: float = 0  # > 0: actors assign on a GPU (faiss GPU, else torch CUDA); 0.5 packs 2 per GPU
    spherical: bool = False
    # Image-level baselines keep an image budget: as many images as the keep-set `match` (the method
    # they are compared with), else `keep_fraction` of the images, else 1 - ratio of them.
    match: str | None = None
    keep_fraction: float | None = None
    scores: str | None = None  # EL2N/GraNd: scores.parquet from an earlier run; default: computed and cached
    score_epochs: int = 2  # short training run per seed for EL2N/GraNd
    score_seeds: list[int] = field(default_factory=lambda: [0, 1])

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        units_to_drop(2, self.ratio)  # ratio range check, one line
        if self.vote_topk < 1:
            raise UserError(f"vote_topk must be >= 1, got {self.vote_topk}")
        if not self.downstream_features and self.method in UNIT_METHODS:
            raise UserError("no downstream FeatureStore given; extract the downstream train set and pass it")


def _task_name(store: FeatureStore) -> str:
    src = Path(store.manifest["source"])
    return src.parent.name if src.name in ("train", "training") else src.name


def _check_same_surrogate(source: FeatureStore, downstream: FeatureStore) -> None:
    a, b = source.manifest["surrogate"], downstream.manifest["surrogate"]
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise UserError(f"downstream store {downstream.path} was extracted with another surrogate than the source "
                        f"(differs in {diff}); extract both with the same --arch/--checkpoint")


def _source_ids_labels(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    t = store.read(["id", "label"])
    return t.column("id").to_numpy(), t.column("label").to_numpy()


def kmeans_config(cfg: SelectConfig, source: FeatureStore):
    """The k-means run FM selection uses (k defaults to the number of source classes); its result is
    cached next to the source features, so every ratio of the same (surrogate, k, seed) shares it."""
    from dp4tl_ray.kmeans import KMeansConfig

    return KMeansConfig(k=cfg.k or len(source.manifest["classes"]), niter=cfg.kmeans_niter, seed=cfg.seed,
                        spherical=cfg.spherical, num_actors=cfg.kmeans_actors,
                        num_gpus_per_actor=cfg.kmeans_gpus_per_actor)


def _units(cfg: SelectConfig, source: FeatureStore,
           spent: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str], dict[str, Any]]:
    """Per source row: ``ids, unit``; the unit centres (FM) and names; extra provenance.
    FM adds to ``spent`` its k-means wall seconds here and the k-means run's own recorded seconds."""
    classes = source.manifest["classes"]
    ids, labels = _source_ids_labels(source)
    if cfg.method == "lm":
        return ids, labels, None, list(classes), {}
    if cfg.method == "fm-classmean":
        return ids, labels, class_means_of_store(source, len(classes)), list(classes), {}
    from dp4tl_ray.kmeans import kmeans_distributed, load_assignments

    kcfg = kmeans_config(cfg, source)
    t0 = time.perf_counter()
    result = kmeans_distributed(source.path, kcfg)
    spent.update(kmeans_wall_s=time.perf_counter() - t0, kmeans_s=result.seconds)
    assign = load_assignments(result.out_dir)
    a_ids, clusters = assign.column("id").to_numpy(), assign.column("cluster").to_numpy()
    if not np.array_equal(a_ids, ids):
        raise UserError(f"k-means assignments at {result.out_dir} do not cover the store's ids; delete that directory and re-run")
    names = []
    for c in range(kcfg.k):
        members = labels[clusters == c]
        top = np.bincount(members, minlength=len(classes)).argmax() if len(members) else None
        share = (members == top).mean() if len(members) else 0.0
        names.append(f"cluster {c} ({share:.0%} {classes[top]})" if top is not None else f"cluster {c} (empty)")
    extra = {"kmeans": {"k": kcfg.k, "niter": kcfg.niter, "spherical": kcfg.spherical, "backend": result.backend,
                        "objective": result.objective[-1], "dir": str(result.out_dir)}}
    return ids, clusters, result.centroids, names, extra


def _votes(tasks: dict[str, FeatureStore], num_units: int, centres: np.ndarray | None, k: int) -> np.ndarray:
    """Votes per unit from every task (LM: stored top-k, at most what the store holds; FM: k nearest centres)."""
    per_task = {
        name: label_mapping_votes(store, num_units, min(k, int(store.manifest["topk"]))) if centres is None
        else feature_mapping_votes(store, centres, k)
        for name, store in tasks.items()
    }
    return per_task[next(iter(per_task))] if len(per_task) == 1 else combine_task_votes(per_task)


def _diagnostics(tasks: dict[str, FeatureStore], centres: np.ndarray | None, k: int, names: list[str]) -> dict[str, Any]:
    """Per task, :func:`mapping_diagnostics` of its images' votes (warnings also logged)."""
    out = {}
    for name, store in tasks.items():
        k_task = k if centres is not None else min(k, int(store.manifest["topk"]))
        labels, units = (label_mapping_image_units(store) if centres is None
                         else feature_mapping_image_units(store, centres, k_task))
        diag = mapping_diagnostics(units, labels, len(names), k_task, names)
        for w in diag.warnings:
            log.warning("task %s: %s", name, w)
        out[name] = diag.to_dict()
    return out


def _scores_file(cfg: SelectConfig, source: FeatureStore) -> Path:
    """Where EL2N/GraNd scores are read: ``cfg.scores`` (a scores.parquet or its directory), else the
    cache next to the source features."""
    from dp4tl_ray.select.scores import SCORES_FILE

    path = Path(cfg.scores) if cfg.scores else _scores_cache(cfg, source)
    return path / SCORES_FILE if path.suffix != ".parquet" else path


def _scores_cache(cfg: SelectConfig, source: FeatureStore) -> Path:
    return source.path / f"scores-e{cfg.score_epochs}-s{'_'.join(map(str, cfg.score_seeds))}"


SCORES_COST_FILE, SCORES_COST_KEY = "scores.json", "scores_seconds"  # beside scores.parquet: what the scores cost


def recorded_scores_seconds(file: Path) -> float | None:
    """The scores' own cost (models + scoring) as recorded in ``scores.json`` beside ``file``, else None."""
    cost = file.parent / SCORES_COST_FILE
    if not cost.is_file():
        return None
    value = json.loads(cost.read_text()).get(SCORES_COST_KEY)
    return None if value is None else float(value)


def _image_scores(cfg: SelectConfig, source: FeatureStore, spent: dict[str, float]):
    """``id, el2n, grand`` per source row: read from :func:`_scores_file`, else computed once and cached
    there. ``spent["scores_s"]`` is what the scores cost: their recorded seconds (every keep-set that uses
    them counts them), else the seconds this call took; ``spent["scores_reused"]`` 1 when they existed."""
    import pyarrow.parquet as pq

    from dp4tl_ray.data.decode import DecodeSpec
    from dp4tl_ray.models import ModelSpec
    from dp4tl_ray.select.scores import compute_scores

    t0 = time.perf_counter()
    file = _scores_file(cfg, source)
    spent["scores_reused"] = float(file.is_file())
    if file.is_file():
        table = pq.read_table(file)
    elif cfg.scores:
        raise UserError(f"scores file {file} not found; drop --scores to compute them")
    else:
        m = source.manifest
        spec = ModelSpec(m["surrogate"]["arch"], len(m["classes"]), m["surrogate"]["small_input"])
        table = compute_scores(m["source"], spec, DecodeSpec(**m["decode"]), epochs=cfg.score_epochs,
                               seeds=tuple(cfg.score_seeds), out=_scores_cache(cfg, source))
    spent["scores_wall_s"] = time.perf_counter() - t0
    recorded = recorded_scores_seconds(file)
    spent["scores_s"] = recorded if recorded is not None else spent["scores_wall_s"]
    return table


def _baseline_selection(cfg: SelectConfig, source: FeatureStore, spent: dict[str, float]) -> tuple[np.ndarray, KeepSetMeta]:
    """Kept ids and metadata of a baseline: whole random classes, or images to an image budget."""
    from dp4tl_ray.select import baselines

    ids, labels = _source_ids_labels(source)
    num_classes = len(source.manifest["classes"])
    if cfg.method == "random-class":
        kept = baselines.random_by_class(labels, ids, cfg.ratio, cfg.seed)
        extra: dict[str, Any] = {}
    else:
        match = KeepSet.load(cfg.match) if cfg.match else None
        fraction = None if match else (cfg.keep_fraction if cfg.keep_fraction is not None else 1 - cfg.ratio)
        budget = baselines.image_budget(len(ids), fraction, match)
        if cfg.method == "random-image":
            kept = baselines.random_by_image(ids, budget, cfg.seed)
        elif cfg.method == "moderate":
            f_ids, f_labels, feats, _ = source.arrays()
            kept = baselines.moderate(feats, f_labels, f_ids, budget)
        else:
            table = _image_scores(cfg, source, spent)
            kept = baselines.top_scores(table.column(cfg.method).to_numpy(), table.column("id").to_numpy(), budget)
        extra = {"budget": budget, "matched": cfg.match}
    classes_kept = int((np.bincount(labels[np.isin(ids, kept)], minlength=num_classes) > 0).sum())
    unit_level = cfg.method == "random-class"
    meta = KeepSetMeta(method=cfg.method, ratio=cfg.ratio, units_kept=classes_kept if unit_level else len(kept),
                       units_total=num_classes if unit_level else len(ids), votes_per_unit=[],
                       images_kept=len(kept), images_total=len(ids), surrogate=source.manifest["surrogate"],
                       source_fingerprint=source.manifest["source_fingerprint"], downstream=[], seed=cfg.seed,
                       extra={**extra, "classes_with_images": classes_kept,
                              "fraction_images_removed": 1 - len(kept) / len(ids)},
                       source_features=str(source.path.resolve()))
    return kept, meta


def _unit_selection(cfg: SelectConfig, source: FeatureStore, spent: dict[str, float]) -> tuple[np.ndarray, KeepSetMeta]:
    """LM / FM: downstream votes rank the units; the lowest ``ratio`` of them are dropped."""
    tasks: dict[str, FeatureStore] = {}
    for path in cfg.downstream_features:
        store = FeatureStore.open(path)
        _check_same_surrogate(source, store)
        if store.num_rows == 0:
            raise UserError(f"downstream set {path} has no images; extract its train/ folder first")
        tasks[_task_name(store) if _task_name(store) not in tasks else str(path)] = store
    ids, unit_of_row, centres, names, extra = _units(cfg, source, spent)
    num_units = len(names)
    votes = _votes(tasks, num_units, centres, cfg.vote_topk)
    runner_up = _votes(tasks, num_units, centres, cfg.runner_up_topk) if cfg.runner_up_topk > cfg.vote_topk else None
    kept = kept_units_for_ratio(votes, cfg.ratio, cfg.seed, runner_up)
    summary = summarize_selection(votes, kept, np.bincount(unit_of_row, minlength=num_units))
    top = np.argsort(-votes, kind="stable")[:10]
    extra = {**extra, "vote_topk": cfg.vote_topk, "runner_up_topk": cfg.runner_up_topk,
             "fraction_images_removed": summary.fraction_images_removed,
             "top_units": [{"unit": int(u), "name": names[u], "votes": float(votes[u])} for u in top],
             "diagnostics": _diagnostics(tasks, centres, cfg.vote_topk, names)}
    meta = KeepSetMeta.from_summary(summary, method=cfg.method, ratio=cfg.ratio, surrogate=source.manifest["surrogate"],
                                    source_fingerprint=source.manifest["source_fingerprint"], downstream=list(tasks),
                                    seed=cfg.seed, extra=extra, source_features=str(source.path.resolve()),
                                    downstream_features=[str(t.path.resolve()) for t in tasks.values()])
    return keep_ids_for_units(unit_of_row, ids, kept), meta


def selection_key(cfg: SelectConfig, source: FeatureStore) -> str:
    """Hash of everything a selection's result depends on: the config but ``out``, the source and
    downstream stores' ``store_key``s, the match keep-set's sha256 and the given scores file's sha256."""
    scores = _scores_file(cfg, source) if cfg.scores else None
    doc = {"config": {k: v for k, v in asdict(cfg).items() if k != "out"},
           "source": source.manifest.get("store_key"),
           "downstream": [FeatureStore.open(p).manifest.get("store_key") for p in cfg.downstream_features],
           "match": KeepSet.load(cfg.match).meta.sha256 if cfg.match else None,
           "scores": atomic.sha256_file(scores) if scores and scores.is_file() else None}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _reusable(out: Path, key: str) -> KeepSet | None:
    """The keep-set at ``out`` when it was selected from the inputs hashed in ``key``, its costs marked reused."""
    if not (out / META_FILE).is_file():
        return None
    try:
        keepset = KeepSet.load(out)
    except UserError as e:
        log.warning("keep-set %s is unusable (%s): selecting again", out, e)
        return None
    if keepset.meta.extra.get("select_key") != key:
        return None
    log.info("keep-set %s was selected from the same inputs: reusing it", out)
    keepset.meta.extra["costs"] = {**keepset.meta.extra.get("costs", {}), "reused": True}
    return keepset


def select_keepset(cfg: SelectConfig) -> KeepSet:
    """Run one selection and write its KeepSet to ``cfg.out`` (atomically), or return the one there
    when it was selected from the same inputs.

    ``meta.extra["costs"]`` records the selection's seconds: ``kmeans_s`` (the k-means run's own, also
    when k-means reused its result), ``scores_s`` (EL2N/GraNd: the scores' own recorded cost,
    ``scores_seconds`` in ``scores.json`` beside ``scores.parquet``, also when they were computed
    earlier, ``scores_reused``; else the seconds spent here) and ``select_s`` (the rest); ``reused`` is
    true when this call returned an earlier selection with its original costs.
    """
    cfg.validate()
    source = FeatureStore.open(cfg.source_features)
    key = selection_key(cfg, source)
    reused = _reusable(Path(cfg.out), key)
    if reused is not None:
        return reused
    t0 = time.perf_counter()
    spent: dict[str, float] = {}
    select = _unit_selection if cfg.method in UNIT_METHODS else _baseline_selection
    ids, meta = select(cfg, source, spent)
    own_s = time.perf_counter() - t0 - spent.get("kmeans_wall_s", 0.0) - spent.get("scores_wall_s", 0.0)
    costs = {"select_s": own_s, "kmeans_s": spent.get("kmeans_s", 0.0), "scores_s": spent.get("scores_s", 0.0)}
    meta.extra.update(select_key=key, costs={**{k: round(v, 3) for k, v in costs.items()}, "reused": False,
                                             "scores_reused": bool(spent.get("scores_reused"))})
    keepset = KeepSet(ids, meta)
    keepset.write(cfg.out)
    return keepset


def uses_ray(cfg: SelectConfig) -> bool:
    """Whether the selection may start Ray work: FM's k-means, EL2N/GraNd scores computed here."""
    return cfg.method == "fm" or (cfg.method in ("el2n", "grand") and not cfg.scores)


def format_keepset_summary(ks: KeepSet, path: str | Path) -> str:
    """A few lines a person reads after selection."""
    m = ks.meta
    lines = [
        f"KeepSet {path}: method {m.method}, ratio {m.ratio:g} for {', '.join(m.downstream)}",
        f"  units kept {m.units_kept}/{m.units_total}; images kept {m.images_kept}/{m.images_total} "
        f"({1 - m.images_kept / max(m.images_total, 1):.1%} of images removed)",
    ]
    top = m.extra.get("top_units", [])
    if top:
        lines.append("  most voted: " + ", ".join(f"{t['name']} ({t['votes']:g})" for t in top[:5]))
    for task, d in m.extra.get("diagnostics", {}).items():
        lines.append(f"  mapping {task}: top unit {d['top_unit_share']:.0%} of votes, entropy {d['vote_entropy']:.2f}, "
                     f"class agreement {d['mean_class_agreement']:.0%}, {len(d['shared_majority_classes'])}/"
                     f"{d['classes']} classes share one majority unit")
        lines.extend(f"  WARNING {task}: {w}" for w in d["warnings"])
    return "\n".join(lines)
