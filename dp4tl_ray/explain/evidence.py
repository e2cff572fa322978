"""A keep-set's selection, re-derived from its artifacts alone: units, votes per task, ranking, cut.

Reads the keep-set, the FeatureStores its provenance names and (FM) the k-means result it used;
recomputes each downstream image's unit choices with the selection's own rules and checks that they
give the votes and the kept units the keep-set recorded, so the page never explains a stale selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import MANIFEST, FeatureStore
from dp4tl_ray.select.class_stats import class_means
from dp4tl_ray.select.feature_mapping import nearest_centres
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta, isin_sorted
from dp4tl_ray.select.pipeline import REVERSE, UNIT_METHODS
from dp4tl_ray.select.voting import (
    combine_task_votes,
    images_kept_per_units_dropped,
    rank_units_by_votes,
    units_to_drop,
    votes_from_topk,
)

_RESELECT = "re-run `dp4tl select`"
RAY_METHODS = ("fm-classmean",)  # its class means come again from Ray actors reading the source store


def uses_ray(path: str | Path) -> bool:
    """Whether explaining the keep-set at ``path`` runs Ray work (the caller starts Ray: ``cli.init_ray``)."""
    return KeepSetMeta.load(path).method in RAY_METHODS


@dataclass(frozen=True)
class TaskVotes:
    """One downstream task: its store, each image's top units ``choices[n, k]``, and its votes per unit."""

    name: str
    store: FeatureStore
    ids: np.ndarray
    labels: np.ndarray
    choices: np.ndarray
    votes: np.ndarray
    vote_topk: int

    def voters_of(self, unit: int) -> np.ndarray:
        """Ids of this task's images that gave ``unit`` a vote."""
        return self.ids[(self.choices[:, : self.vote_topk] == unit).any(axis=1)]


