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
from typing import Any, Iterable

import numpy as np

from dp4tl_ray import atomic
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import FeatureStore
from dp4tl_ray.select.baselines import MODERATE_BANDS
from dp4tl_ray.select.class_stats import class_means, median_distances
from dp4tl_ray.select.diagnostics import mapping_diagnostics
from dp4tl_ray.select.feature_mapping import feature_mapping_image_units, feature_mapping_votes
from dp4tl_ray.select.keepset import META_FILE, KeepSet, KeepSetMeta, keep_ids_for_units
from dp4tl_ray.select.label_mapping import label_mapping_image_units, label_mapping_votes
from dp4tl_ray.select.scores_io import SCORES_FILE, Scores, load_scores, scores_file
from dp4tl_ray.select.vote_rules import VOTE_RULES, one_to_one_ranking
from dp4tl_ray.select.voting import (
    combine_task_votes,
    kept_units_for_ratio,
    kept_units_from_ranking,
    rank_units_by_votes,
    summarize_selection,
    units_to_drop,
)

log = logging.getLogger(__name__)
# "<method>-reverse" keeps the *least* voted units (the reference code's `reverse` flag): a sanity
# ablation that should transfer worse than random-class, never a method to use.
REVERSE = "-reverse"
UNIT_METHODS = ("lm", "fm", "fm-classmean", "lm" + REVERSE, "fm" + REVERSE)
KMEANS_METHODS = ("fm", "fm" + REVERSE)  # their units are k-means clusters of the source features
IMAGE_METHODS = ("random-image", "moderate", "el2n", "grand")  # prune images to an image budget
METHODS = UNIT_METHODS + ("random-class",) + IMAGE_METHODS
ACTOR_METHODS = KMEANS_METHODS + ("fm-classmean", "moderate")  # read the source features on Ray actors
# The paper's pairings: LM for pretraining with labels (supervised; the adversarial mode is supervised PGD),
# FM for self-supervised pretraining. Either method (and its variants) in another mode is an extension.
PUBLISHED_MODES = {"lm": ("supervised", "adversarial"), "fm": ("moco_v2",)}


def _family(method: str) -> str:
    """The published method a variant belongs to: lm-reverse -> lm, fm-classmean / fm-reverse -> fm."""
    return method.removesuffix(REVERSE).split("-")[0]


def outside_published_pairing(method: str, mode: str | None) -> bool:
    """Whether ``method`` pretrained in ``mode`` is a pairing the paper does not make (False for the baselines,
    which the paper runs in every mode, and for trials without pretraining)."""
    modes = PUBLISHED_MODES.get(_family(method))
    return bool(modes) and mode is not None and mode not in modes


