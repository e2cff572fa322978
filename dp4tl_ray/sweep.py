"""Ray Tune sweeps: method x pruning ratio x surrogate x pretraining mode x task x seed.

One trial = select -> pretrain -> evaluate. The work trials share is prepared once, on the driver,
before Tune starts: surrogate training (per surrogate arch), feature extraction of the source and of
every task, and the keep-sets (FM's k-means runs inside selection, once per surrogate, k and seed), each
stage caching itself on disk, so the sweep (or another sweep with the same work dir) reuses it when it
runs again. A trial then loads its keep-set (checked against its sha256), fits a TorchTrainer named
from its trial id, evaluates the backbone (LP and/or FF) and reports one record. ``results.jsonl`` (one record per trial, see
``dp4tl_ray.results``) and the report are written when the sweep ends.

Resuming: the same command again restores the Tune experiment (``Tuner.restore``) and runs only the
trials that did not finish; a trial cut midway resumes its Train run from its last checkpoint.

Layout: ``<storage_path>/<name>/`` holds Tune's experiment state, ``results.jsonl`` and ``report/``;
``<work_dir>`` (default ``<storage_path>/<name>/work``) holds data, runs, features, keep-sets and
evaluation JSONs. On a multi-node cluster ``work_dir`` must be a filesystem every node mounts (EFS,
NFS); ``storage_path`` may be ``s3://...``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import read_json
from dp4tl_ray.atomic import is_uri
from dp4tl_ray.config import from_dict, load_yaml
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import MANIFEST, FeatureStore
from dp4tl_ray.progress import say
from dp4tl_ray.results import DENSE, RANDOM_INIT, RECORD_KEYS, REFERENCES, write_results
from dp4tl_ray.select.pipeline import IMAGE_METHODS, METHODS, REVERSE, UNIT_METHODS, pairing_note, select_keepset

log = logging.getLogger(__name__)

SURROGATE_FREE = (DENSE, "random-class", "random-image")  # methods that never look at the surrogate's outputs
SECTIONS = ("sweep", "synth", "data", "surrogate", "extract", "select", "pretrain", "pretrain_by_mode", "evaluate")
TRIAL_RESOURCE = "trial_driver"  # custom resource (cluster.yaml puts it on the head) that Tune trial drivers hold
# Each stage section's required fields, which the sweep fills in per trial: placeholders when a section is
# read for its settings alone (checks, defaults).
PLACEHOLDERS = {"synth": {"root": "-"}, "surrogate": {"source": "-", "out": "-"}, "pretrain": {"source": "-", "out": "-"},
                "extract": {"source": "-", "out": "-"}, "select": {"method": "lm", "ratio": 0.5, "source_features": "-"},
                "evaluate": {"task_dir": "-"}}


def _stage_configs() -> dict[str, type]:
    """The config dataclass of each stage section (each module torch-free)."""
    from dp4tl_ray.data.synthetic import SynthConfig
    from dp4tl_ray.features import ExtractConfig
    from dp4tl_ray.select.pipeline import SelectConfig
    from dp4tl_ray.train.eval_config import EvalConfig
    from dp4tl_ray.train.pretrain_config import PretrainConfig

    return {"synth": SynthConfig, "surrogate": PretrainConfig, "extract": ExtractConfig, "select": SelectConfig,
            "pretrain": PretrainConfig, "evaluate": EvalConfig}


@dataclass
class AshaConfig:
    """ASHA early stopping of the pretraining stage, on the per-epoch metrics Train forwards to Tune."""

    enabled: bool = False
    metric: str = "loss"
    mode: str = "min"
    grace_period: int = 1  # epochs every trial runs before it may be stopped
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    """The search space and where results go (the ``sweep`` section of the YAML)."""

    name: str = "sweep"
    storage_path: str = "out/sweeps"  # Tune's storage: local dir or s3://...; the sweep lives in <storage_path>/<name>
    work_dir: str | None = None  # shared artifacts; default <storage_path>/<name>/work (must be a shared FS on a cluster)
    methods: list[str] = field(default_factory=lambda: [DENSE, "lm", "random-class"])
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.8])
    surrogates: list[str] = field(default_factory=lambda: ["resnet18"])
    # surrogate name (the arch; "<arch>-<mode>" for another pretraining mode) -> local weights; others are trained
    surrogate_checkpoints: dict[str, str] = field(default_factory=dict)
    # method -> pretraining mode of the surrogate it selects with (default supervised), e.g. {fm: moco_v2}:
    # FM exists for label-free pretraining, so it may get a self-supervised surrogate of its own.
    surrogate_modes: dict[str, str] = field(default_factory=dict)
    # surrogate name -> seconds it took to train a given checkpoint (counted in its keep-sets' cost, shown as declared)
    surrogate_costs: dict[str, float] = field(default_factory=dict)
    modes: list[str] = field(default_factory=lambda: ["supervised"])
    tasks: list[str] = field(default_factory=list)  # task folder names; empty = every task
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_modes: list[str] = field(default_factory=lambda: ["lp"])
    match_budget: str | None = "lm"  # image-level baselines keep as many images as this method's keep-set
    max_concurrent_trials: int = 0  # 0 = as many as the cluster fits
    asha: AshaConfig = field(default_factory=AshaConfig)

    def validate(self) -> None:
        from dp4tl_ray.train.eval_config import MODES as EVAL_MODES
        from dp4tl_ray.train.pretrain_config import MODES, SELF_SUPERVISED_MODES

        for name in ("methods", "ratios", "surrogates", "modes", "seeds", "eval_modes"):
            if not getattr(self, name):
                raise UserError(f"sweep.{name} is empty; list at least one")
        for m in self.methods:
            if m not in REFERENCES and m not in METHODS:
                raise UserError(f"sweep.methods: unknown method {m!r}; choose from {', '.join(REFERENCES + METHODS)}")
        for r in self.ratios:
            if not 0 < r < 1:
                raise UserError(f"sweep.ratios: {r} is not in (0, 1); the dense run is method {DENSE!r}")
        for m in self.modes:
            if m not in MODES:
                raise UserError(f"sweep.modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
        for m in self.eval_modes:
            if m not in EVAL_MODES:
                raise UserError(f"sweep.eval_modes: unknown mode {m!r}; choose from {', '.join(EVAL_MODES)}")
        for m, mode in self.surrogate_modes.items():
            if m not in self.methods or m not in UNIT_METHODS:
                raise UserError(f"sweep.surrogate_modes.{m}: only the sweep's own {', '.join(UNIT_METHODS)} methods pick "
                                "their surrogate (the baselines go with match_budget's)")
            if mode not in MODES:
                raise UserError(f"sweep.surrogate_modes.{m}: unknown mode {mode!r}; choose from {', '.join(MODES)}")
            if mode in SELF_SUPERVISED_MODES and m.removesuffix(REVERSE) == "lm":
                raise UserError(f"sweep.surrogate_modes.{m}: LM votes with class predictions, which a {mode} surrogate "
                                "does not make; give the self-supervised surrogate to fm")
        if self.match_budget and self.match_budget not in UNIT_METHODS + ("random-class",):
            raise UserError(f"sweep.match_budget must be one of {', '.join(UNIT_METHODS)}, random-class or null, "
                            f"got {self.match_budget!r}")
        note = pairing_note((m, mode) for m in self.methods for mode in self.modes)
        if note:
            log.warning(note)
        if set(self.methods) & set(IMAGE_METHODS) and not self.match_budget:
            log.info("image-level baselines keep 1 - ratio of the images (sweep.match_budget is null)")
        for arch, seconds in self.surrogate_costs.items():
            if arch not in self.surrogate_checkpoints:
                raise UserError(f"sweep.surrogate_costs.{arch}: a declared cost is for a given checkpoint; "
                                f"add sweep.surrogate_checkpoints.{arch} or drop it (a trained surrogate is timed)")
            if not isinstance(seconds, (int, float)) or seconds < 0:
                raise UserError(f"sweep.surrogate_costs.{arch} must be seconds >= 0, got {seconds!r}")
        if self.asha.mode not in ("min", "max"):
            raise UserError(f"sweep.asha.mode must be min or max, got {self.asha.mode!r}")
        if "/" in self.name or not self.name:
            raise UserError(f"sweep.name must be a plain directory name, got {self.name!r}")

    @property
    def path(self) -> str:
        """The sweep directory: Tune's experiment path, with results.jsonl and report/."""
        return f"{self.storage_path.rstrip('/')}/{self.name}" if is_uri(self.storage_path) else \
            str(Path(self.storage_path).resolve() / self.name)

    @property
    def work(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir).resolve()
        if is_uri(self.storage_path):
            raise UserError("sweep.storage_path is a URI: set sweep.work_dir to a filesystem every node mounts (EFS/NFS)")
        return Path(self.path) / "work"