@dataclass(frozen=True)
class Evidence:
    """Everything the explorer shows, derived from the artifacts."""

    keepset: KeepSet
    path: Path
    source: FeatureStore
    tasks: list[TaskVotes]
    unit_names: list[str]
    source_ids: np.ndarray  # per source row, sorted
    source_labels: np.ndarray
    unit_of_row: np.ndarray
    closeness: np.ndarray  # per source row: squared distance to its centre (FM), else 0
    votes: np.ndarray  # combined, as recorded in the keep-set
    runner_up: np.ndarray | None  # votes from each image's top runner_up_topk units: the first tie-break
    ranking: np.ndarray  # unit ids, most voted first (the selection's rule and tie-breaks)
    units_kept: int  # the first ``units_kept`` of ``ranking`` are kept

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    @cached_property
    def unit_sizes(self) -> np.ndarray:
        return np.bincount(self.unit_of_row, minlength=self.num_units)

    @cached_property
    def _rows_by_unit(self) -> tuple[np.ndarray, np.ndarray]:
        """Source rows grouped by unit (``order``) and where each unit's group starts: one sort, then
        every per-unit look-up is a slice (ImageNet-size sources have a million rows)."""
        order = np.argsort(self.unit_of_row, kind="stable")
        return order, np.concatenate([[0], np.cumsum(self.unit_sizes)])

    def rows_of(self, unit: int) -> np.ndarray:
        """Positions (in ``source_ids``) of the source rows in ``unit``."""
        order, starts = self._rows_by_unit
        return order[starts[unit]:starts[unit + 1]]

    def images_kept_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``ratios, images_kept``: what each ratio ``d/U`` would keep under this ranking (step curve)."""
        kept = images_kept_per_units_dropped(self.ranking, self.unit_sizes)
        return np.arange(self.num_units) / self.num_units, kept

    def class_mix(self, unit: int, top: int = 3) -> list[tuple[str, float]]:
        """The source classes a unit's images come from, largest share first (LM: the class itself)."""
        labels, counts = np.unique(self.source_labels[self.rows_of(unit)], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        return [(self.source.manifest["classes"][labels[i]], counts[i] / counts.sum()) for i in order]

    def members_of(self, unit: int, n: int) -> np.ndarray:
        """Up to ``n`` source ids of a unit: its classes in turn (largest first), each nearest the centre first."""
        rows = self.rows_of(unit)
        return self.source_ids[rows[pick_round_robin(self.source_labels[rows], self.closeness[rows], n)]]


def pick_round_robin(groups: np.ndarray, key: np.ndarray, n: int) -> np.ndarray:
    """Positions of up to ``n`` items taken from each group in turn (largest group first), each group's
    items in ascending ``key`` order: a few members that show every class a cluster mixes."""
    uniq, counts = np.unique(groups, return_counts=True)
    queues = [np.flatnonzero(groups == g)[np.argsort(key[groups == g], kind="stable")]
              for g in uniq[np.argsort(-counts, kind="stable")]]
    picked: list[int] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        picked += [int(q[depth]) for q in queues if depth < len(q)]
        if len(picked) >= n:
            break
    return np.asarray(picked[:n], dtype=np.int64)


def _store(path: str, role: str, keepset: Path) -> FeatureStore:
    if not path or not (Path(path) / MANIFEST).is_file():
        raise UserError(f"the {role} FeatureStore {path or '(not recorded)'} of keep-set {keepset} is missing; "
                        f"restore it, or `dp4tl extract` it again and {_RESELECT}")
    return FeatureStore.open(path)


def _fm_units(keepset: KeepSet, path: Path, source: FeatureStore, ids: np.ndarray):
    """``unit_of_row, closeness, centres, names`` of an ``fm`` keep-set from the k-means run it recorded."""
    from dp4tl_ray.kmeans import load_assignments, load_centroids

    recorded = keepset.meta.extra.get("kmeans", {}).get("dir")
    kdir = source.path / "kmeans" / Path(recorded).name if recorded else None
    if kdir is None or not (kdir / "centroids.npy").is_file():
        raise UserError(f"the k-means result {kdir} of keep-set {path} is missing; {_RESELECT} (it recomputes it)")
    assign = load_assignments(kdir)
    if not np.array_equal(assign.column("id").to_numpy(), ids):
        raise UserError(f"the k-means result {kdir} does not cover the source store's ids; {_RESELECT}")
    centres = load_centroids(kdir)
    return (assign.column("cluster").to_numpy(), assign.column("sq_dist").to_numpy(), centres,
            [f"cluster {c}" for c in range(centres.shape[0])])


def _task_votes(name: str, store: FeatureStore, centres: np.ndarray | None, num_units: int,
                vote_topk: int, choices_k: int) -> TaskVotes:
    """A task's unit choices as the selection made them: LM the stored top-k source classes (as many as
    the store holds), FM the nearest centres; votes from the first ``vote_topk`` of them."""
    ids, labels, feats, topk = store.arrays()
    choices = topk[:, :choices_k] if centres is None else nearest_centres(feats, centres, choices_k)
    k = min(vote_topk, choices.shape[1])
    return TaskVotes(name, store, ids, labels, choices, votes_from_topk(choices, num_units, k), k)


def _combined(tasks: list[TaskVotes], num_units: int, k: int | None = None) -> np.ndarray:
    """Votes of all tasks (each normalised when there are several), from each image's top ``k`` choices."""
    per_task = {t.name: t.votes if k is None else votes_from_topk(t.choices, num_units, min(k, t.choices.shape[1]))
                for t in tasks}
    return next(iter(per_task.values())) if len(per_task) == 1 else combine_task_votes(per_task)


def load_evidence(path: str | Path) -> Evidence:
    """Re-derive the selection behind the keep-set at ``path``; one-line errors for a missing or stale artifact."""
    path = Path(path)
    ks = KeepSet.load(path)
    meta = ks.meta
    shown = [m for m in UNIT_METHODS if not m.endswith(REVERSE)]
    if meta.method not in UNIT_METHODS:
        raise UserError(f"keep-set {path} was made by {meta.method!r}, which prunes without unit votes; "
                        f"the explorer shows {', '.join(shown)} keep-sets")
    if meta.method not in shown:
        raise UserError(f"keep-set {path} is the {meta.method!r} ablation, which keeps the units below the cut "
                        f"line; the explorer shows {', '.join(shown)} keep-sets")
    if not meta.source_features or len(meta.downstream_features) != len(meta.downstream):
        raise UserError(f"keep-set {path} does not name the FeatureStores it was selected from "
                        f"(written before they were recorded); {_RESELECT}")
    source = _store(meta.source_features, "source", path)
    if source.manifest["source_fingerprint"] != meta.source_fingerprint:
        raise UserError(f"the source FeatureStore {source.path} was re-extracted from other images since "
                        f"keep-set {path} was selected; {_RESELECT}")
    table = source.read(["id", "label"])
    ids, labels = table.column("id").to_numpy(), table.column("label").to_numpy()
    classes = list(source.manifest["classes"])
    closeness = np.zeros(len(ids), np.float32)
    if meta.method == "fm":
        unit_of_row, closeness, centres, names = _fm_units(ks, path, source, ids)
    else:
        unit_of_row, names = labels, classes
        # fm-classmean: the class means again from actors reading the store (the features never reach this process)
        centres = class_means(source, len(classes), 1) if meta.method == "fm-classmean" else None
    vote_topk = int(meta.extra.get("vote_topk", 1))
    runner_up_topk = int(meta.extra.get("runner_up_topk", 0))
    tasks = [_task_votes(name, _store(p, f"downstream ({name})", path), centres, len(names), vote_topk,
                         max(vote_topk, runner_up_topk))
             for name, p in zip(meta.downstream, meta.downstream_features)]
    votes = np.asarray(meta.votes_per_unit, np.float64)
    if votes.shape != (len(names),) or not np.allclose(_combined(tasks, len(names)), votes):
        raise UserError(f"the votes recomputed from the FeatureStores differ from those keep-set {path} recorded "
                        f"(a store changed since selection); {_RESELECT}")
    runner_up = _combined(tasks, len(names), runner_up_topk) if runner_up_topk > vote_topk else None
    ranking = rank_units_by_votes(votes, meta.seed, runner_up)
    units_kept = len(names) - units_to_drop(len(names), meta.ratio)
    kept_units = np.unique(unit_of_row[isin_sorted(ids, ks.ids)])
    selected = np.sort(ranking[:units_kept])
    if not np.array_equal(kept_units, selected[np.bincount(unit_of_row, minlength=len(names))[selected] > 0]):
        raise UserError(f"keep-set {path} keeps other units than its votes and ratio select "
                        f"(a store changed since selection); {_RESELECT}")
    return Evidence(ks, path, source, tasks, names, ids, labels, unit_of_row, closeness, votes, runner_up, ranking,
                    units_kept)