def pairing_note(method_modes: Iterable[tuple[str, str | None]]) -> str | None:
    """One sentence on the (method, pretraining mode) pairs the paper does not make, or None when there are none
    (the sweep logs it when planning, the report prints it over each table)."""
    pairs = sorted({(m, mode) for m, mode in method_modes if outside_published_pairing(m, mode)})
    if not pairs:
        return None
    text = (f"Outside the paper's pairings: {', '.join(f'{m} under {mode}' for m, mode in pairs)}. The paper proposes "
            "LM for supervised and FM for self-supervised pretraining; these cells are an extension, not its setting.")
    if any(_family(m) == "fm" and mode in PUBLISHED_MODES["lm"] for m, mode in pairs):
        text += (" FM keeps clusters, not classes: its keep-sets hold parts of source classes, and pretraining with "
                 "labels learns each class from the part it kept.")
    return text


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
    # 0 = the paper's rule: ties in top-1 votes (zero votes, mostly) broken by a seeded permutation.
    # k > vote_topk = the runner-up variant: ties go first to units more often in the images' top-k.
    runner_up_topk: int = 0
    # LM/FM ranking: "votes" (the paper's rule) or "one-to-one" (each downstream class claims one unit per
    # round, ILM-VP's greedy mapping; helps when a sink takes the top-1 but each class's unit is in its top-k)
    vote_rule: str = "votes"
    moderate_band: str = "per-class"  # Moderate-DS: every class keeps the same fraction (DP4TL); "global": Xia et al.'s one band
    k: int | None = None  # FM clusters; default: number of source classes
    kmeans_niter: int = 20
    kmeans_actors: int = 2  # actors holding the source features (k-means shards, class means, Moderate-DS classes)
    kmeans_gpus_per_actor: float = 0  # > 0: actors assign on a GPU (faiss GPU, else torch CUDA); 0.5 packs 2 per GPU
    spherical: bool = False
    # Image-level baselines keep an image budget: as many images as the keep-set `match` (the method
    # they are compared with), else `keep_fraction` of the images, else 1 - ratio of them.
    match: str | None = None
    keep_fraction: float | None = None
    scores: str | None = None  # EL2N/GraNd: scores.parquet from an earlier run; default: computed and cached
    score_epochs: int = 2  # EL2N: supervised epochs per seed (GraNd is scored at initialisation)
    score_seeds: list[int] | None = None  # one model per seed, averaged; default scores.DEFAULT_SEEDS
    score_workers: int = 1  # EL2N: Ray Train workers of each seed's run
    score_use_gpu: bool = False  # EL2N: train on GPUs

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        units_to_drop(2, self.ratio)  # ratio range check, one line
        if self.vote_rule not in VOTE_RULES:
            raise UserError(f"unknown vote_rule {self.vote_rule!r}; choose one of {', '.join(VOTE_RULES)}")
        if self.moderate_band not in MODERATE_BANDS:
            raise UserError(f"moderate_band must be one of {', '.join(MODERATE_BANDS)}, got {self.moderate_band!r}")
        if self.vote_topk < 1:
            raise UserError(f"vote_topk must be >= 1, got {self.vote_topk}")
        if self.runner_up_topk and self.runner_up_topk <= self.vote_topk:
            raise UserError(f"runner_up_topk must be 0 (off) or more than vote_topk={self.vote_topk}, got {self.runner_up_topk}")
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
    if cfg.method.removesuffix(REVERSE) == "lm":
        return ids, labels, None, list(classes), {}
    if cfg.method == "fm-classmean":
        return ids, labels, class_means(source, len(classes), cfg.kmeans_actors), list(classes), {}
    from dp4tl_ray.kmeans import kmeans_distributed, load_assignments

    kcfg = kmeans_config(cfg, source)
    t0 = time.perf_counter()
    result = kmeans_distributed(source.path, kcfg)
    spent.update(kmeans_wall_s=time.perf_counter() - t0, kmeans_s=result.seconds)
    assign = load_assignments(result.out_dir)
    a_ids, clusters = assign.column("id").to_numpy(), assign.column("cluster").to_numpy()
    if not np.array_equal(a_ids, ids):
        raise UserError(f"k-means assignments at {result.out_dir} do not cover the store's ids; delete that directory and re-run")
    top, share = majority_class(clusters, labels, kcfg.k)
    names = [f"cluster {c} ({share[c]:.0%} {classes[top[c]]})" if top[c] >= 0 else f"cluster {c} (empty)"
             for c in range(kcfg.k)]
    extra = {"kmeans": {"k": kcfg.k, "niter": kcfg.niter, "spherical": kcfg.spherical, "backend": result.backend,
                        "objective": result.objective[-1], "dir": str(result.out_dir)}}
    return ids, clusters, result.centroids, names, extra