@dataclass
class SweepPlan:
    """Every section of a sweep YAML: the search space plus each stage's settings. A stage section holds
    the keys the YAML sets (the per-trial values - arch, mode, method, ratio, seed, paths - are filled
    in by the sweep); :meth:`stage` makes it the stage's config, whose dataclass holds the defaults."""

    sweep: SweepConfig
    synth: dict[str, Any] | None = None
    data: dict[str, Any] | None = None  # {source: dir, tasks: [task dirs]} when there is no synth section
    surrogate: dict[str, Any] = field(default_factory=dict)
    extract: dict[str, Any] = field(default_factory=dict)
    select: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    pretrain_by_mode: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. moco_v2: {lr: 0.06, epochs: 200}
    evaluate: dict[str, Any] = field(default_factory=dict)

    def pretrain_for(self, mode: str | None) -> dict[str, Any]:
        """The pretrain section with ``mode``'s own overrides (recipes differ: MoCo's lr is not SGD's)."""
        if mode is None:
            return dict(self.pretrain)
        return {**self.pretrain, **(self.pretrain_by_mode.get(mode) or {}), "mode": mode}

    def stage(self, section: str, pretrain_mode: str | None = None, /, **fields: Any) -> Any:
        """Section ``section`` as its stage's config with the per-trial ``fields`` set (``pretrain_mode``:
        the pretrain section with that mode's overrides), checked as the stage's own flags are."""
        values = self.pretrain_for(pretrain_mode) if section == "pretrain" else getattr(self, section)
        where = f"pretrain_by_mode.{pretrain_mode}" if section == "pretrain" and pretrain_mode in self.pretrain_by_mode \
            else section
        return from_dict(_stage_configs()[section], {**values, **fields}, where)

    def settings(self, section: str, pretrain_mode: str | None = None, /) -> Any:
        """Section ``section``'s settings, defaults included (the per-trial fields are placeholders)."""
        return self.stage(section, pretrain_mode, **PLACEHOLDERS[section])