def majority_class(units: np.ndarray, labels: np.ndarray, num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: its most frequent class (smallest on ties; -1 when empty) and that class's share of its rows.
    One sort of the rows, so it stays cheap at 21k clusters x 13M rows."""
    pairs, counts = np.unique(units.astype(np.int64) * (int(labels.max()) + 1) + labels, return_counts=True)
    unit_of_pair, class_of_pair = np.divmod(pairs, int(labels.max()) + 1)
    best = np.lexsort((class_of_pair, -counts, unit_of_pair))  # per unit: highest count, then smallest class
    first = best[np.concatenate(([True], np.diff(unit_of_pair[best]) != 0))]
    top, share = np.full(num_units, -1), np.zeros(num_units)
    top[unit_of_pair[first]] = class_of_pair[first]
    share[unit_of_pair[first]] = counts[first] / np.bincount(units, minlength=num_units)[unit_of_pair[first]]
    return top, share


def _votes(tasks: dict[str, FeatureStore], num_units: int, centres: np.ndarray | None, k: int) -> np.ndarray:
    """Votes per unit from every task (LM: stored top-k, at most what the store holds; FM: k nearest centres)."""
    per_task = {
        name: label_mapping_votes(store, num_units, min(k, int(store.manifest["topk"]))) if centres is None
        else feature_mapping_votes(store, centres, k)
        for name, store in tasks.items()
    }
    return per_task[next(iter(per_task))] if len(per_task) == 1 else combine_task_votes(per_task)


def _image_units(store: FeatureStore, centres: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A downstream store's labels and each image's top-k units (LM: at most the k the store holds)."""
    if centres is None:
        labels, units = label_mapping_image_units(store)
        return labels, units[:, :k]
    return feature_mapping_image_units(store, centres, k)


_WARNED: set[tuple[str, str]] = set()  # (task, warning) already on this process's console


def _diagnostics(tasks: dict[str, FeatureStore], centres: np.ndarray | None, k: int, names: list[str]) -> dict[str, Any]:
    """Per task, :func:`mapping_diagnostics` of its images' votes. Each warning is also logged, once per process:
    a sweep selects many keep-sets (ratios, seeds) from the same votes, and the same words 24 times are noise;
    every keep-set's manifest records its own."""
    out = {}
    for name, store in tasks.items():
        labels, units = _image_units(store, centres, k)
        diag = mapping_diagnostics(units, labels, len(names), units.shape[1], names)
        for w in diag.warnings:
            if (name, w) not in _WARNED:
                _WARNED.add((name, w))
                log.warning("task %s: %s", name, w)
        out[name] = diag.to_dict()
    return out


def _kept_units(cfg: SelectConfig, tasks: dict[str, FeatureStore], centres: np.ndarray | None, votes: np.ndarray,
                runner_up: np.ndarray | None) -> np.ndarray:
    """The units kept under ``cfg.vote_rule``; for one-to-one every downstream class of every task claims units."""
    reverse = cfg.method.endswith(REVERSE)  # the sanity ablation keeps the other end of the ranking
    if cfg.vote_rule == "votes":
        return kept_units_for_ratio(votes, cfg.ratio, cfg.seed, runner_up, least_voted=reverse)
    rows = [_image_units(store, centres, max(cfg.vote_topk, cfg.runner_up_topk, 1)) for store in tasks.values()]
    ranking = one_to_one_ranking(rows, len(votes), rank_units_by_votes(votes, cfg.seed, runner_up))
    return kept_units_from_ranking(ranking[::-1] if reverse else ranking, cfg.ratio)


def _image_scores(cfg: SelectConfig, source: FeatureStore, spent: dict[str, float]) -> Scores:
    """``id, <method>`` per source row and its metadata: read from ``cfg.scores`` (a scores.parquet or
    its directory; torch is not imported), else computed once and cached next to the source features.
    ``spent["scores_s"]`` is the scores' whole recorded cost (training + scoring), counted in every
    keep-set that uses them."""
    t0 = time.perf_counter()
    if cfg.scores:
        scores = load_scores(cfg.scores, cfg.method)
        spent["scores_reused"] = 1.0
    else:
        from dp4tl_ray.data.decode import DecodeSpec
        from dp4tl_ray.models import ModelSpec
        from dp4tl_ray.select.scores import ScoreConfig, compute_scores

        m = source.manifest
        spec = ModelSpec(m["surrogate"]["arch"], len(m["classes"]), m["surrogate"]["small_input"])
        seeds = {"seeds": tuple(cfg.score_seeds)} if cfg.score_seeds is not None else {}
        scfg = ScoreConfig(cfg.method, epochs=cfg.score_epochs, num_workers=cfg.score_workers,
                           use_gpu=cfg.score_use_gpu, **seeds)
        out = source.path / scfg.dir_name()
        spent["scores_reused"] = float((out / SCORES_FILE).is_file())
        scores = compute_scores(m["source"], spec, DecodeSpec(**m["decode"]), scfg, out=out)
    spent["scores_wall_s"] = time.perf_counter() - t0
    spent["scores_s"] = float(scores.meta.get("scores_seconds", spent["scores_wall_s"]))
    return scores


def _baseline_selection(cfg: SelectConfig, source: FeatureStore, spent: dict[str, float]) -> tuple[np.ndarray, KeepSetMeta]:
    """Kept ids and metadata of a baseline: whole random classes, or images to an image budget."""
    from dp4tl_ray.select import baselines

    ids, labels = _source_ids_labels(source)
    num_classes = len(source.manifest["classes"])
    if cfg.method == "random-class":
        kept = baselines.random_by_class(labels, ids, cfg.ratio, cfg.seed)
        extra: dict[str, Any] = {}
    else:
        scored: dict[str, Any] = {}
        match = KeepSet.load(cfg.match) if cfg.match else None
        fraction = None if match else (cfg.keep_fraction if cfg.keep_fraction is not None else 1 - cfg.ratio)
        budget = baselines.image_budget(len(ids), fraction, match)
        if cfg.method == "random-image":
            kept = baselines.random_by_image(ids, budget, cfg.seed)
        elif cfg.method == "moderate":
            dist = median_distances(source, ids, labels, cfg.kmeans_actors)
            kept = baselines.moderate_from_distances(dist, labels, ids, budget, cfg.moderate_band)
        else:
            scores = _image_scores(cfg, source, spent)
            kept = baselines.top_scores(scores.table.column(cfg.method).to_numpy(), scores.table.column("id").to_numpy(), budget)
            scored = {"scores": scores.meta}  # settings and cost (scores_seconds) of the scores used
        extra = {"budget": budget, "matched": cfg.match, **scored}
        if cfg.method == "moderate":
            extra["moderate_band"] = cfg.moderate_band
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
    if cfg.method.removesuffix(REVERSE) == "lm" and not source.manifest["surrogate"].get("classifier", True):
        raise UserError(f"LM needs class predictions but {source.path} was extracted with a self-supervised surrogate "
                        "(features only); select with fm, or extract with a supervised surrogate")
    ids, unit_of_row, centres, names, extra = _units(cfg, source, spent)
    num_units = len(names)
    votes = _votes(tasks, num_units, centres, cfg.vote_topk)
    runner_up = _votes(tasks, num_units, centres, cfg.runner_up_topk) if cfg.runner_up_topk else None
    kept = _kept_units(cfg, tasks, centres, votes, runner_up)
    summary = summarize_selection(votes, kept, np.bincount(unit_of_row, minlength=num_units))
    top = np.argsort(-votes, kind="stable")[:10]
    tie_break = f"runner-up top-{cfg.runner_up_topk} votes, then seeded" if runner_up is not None else "seeded"
    extra = {**extra, "vote_topk": cfg.vote_topk, "runner_up_topk": cfg.runner_up_topk, "tie_break": tie_break,
             "zero_vote_units_kept": int((votes[kept] == 0).sum()), "vote_rule": cfg.vote_rule,
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
    scores = scores_file(cfg.scores) if cfg.scores else None
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
    ``scores_seconds`` in the record of ``scores.parquet``, also when they were computed
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
    """Whether the selection may start Ray work: source features read on actors (FM's k-means, class
    statistics), EL2N/GraNd scores computed here."""
    return cfg.method in ACTOR_METHODS or (cfg.method in ("el2n", "grand") and not cfg.scores)


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