def load_plan(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepPlan:
    """Read a sweep YAML, apply ``overrides`` to its ``sweep`` section and check every section's keys."""
    raw = load_yaml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"{path}: unknown section(s) {unknown}; valid sections are {list(SECTIONS)}")
    if not raw.get("sweep"):  # every plan names its sweep; a file cut short often lost it (it comes last in ours)
        raise UserError(f"{path}: no sweep section (name, methods, ratios, ...): is the file complete? "
                        "See jobs/configs/*.yaml for whole plans")
    not_mappings = [k for k, v in raw.items() if v is not None and not isinstance(v, dict)]
    if not_mappings:
        raise UserError(f"{path}: section(s) {not_mappings} must hold `key: value` settings (see jobs/configs/demo.yaml)")
    sweep = {**(raw.get("sweep") or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        plan = SweepPlan(sweep=from_dict(SweepConfig, sweep, "sweep"),
                         **{k: dict(raw[k] or {}) for k in SECTIONS[1:] if k in raw})
        return check_plan(_absolute_paths(plan))
    except UserError as e:  # name the file (a value may be missing because the file was cut short)
        raise UserError(f"{path}: {e} (valid plans: jobs/configs/*.yaml)") from None


def _absolute(path: str) -> str:
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def _absolute_paths(plan: SweepPlan) -> SweepPlan:
    """Every local path of the plan made absolute against the driver's working directory: Tune runs
    each trial in its own working directory, where a relative path would point elsewhere."""
    sw = plan.sweep
    sw.storage_path = _absolute(sw.storage_path)
    if sw.work_dir:
        sw.work_dir = _absolute(sw.work_dir)
    sw.surrogate_checkpoints = {arch: _absolute(p) for arch, p in sw.surrogate_checkpoints.items()}
    if plan.data:
        if isinstance(plan.data.get("source"), str):
            plan.data["source"] = _absolute(plan.data["source"])
        if isinstance(plan.data.get("tasks"), list):
            plan.data["tasks"] = [_absolute(t) if isinstance(t, str) else t for t in plan.data["tasks"]]
    return plan


def check_plan(plan: SweepPlan) -> SweepPlan:
    """Validate every section now, with placeholder paths, so a typo fails before any work starts."""
    from dp4tl_ray.train.pretrain_config import MODES

    plan.sweep.validate()
    if (plan.synth is None) == (plan.data is None):
        raise UserError("a sweep config needs exactly one of the sections synth (generated data) and data "
                        "({source: <train dir or shards>, tasks: [<task dirs>]})")
    if plan.synth is not None:
        plan.settings("synth")
    else:
        unknown = sorted(set(plan.data) - {"source", "tasks"})
        if unknown or not plan.data.get("source") or not plan.data.get("tasks"):
            raise UserError("data section needs source: <dir> and tasks: [<task dir>, ...] and nothing else")
    for name, fixed in (("surrogate", ("source", "out", "name", "arch", "mode")),
                        ("pretrain", ("source", "out", "name", "keepset", "mode", "seed")),
                        ("extract", ("source", "out", "arch", "checkpoint", "num_classes")),
                        ("select", ("method", "ratio", "source_features", "downstream_features", "out", "seed", "match")),
                        ("evaluate", ("task_dir", "checkpoint", "mode", "out", "storage_path", "seed"))):
        set_here = sorted(set(getattr(plan, name)) & set(fixed))
        if set_here:
            raise UserError(f"{name}.{set_here[0]} is set by the sweep for every trial; remove it from the {name} section")
        plan.settings(name)
    unknown_modes = sorted(set(plan.pretrain_by_mode) - set(MODES))
    if unknown_modes:
        raise UserError(f"pretrain_by_mode names unknown mode(s) {unknown_modes}; modes are {', '.join(MODES)}")
    for mode in plan.pretrain_by_mode:
        overrides = plan.pretrain_by_mode[mode] or {}
        if "mode" in overrides or "keepset" in overrides:
            raise UserError(f"pretrain_by_mode.{mode}: mode and keepset are set by the sweep")
        plan.settings("pretrain", mode)
    if any(plan.settings("pretrain", m).num_workers < 1 for m in plan.sweep.modes):
        raise UserError("pretrain.num_workers must be >= 1 in a sweep: Ray Train's local mode cannot run inside a Tune trial")
    return plan


# ----- the trials: one spec per grid point -----


def _ratio_tag(ratio: float) -> str:
    return f"{ratio:g}".replace(".", "p")


@dataclass(frozen=True)
class TrialSpec:
    """One grid point: what its trial pretrains on and evaluates, and what its keep-set cost to select."""

    method: str
    ratio: float  # 0 for the reference methods
    surrogate: str | None  # None: the method never looks at a surrogate's outputs
    mode: str | None  # None: nothing is pretrained (random-init)
    task: str
    seed: int
    arch: str  # the pretrained (and evaluated) backbone
    keepset: str | None  # None: the whole source (dense) or no source at all (random-init)
    select_s: float  # the selection's own seconds (its other stages are in costs)
    kept_units: int
    total_units: int | None
    kept_images: int
    total_images: int | None
    surrogate_mode: str | None = None  # how the surrogate was pretrained (None with no surrogate)
    costs: dict[str, Any] = field(default_factory=dict)  # the keep-set's other stages (results.KEEPSET_COST_KEYS, ...)
    cache_decoded: bool | None = None  # the sweep's data path for this trial's mode (None: nothing is pretrained)

    @property
    def key(self) -> str:
        """Unique, readable name of the trial (Tune names its trial and directory from it)."""
        return "-".join(str(x) for x in (self.method, _ratio_tag(self.ratio), self.surrogate or "any", self.mode or "any",
                                         self.task, f"s{self.seed}"))

    def to_param(self) -> dict[str, Any]:
        """Plain data for Tune's param_space (which a restored experiment reads back), with the key."""
        return {**asdict(self), "key": self.key}

    @classmethod
    def from_param(cls, param: dict[str, Any]) -> TrialSpec:
        return cls(**{k: v for k, v in param.items() if k != "key"})

    def record_fields(self) -> dict[str, Any]:
        """What the trial's record takes from the spec: what it was and what its keep-set cost."""
        return {k: v for k, v in {**asdict(self), **self.costs}.items() if k in RECORD_KEYS}


# ----- shared work: data, surrogates, features, keep-sets (driver side, cached) -----


@dataclass
class Shared:
    """What the prepare step produced; trials read only this (paths and costs)."""

    source: str
    tasks: dict[str, str]  # task name -> task dir
    trials: list[TrialSpec]


@dataclass(frozen=True)
class SurrogateRef:
    """A surrogate of the sweep: its arch and how it is pretrained (a supervised one is named by its arch)."""

    arch: str
    mode: str = "supervised"

    @property
    def name(self) -> str:
        """Its runs, features and keep-sets directory name, and its key in ``surrogate_checkpoints``."""
        return self.arch if self.mode == "supervised" else f"{self.arch}-{self.mode}"


@dataclass
class SurrogateCost:
    """What a surrogate cost: seconds and how they are known (``results.SURROGATE_COSTS``), and whether
    this sweep reused an earlier run of it."""

    seconds: float | None
    how: str
    reused: bool = False


@dataclass
class SurrogateFeatures:
    """One surrogate's FeatureStores of the source and of every task's train set, and their costs."""

    surrogate: SurrogateRef
    cost: SurrogateCost
    source: FeatureStore
    tasks: dict[str, FeatureStore]
    reused: set[str] = field(default_factory=set)  # FeatureStores found up to date: "source" and task names

    def costs(self, task: str) -> dict[str, Any]:
        """The stages before selection of a keep-set for ``task`` that reads the surrogate's outputs
        (record fields; reused stages count their original seconds, from the stores' manifests)."""
        reused = (["surrogate"] if self.cost.reused else []) + \
            (["extract_source"] if "source" in self.reused else []) + (["extract_task"] if task in self.reused else [])
        return {"surrogate_s": self.cost.seconds, "surrogate_cost": self.cost.how,
                "extract_source_s": self.source.manifest["seconds"], "extract_task_s": self.tasks[task].manifest["seconds"],
                "reused_stages": reused}


def _data(plan: SweepPlan, work: Path) -> tuple[str, dict[str, str]]:
    """Source dir and task dirs, generating the synthetic data first when the plan has a synth section."""
    if plan.synth is not None:
        from dp4tl_ray.data.synthetic import generate

        s = generate(plan.stage("synth", root=str(work / "data")))
        source, dirs = str(s.source_dir), [str(t) for t in s.task_dirs]
    else:
        source, dirs = str(plan.data["source"]), [str(t) for t in plan.data["tasks"]]
    tasks = {Path(d).name: str(Path(d).resolve()) for d in dirs}
    for name, d in tasks.items():
        if not (Path(d) / "train").is_dir():
            raise UserError(f"task {name}: {d}/train not found; a task dir holds train/<class>/ and test/<class>/")
    wanted = plan.sweep.tasks or sorted(tasks)
    missing = [t for t in wanted if t not in tasks]
    if missing:
        raise UserError(f"sweep.tasks names {missing} but the data has tasks {sorted(tasks)}")
    return source, {t: tasks[t] for t in wanted}


def _surrogate(plan: SweepPlan, ref: SurrogateRef, source: str, work: Path) -> tuple[str, SurrogateCost]:
    """The surrogate's weights file and its cost: a given checkpoint's declared seconds
    (``sweep.surrogate_costs``), or the wall time of the Train run that trained it (start-up and decode
    cache included), recorded beside the run so that a sweep reusing the run counts it too."""
    from dp4tl_ray.train.trainer import pretrain

    sw = plan.sweep
    given = sw.surrogate_checkpoints.get(ref.name)
    if given:
        if not Path(given).is_file():
            raise UserError(f"sweep.surrogate_checkpoints.{ref.name}: {given} is not a file")
        declared = sw.surrogate_costs.get(ref.name)
        return str(Path(given).resolve()), SurrogateCost(declared, "undeclared" if declared is None else "declared")
    name = f"surrogate-{ref.name}"
    cost_file = work / "runs" / f"{name}.cost.json"
    t0 = time.perf_counter()
    r = pretrain(plan.stage("surrogate", arch=ref.arch, mode=ref.mode, source=source, out=str(work / "runs"), name=name),
                 progress=f"surrogate {ref.name}")
    print(f"[sweep] surrogate {ref.name}: {r.metrics.get('epoch')} epochs, loss {r.metrics.get('loss', float('nan')):.3f}")
    trained_now = r.seconds > 0
    if trained_now or not cost_file.is_file():  # an earlier run without a record: its epochs, the floor
        # A run resumed after a kill: this call's wall time plus the epochs the killed attempts finished.
        start = r.history[-1].get("start_epoch", 0) if trained_now and r.history else 0
        seconds = (time.perf_counter() - t0 if trained_now else 0.0) + \
            sum(h.get("epoch_s", 0.0) for h in r.history if not trained_now or h.get("epoch", 0) <= start)
        atomic.write_json(cost_file, {"seconds": round(seconds, 3)})
    return r.model_path, SurrogateCost(json.loads(cost_file.read_text())["seconds"], "trained", reused=not trained_now)


def _features(plan: SweepPlan, ref: SurrogateRef, source: str, tasks: dict[str, str], work: Path) -> SurrogateFeatures:
    """Train (or load) the surrogate ``ref`` and extract the source and every task's train set with it."""
    from dp4tl_ray.features import extract_features

    checkpoint, cost = _surrogate(plan, ref, source, work)
    reused: set[str] = set()

    def extract(images: str, name: str, **fields: Any) -> FeatureStore:
        out = work / "features" / ref.name / name
        before = FeatureStore.open(out).manifest.get("store_key") if (out / MANIFEST).is_file() else None
        store = extract_features(plan.stage("extract", arch=ref.arch, checkpoint=checkpoint, source=images, out=str(out),
                                            **fields))
        if before is not None and store.manifest.get("store_key") == before:  # up to date: extract_features reused it
            reused.add(name)
        return store

    src = extract(source, "source")
    n_classes = len(src.manifest["classes"])
    stores = {task: extract(str(Path(d) / "train"), task, num_classes=n_classes) for task, d in tasks.items()}
    return SurrogateFeatures(ref, cost, src, stores, reused)


def surrogate_mode(sw: SweepConfig, method: str) -> str:
    """How the surrogate ``method`` selects with is pretrained: ``sweep.surrogate_modes``, else supervised.
    The baselines go with the ``match_budget`` method's surrogate (whose keep-set sets their image budget)."""
    if method in IMAGE_METHODS + ("random-class",) and sw.match_budget:
        method = sw.match_budget
    return sw.surrogate_modes.get(method, "supervised")


def methods_per_surrogate(sw: SweepConfig) -> dict[SurrogateRef, list[str]]:
    """The methods selected with each surrogate, in selection order: unit methods first, since image-level
    baselines keep as many images as the ``match_budget`` method (selected for that, with the same
    surrogate, even when it is not a trial of its own); methods that ignore the surrogate only with the
    first arch."""
    selecting = sorted((m for m in sw.methods if m not in REFERENCES),
                       key=lambda m: (m in IMAGE_METHODS, m != sw.match_budget))
    per_surrogate: dict[SurrogateRef, list[str]] = {}
    for i, arch in enumerate(sw.surrogates):
        for m in selecting:
            if i == 0 or m not in SURROGATE_FREE:
                per_surrogate.setdefault(SurrogateRef(arch, surrogate_mode(sw, m)), []).append(m)
    for methods in per_surrogate.values():
        if sw.match_budget and any(m in IMAGE_METHODS for m in methods) and sw.match_budget not in methods:
            methods.insert(0, sw.match_budget)
    return per_surrogate


def _keepset_trials(plan: SweepPlan, features: SurrogateFeatures, methods: list[str], task: str, seed: int,
                    cached: dict[str, bool]) -> list[TrialSpec]:
    """Select every keep-set of ``methods`` x ratios for ``task`` and ``seed`` (each reused when already
    selected from the same inputs); one trial per keep-set and pretraining mode (``cached``: its data path)."""
    sw, ref = plan.sweep, features.surrogate

    def keepset_dir(method: str, ratio: float) -> Path:
        return sw.work / "keepsets" / ref.name / task / f"{method}-r{_ratio_tag(ratio)}-s{seed}"

    trials = []
    for ratio in sw.ratios:
        for method in methods:
            match = keepset_dir(sw.match_budget, ratio) if sw.match_budget and method in IMAGE_METHODS else None
            ks = select_keepset(plan.stage("select", method=method, ratio=ratio, seed=seed,
                                           source_features=str(features.source.path),
                                           downstream_features=[str(features.tasks[task].path)],
                                           out=str(keepset_dir(method, ratio)), match=match and str(match)))
            say("select", f"keep-set {method} r{ratio:g} {task} s{seed}", units=f"{ks.meta.units_kept}/{ks.meta.units_total}",
                images=f"{ks.meta.images_kept:,}/{ks.meta.images_total:,}")
            if method not in sw.methods:
                continue  # selected only as another method's image budget
            m, free = ks.meta, method in SURROGATE_FREE
            trials += [TrialSpec(method, ratio, None if free else ref.arch, mode, task, seed,
                                 plan.settings("pretrain", mode).arch, str(keepset_dir(method, ratio)),
                                 m.extra["costs"]["select_s"], m.units_kept, m.units_total, m.images_kept, m.images_total,
                                 None if free else ref.mode, keepset_costs(m.extra["costs"], None if free else features.costs(task)),
                                 cached[mode]) for mode in sw.modes]
    return trials


def keepset_costs(selection: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """A keep-set's cost fields: ``selection`` (its ``meta.extra["costs"]``) after ``before`` (the
    surrogate and extraction stages, :meth:`SurrogateFeatures.costs`; None for a method that never reads
    the surrogate's outputs). Reused stages keep their original seconds and are listed in reused_stages."""
    before = dict(before or {"surrogate_s": None, "surrogate_cost": None, "extract_source_s": None,
                             "extract_task_s": None, "reused_stages": []})
    reused = list(before.pop("reused_stages"))
    reused += [stage for stage, flag in (("scores", selection.get("scores_reused")), ("select", selection.get("reused")))
               if flag]
    own = {k: selection.get(k, 0.0) for k in ("kmeans_s", "scores_s")}
    return {**before, **own, "reused_stages": reused}


def _reference_trials(plan: SweepPlan, classes: int, images: int, tasks: dict[str, str],
                      cached: dict[str, bool]) -> list[TrialSpec]:
    """Dense (the whole source) per task, seed and mode; random init (nothing pretrained) per task and seed."""
    sw, trials = plan.sweep, []
    if DENSE in sw.methods:
        trials += [TrialSpec(DENSE, 0.0, None, mode, task, seed, plan.settings("pretrain", mode).arch, None, 0.0,
                             classes, classes, images, images, cache_decoded=cached[mode])
                   for task in tasks for seed in sw.seeds for mode in sw.modes]
    if RANDOM_INIT in sw.methods:  # whatever the pretraining mode: nothing is pretrained
        trials += [TrialSpec(RANDOM_INIT, 0.0, None, None, task, seed, plan.settings("pretrain").arch, None, 0.0,
                             0, None, 0, None) for task in tasks for seed in sw.seeds]
    return trials


def data_paths(plan: SweepPlan, dense_images: int, store_bytes: float) -> dict[str, bool]:
    """Per pretraining mode, whether its runs cache the decoded images, decided once from the *dense*
    size: every run of the sweep, dense or pruned, then reads its images the same way, so a speed-up
    never comes from a pruned run fitting in memory while the dense one streams."""
    from dp4tl_ray.train.trainer import decode_cache_fits

    return {mode: decode_cache_fits(plan.settings("pretrain", mode), dense_images, store_bytes) for mode in plan.sweep.modes}


def _sweep_data_paths(plan: SweepPlan, dense_images: int) -> dict[str, bool]:
    """:func:`data_paths` in this cluster's object store, decided when the sweep starts and kept in the
    work dir (a resumed sweep keeps its data path)."""
    import ray

    path = plan.sweep.work / "data_path.json"
    decided = json.loads(path.read_text())["cache_decoded"] if path.is_file() else {}
    if set(plan.sweep.modes) - set(decided):
        decided = {**data_paths(plan, dense_images, float(ray.cluster_resources().get("object_store_memory", 0))), **decided}
        atomic.write_json(path, {"cache_decoded": decided, "dense_images": dense_images})
    return decided


def prepare(plan: SweepPlan) -> Shared:
    """Do every piece of work trials share, once, and list the trials: data and its data path, then per
    surrogate its features and keep-sets, plus the reference trials (in the config's method order)."""
    from dp4tl_ray.data.source import open_source

    sw = plan.sweep
    sw.work.mkdir(parents=True, exist_ok=True)
    source, tasks = _data(plan, sw.work)
    src = open_source(source, "auto", plan.settings("pretrain").class_index)
    cached = _sweep_data_paths(plan, src.num_rows)
    trials = _reference_trials(plan, len(src.classes), src.num_rows, tasks, cached)
    for ref, methods in methods_per_surrogate(sw).items():
        features = _features(plan, ref, source, tasks, sw.work)
        trials += [t for task in tasks for seed in sw.seeds
                   for t in _keepset_trials(plan, features, methods, task, seed, cached)]
        print(f"[sweep] surrogate {ref.name}: features and keep-sets ready under {sw.work}")
    # Tune runs them in this order: the config's method order (a reference such as dense listed first reports
    # first), then by key. (Sorted by key alone, `methods: [random-init, lm]` still ran lm first.)
    order = {m: i for i, m in enumerate(sw.methods)}
    return Shared(source=source, tasks=tasks, trials=sorted(trials, key=lambda t: (order.get(t.method, len(order)), t.key)))


# ----- one trial (runs in a Tune trial actor) -----


def eval_config(plan: SweepPlan, spec: TrialSpec, mode: str, task_dir: str, model_path: str | None, out: Path):
    """The evaluation of a trial's backbone. Its seed is the trial's, so the hold-out split and the head's
    init vary with the seed like everything upstream and a table over seeds measures the whole spread;
    ``model_path`` None evaluates a seeded, untrained ``spec.arch`` backbone (the random-init baseline)."""
    arch = {"arch": spec.arch} if model_path is None else {}
    return plan.stage("evaluate", **arch, seed=spec.seed, mode=mode, task_dir=task_dir, checkpoint=model_path,
                      out=str(out), storage_path=str(plan.sweep.work / "runs"))


def _evaluate(cfg) -> dict[str, Any]:
    """LP or FF results of an EvalConfig; an evaluation already written for the same checkpoint, mode
    and seed is reused."""
    from dp4tl_ray.train.evaluate import evaluate

    sha = atomic.sha256_file(cfg.checkpoint) if cfg.checkpoint else None
    out = Path(cfg.out)
    if out.is_file():
        done = read_json(out, f"delete {out} and resume the sweep (the evaluation is redone)")
        if (done.get("checkpoint_sha256"), done.get("mode"), done.get("seed")) == (sha, cfg.mode, cfg.seed):
            return done
    return evaluate(cfg)


def _evaluations(plan: SweepPlan, shared: Shared, spec: TrialSpec, trial_id: str, model_path: str | None) -> dict[str, Any]:
    """Every eval mode of the sweep on the trial's task: ``{lp_acc, lp_acc_test_max, ..., eval_s}``."""
    work, out = plan.sweep.work, {}
    t0 = time.perf_counter()
    for mode in plan.sweep.eval_modes:
        ev = _evaluate(eval_config(plan, spec, mode, shared.tasks[spec.task], model_path,
                                   work / "evals" / f"{trial_id}-{mode}.json"))
        out[f"{mode}_acc"] = ev["test_acc"]
        out[f"{mode}_acc_test_max"] = ev["test_acc_max_over_epochs"]
        out["test_images"] = ev["num_test"]  # the same test split in every mode: the report's interval needs it
    out["eval_s"] = round(time.perf_counter() - t0, 3)
    return out


def _record(spec: TrialSpec, trial_id: str) -> dict[str, Any]:
    """The start of a finished trial's record: what the trial was, what its keep-set cost, and that it ran."""
    return {**spec.record_fields(), "trial_id": trial_id, "status": "ok", "error": None, "key": spec.key}


def trial_pretrain_config(plan: SweepPlan, spec: TrialSpec, source: str, work: Path, name: str):
    """The trial's PretrainConfig: the plan's pretrain section for its mode, on its keep-set, with the
    sweep's data path (``cache_decoded`` decided once from the dense size)."""
    path = {} if spec.cache_decoded is None else {"cache_decoded": "true" if spec.cache_decoded else "false"}
    return plan.stage("pretrain", spec.mode, seed=spec.seed, source=source, keepset=spec.keepset,
                      out=str(work / "runs"), name=name, **path)


def _for_tune(record: dict[str, Any]) -> dict[str, Any]:
    """The record as Tune gets it: lists as tuples. Tune's TensorBoard logger tries to plot a list (``reused_stages``)
    as a histogram and warns on the console; a tuple it passes over. :func:`collect_results` turns them back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


def run_trial(config: dict[str, Any], plan: SweepPlan, shared: Shared) -> None:
    """select (load the prepared keep-set) -> pretrain (TorchTrainer named from the trial id) -> evaluate -> report."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dp4tl_ray.select.keepset import KeepSet
    from dp4tl_ray.train.trainer import pretrain

    spec = TrialSpec.from_param(config["trial"])
    trial_id = ray.tune.get_context().get_trial_id()
    work = plan.sweep.work
    done = work / "trials" / f"{trial_id}.json"
    # Killed after the trial finished but before Tune saved that: its record stands, nothing is redone.
    redo = f"delete {done} and resume the sweep (the trial is redone)"
    record = read_json(done, redo, ("method",)) if done.is_file() else None
    reused = record is not None and (record["method"] == RANDOM_INIT or Path(record.get("checkpoint") or "-").is_file())
    with open(work / "trial_starts.log", "a") as f:  # one line per (re)start: how often each trial ran
        f.write(json.dumps({"trial_id": trial_id, "key": spec.key, "time": time.time(), "reused": reused}) + "\n")
    if reused:
        ray.tune.report(_for_tune(record))
        return
    if spec.method == RANDOM_INIT:  # nothing to pretrain: evaluate the seeded untrained backbone
        record = _record(spec, trial_id)
        record.update(pretrain_s=0.0, pretrain_total_s=0.0,
                      checkpoint=None, **_evaluations(plan, shared, spec, trial_id, None))
        atomic.write_json(done, record)
        ray.tune.report(_for_tune(record))
        return
    if spec.keepset:
        KeepSet.load(spec.keepset)  # the sha256 check, before any worker starts
    pcfg = trial_pretrain_config(plan, spec, shared.source, work, f"pretrain-{trial_id}")
    called, t0 = time.time(), time.perf_counter()
    result = pretrain(pcfg, callbacks=[TuneReportCallback()])
    total_s = time.perf_counter() - t0
    epochs_s = sum(h.get("epoch_s", 0.0) for h in result.history)
    first = result.history[0].get("started_at") if result.seconds and result.history else None
    record = _record(spec, trial_id)
    record.update(pretrain_s=round(epochs_s, 3), pretrain_total_s=round(total_s if result.seconds else epochs_s, 3),
                  pretrain_startup_s=None if first is None else round(first - called - result.cache_s, 3),
                  decode_cache_s=round(result.cache_s, 3), cache_decoded=result.cached,
                  workers=pcfg.num_workers, use_gpu=pcfg.use_gpu, gpus_per_worker=1 if pcfg.use_gpu else 0,
                  epoch=result.metrics.get("epoch"), loss=result.metrics.get("loss"), checkpoint=result.model_path)
    record.update(_evaluations(plan, shared, spec, trial_id, result.model_path))
    atomic.write_json(done, record)
    ray.tune.report(_for_tune(record))


# ----- the sweep -----


def _trial_resources(cluster: dict[str, float]) -> dict[str, float]:
    """What a trial driver holds: the head's trial_driver resource when there is one, else a sliver of CPU."""
    return {"CPU": 0, TRIAL_RESOURCE: 1} if cluster.get(TRIAL_RESOURCE) else {"CPU": 0.01}


def concurrent_trials(cluster: dict[str, float], pretrain, n_trials: int, cached: bool = False) -> int:
    """How many trials fit at once, each pretraining as ``pretrain`` (a PretrainConfig) says: GPU runs by
    GPUs (or, on an autoscaling cluster with none up yet, by trial driver slots); CPU runs by workers x
    CPUs, plus one CPU for each run's data loading when its images stream. A run whose decoded keep-set
    is cached (``cached``) loads nothing while it trains - its workers augment their share themselves -
    so it reserves no data CPU: the decode before its fit runs on the CPUs its own workers take next
    (at least one), which no other trial holds."""
    workers = pretrain.num_workers
    slots = int(cluster.get(TRIAL_RESOURCE, 0)) or n_trials
    if pretrain.use_gpu:
        gpus = int(cluster.get("GPU", 0))
        n = gpus // workers if gpus else slots
    else:
        held = workers * float(pretrain.cpus_per_worker)
        need = max(held, 1.0) if cached else held + 1
        n = int(float(cluster.get("CPU", 1)) // need)
    return max(1, min(n, slots, n_trials))


def _mode_cached(shared: Shared, mode: str) -> bool:
    """Whether the trials pretraining in ``mode`` cache their decoded keep-set (the sweep's data path)."""
    return all(t.cache_decoded for t in shared.trials if t.mode == mode)


def build_scheduler(plan: SweepPlan):
    """ASHA over the pretraining epochs (Train forwards each epoch's metrics to Tune), or None (FIFO)."""
    sw = plan.sweep
    if not sw.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=sw.asha.metric, mode=sw.asha.mode,
                         max_t=max(plan.settings("pretrain", m).epochs for m in sw.modes),
                         grace_period=sw.asha.grace_period, reduction_factor=sw.asha.reduction_factor)


def _plan_digest(plan: SweepPlan, shared: Shared) -> str:
    doc = {"plan": {k: v for k, v in asdict(plan).items() if k != "sweep"},
           "trials": [{k: v for k, v in t.to_param().items() if k not in ("select_s", "costs")} for t in shared.trials]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _check_same_sweep(plan: SweepPlan, shared: Shared) -> None:
    """A sweep directory belongs to one config: refuse to resume it under another."""
    path = plan.sweep.work / "plan.json"
    digest = _plan_digest(plan, shared)
    if path.is_file():
        fix = f"delete {path} and resume with the config the sweep was started with, or pick another sweep.name"
        if read_json(path, fix).get("digest") != digest:
            raise UserError(f"sweep {plan.sweep.name} at {plan.sweep.path} was started with another config "
                            "(stages or trials differ); resume it with the same config or pick another sweep.name")
    else:
        atomic.write_json(path, {"digest": digest, "plan": asdict(plan), "trials": [t.to_param() for t in shared.trials]})


def _one_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def collect_results(grid, shared: Shared) -> list[dict[str, Any]]:
    """One record per trial from Tune's result grid (errored and stopped trials included, marked)."""
    by_key = {t.key: t for t in shared.trials}
    records = []
    for r in grid:
        spec = by_key.get(((r.config or {}).get("trial") or {}).get("key"))
        m = dict(r.metrics or {})
        base = spec.record_fields() if spec else {}
        if r.error is not None:
            status, error = "error", _one_line(r.error)
        elif "lp_acc" not in m and "ff_acc" not in m:
            status, error = "stopped", "stopped before evaluation (early stopping)"
        else:
            status, error = "ok", None
        rec = {k: None for k in RECORD_KEYS}
        rec.update(base)
        rec.update({k: list(m[k]) if isinstance(m[k], tuple) else m[k] for k in RECORD_KEYS if k in m})
        rec.update(trial_id=m.get("trial_id", r.metrics.get("trial_id") if r.metrics else None), status=status,
                   error=error, key=spec and spec.key)
        records.append(rec)
    return sorted(records, key=lambda x: x.get("key") or "")


def run_sweep(plan: SweepPlan, verbose: bool = False) -> dict[str, Any]:
    """Prepare the shared work, run (or resume) the Tune experiment, write results.jsonl and the report.
    ``verbose`` adds Tune's per-result tables to its status table and the lines of progress."""
    import ray
    from ray import tune

    from dp4tl_ray.explain.report_pages import explain_keepsets
    from dp4tl_ray.report import write_report
    from dp4tl_ray.sweep_progress import TrialLines, status_table, use_classic_output

    sw = plan.sweep
    # Tune saves its experiment state at most every 10 s by default; a sweep stopped in that window would
    # rerun trials that had finished. Save every few seconds (cheap next to a trial).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    t0 = time.perf_counter()
    shared = prepare(plan)
    _check_same_sweep(plan, shared)
    cluster = ray.cluster_resources()
    n = sw.max_concurrent_trials or min(concurrent_trials(cluster, plan.settings("pretrain", m), len(shared.trials),
                                                          cached=_mode_cached(shared, m)) for m in sw.modes)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, shared=shared), _trial_resources(cluster))
    print(f"[sweep] {len(shared.trials)} trials, {n} at a time -> {sw.path}")
    use_classic_output()  # before the Tuner is made: the one engine that takes the status table's columns
    if tune.Tuner.can_restore(sw.path):
        print(f"[sweep] resuming {sw.path}: finished trials are kept, the rest run")
        tuner = tune.Tuner.restore(sw.path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.to_param() for t in shared.trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=n, scheduler=build_scheduler(plan), reuse_actors=True,
                                        trial_name_creator=lambda t: t.config["trial"]["key"],
                                        trial_dirname_creator=lambda t: f"{t.trial_id}-{t.config['trial']['key']}"),
            run_config=tune.RunConfig(name=sw.name, storage_path=sw.path.rsplit("/", 1)[0], progress_reporter=status_table(),
                                      verbose=3 if verbose else 1,
                                      callbacks=[TrialLines({m: plan.settings("pretrain", m).epochs for m in sw.modes},
                                                            len(shared.trials))]),
        )
    grid = tuner.fit()
    records = collect_results(grid, shared)
    results = write_results(sw.path, records)
    summary = {"sweep": sw.path, "results": results, "trials": len(records),
               "ok": sum(r["status"] == "ok" for r in records), "seconds": round(time.perf_counter() - t0, 1)}
    if summary["ok"]:
        local = sw.work / "report" if is_uri(sw.path) else None  # a report is local files; a URI sweep's goes to work_dir
        report = write_report(sw.path, local)
        report.update(explain_keepsets(report["report.md"].parent, sorted({t.keepset for t in shared.trials if t.keepset})))
        summary["report"] = {k: str(v) for k, v in report.items()}
    return summary


__all__ = ["AshaConfig", "SweepConfig", "SweepPlan", "TrialSpec", "build_scheduler", "check_plan", "collect_results",
           "concurrent_trials", "data_paths", "keepset_costs", "load_plan", "methods_per_surrogate", "prepare", "run_sweep",
           "run_trial", "trial_pretrain_config"]
