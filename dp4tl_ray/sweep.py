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
from dp4tl_ray.atomic import is_uri
from dp4tl_ray.config import from_dict, load_yaml
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import FeatureStore
from dp4tl_ray.progress import say
from dp4tl_ray.results import DENSE, RANDOM_INIT, RECORD_KEYS, REFERENCES, write_results
from dp4tl_ray.select.pipeline import IMAGE_METHODS, METHODS, UNIT_METHODS, select_keepset

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
    """The config dataclass of each stage section (imported here: the train modules pull in torch)."""
    from dp4tl_ray.data.synthetic import SynthConfig
    from dp4tl_ray.features import ExtractConfig
    from dp4tl_ray.select.pipeline import SelectConfig
    from dp4tl_ray.train.evaluate import EvalConfig
    from dp4tl_ray.train.trainer import PretrainConfig

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
    surrogate_checkpoints: dict[str, str] = field(default_factory=dict)  # arch -> local weights; others are trained
    modes: list[str] = field(default_factory=lambda: ["supervised"])
    tasks: list[str] = field(default_factory=list)  # task folder names; empty = every task
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_modes: list[str] = field(default_factory=lambda: ["lp"])
    match_budget: str | None = "lm"  # image-level baselines keep as many images as this method's keep-set
    max_concurrent_trials: int = 0  # 0 = as many as the cluster fits
    asha: AshaConfig = field(default_factory=AshaConfig)

    def validate(self) -> None:
        from dp4tl_ray.train.evaluate import MODES as EVAL_MODES
        from dp4tl_ray.train.trainer import MODES

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
        if self.match_budget and self.match_budget not in UNIT_METHODS + ("random-class",):
            raise UserError(f"sweep.match_budget must be one of {', '.join(UNIT_METHODS)}, random-class or null, "
                            f"got {self.match_budget!r}")
        if set(self.methods) & set(IMAGE_METHODS) and not self.match_budget:
            log.info("image-level baselines keep 1 - ratio of the images (sweep.match_budget is null)")
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
    sweep = {**(raw.get("sweep") or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    plan = SweepPlan(sweep=from_dict(SweepConfig, sweep, "sweep"),
                     **{k: dict(raw[k] or {}) for k in SECTIONS[1:] if k in raw})
    return check_plan(_absolute_paths(plan))


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
    from dp4tl_ray.train.trainer import MODES

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
    for name, fixed in (("surrogate", ("source", "out", "name", "arch")),
                        ("pretrain", ("source", "out", "name", "keepset", "mode", "seed")),
                        ("extract", ("source", "out", "arch", "checkpoint", "num_classes")),
                        ("select", ("method", "ratio", "source_features", "downstream_features", "out", "seed", "match")),
                        ("evaluate", ("task_dir", "checkpoint", "mode", "out", "storage_path"))):
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
    select_s: float  # selection seconds, the surrogate and feature work it needed included
    kept_units: int
    total_units: int | None
    kept_images: int
    total_images: int | None

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


# ----- shared work: data, surrogates, features, keep-sets (driver side, cached) -----


@dataclass
class Shared:
    """What the prepare step produced; trials read only this (paths and costs)."""

    source: str
    tasks: dict[str, str]  # task name -> task dir
    trials: list[TrialSpec]


@dataclass
class SurrogateFeatures:
    """One surrogate's FeatureStores of the source and of every task's train set, and their seconds."""

    arch: str
    surrogate_s: float  # training the surrogate (0 for a given checkpoint)
    source: FeatureStore
    tasks: dict[str, FeatureStore]

    def seconds(self, task: str) -> float:
        """What a keep-set for ``task`` that reads the surrogate's outputs cost before its own selection."""
        return self.surrogate_s + self.source.manifest["seconds"] + self.tasks[task].manifest["seconds"]


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


def _surrogate(plan: SweepPlan, arch: str, source: str, work: Path) -> tuple[str, float]:
    """The surrogate's weights file and its training seconds (0 for a given checkpoint)."""
    from dp4tl_ray.train.trainer import pretrain

    given = plan.sweep.surrogate_checkpoints.get(arch)
    if given:
        if not Path(given).is_file():
            raise UserError(f"sweep.surrogate_checkpoints.{arch}: {given} is not a file")
        return str(Path(given).resolve()), 0.0
    r = pretrain(plan.stage("surrogate", arch=arch, source=source, out=str(work / "runs"), name=f"surrogate-{arch}"),
                 progress=f"surrogate {arch}")
    print(f"[sweep] surrogate {arch}: {r.metrics.get('epoch')} epochs, loss {r.metrics.get('loss', float('nan')):.3f}")
    return r.model_path, float(sum(h.get("epoch_s", 0.0) for h in r.history))


def _features(plan: SweepPlan, arch: str, source: str, tasks: dict[str, str], work: Path) -> SurrogateFeatures:
    """Train (or load) the surrogate ``arch`` and extract the source and every task's train set with it."""
    from dp4tl_ray.features import extract_features

    checkpoint, surrogate_s = _surrogate(plan, arch, source, work)

    def extract(images: str, name: str, **fields: Any) -> FeatureStore:
        return extract_features(plan.stage("extract", arch=arch, checkpoint=checkpoint, source=images,
                                           out=str(work / "features" / arch / name), **fields))

    src = extract(source, "source")
    n_classes = len(src.manifest["classes"])
    return SurrogateFeatures(arch, surrogate_s, src,
                             {task: extract(str(Path(d) / "train"), task, num_classes=n_classes) for task, d in tasks.items()})


def methods_per_surrogate(sw: SweepConfig) -> dict[str, list[str]]:
    """The methods selected with each surrogate, in selection order: unit methods first, since image-level
    baselines keep as many images as the ``match_budget`` method (selected for that even when it is not a
    trial of its own); methods that ignore the surrogate only with the first one."""
    selecting = sorted((m for m in sw.methods if m not in REFERENCES),
                       key=lambda m: (m in IMAGE_METHODS, m != sw.match_budget))
    need_match = sw.match_budget and any(m in IMAGE_METHODS for m in selecting)
    per_arch = {}
    for i, arch in enumerate(sw.surrogates):
        methods = [m for m in selecting if i == 0 or m not in SURROGATE_FREE]
        if not methods:
            break
        if need_match and sw.match_budget not in methods:
            methods.insert(0, sw.match_budget)
        per_arch[arch] = methods
    return per_arch


def _keepset_trials(plan: SweepPlan, features: SurrogateFeatures, methods: list[str], task: str, seed: int) -> list[TrialSpec]:
    """Select every keep-set of ``methods`` x ratios for ``task`` and ``seed`` (each reused when already
    selected from the same inputs); one trial per keep-set and pretraining mode."""
    sw, arch = plan.sweep, features.arch

    def keepset_dir(method: str, ratio: float) -> Path:
        return sw.work / "keepsets" / arch / task / f"{method}-r{_ratio_tag(ratio)}-s{seed}"

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
            costs = ks.meta.extra["costs"]
            select_s = costs["select_s"] + costs["kmeans_s"] + costs["scores_s"] + \
                (0.0 if method in SURROGATE_FREE else features.seconds(task))
            m = ks.meta
            trials += [TrialSpec(method, ratio, None if method in SURROGATE_FREE else arch, mode, task, seed,
                                 plan.settings("pretrain", mode).arch, str(keepset_dir(method, ratio)), round(select_s, 3),
                                 m.units_kept, m.units_total, m.images_kept, m.images_total) for mode in sw.modes]
    return trials


def _reference_trials(plan: SweepPlan, source: str, tasks: dict[str, str]) -> list[TrialSpec]:
    """Dense (the whole source) per task, seed and mode; random init (nothing pretrained) per task and seed."""
    from dp4tl_ray.data.source import open_source

    sw, trials = plan.sweep, []
    if DENSE in sw.methods:
        src = open_source(source, "auto", plan.settings("pretrain").class_index)
        classes, images = len(src.classes), src.num_rows
        trials += [TrialSpec(DENSE, 0.0, None, mode, task, seed, plan.settings("pretrain", mode).arch, None, 0.0,
                             classes, classes, images, images) for task in tasks for seed in sw.seeds for mode in sw.modes]
    if RANDOM_INIT in sw.methods:  # whatever the pretraining mode: nothing is pretrained
        trials += [TrialSpec(RANDOM_INIT, 0.0, None, None, task, seed, plan.settings("pretrain").arch, None, 0.0,
                             0, None, 0, None) for task in tasks for seed in sw.seeds]
    return trials


def prepare(plan: SweepPlan) -> Shared:
    """Do every piece of work trials share, once, and list the trials: data, then per surrogate its
    features and keep-sets, plus the reference trials."""
    sw = plan.sweep
    sw.work.mkdir(parents=True, exist_ok=True)
    source, tasks = _data(plan, sw.work)
    trials = _reference_trials(plan, source, tasks)
    for arch, methods in methods_per_surrogate(sw).items():
        features = _features(plan, arch, source, tasks, sw.work)
        trials += [t for task in tasks for seed in sw.seeds for t in _keepset_trials(plan, features, methods, task, seed)]
        print(f"[sweep] surrogate {arch}: features and keep-sets ready under {sw.work}")
    return Shared(source=source, tasks=tasks, trials=sorted(trials, key=lambda t: t.key))


# ----- one trial (runs in a Tune trial actor) -----


def _evaluate(plan: SweepPlan, mode: str, task_dir: str, model_path: str | None, out: Path, storage: str,
              **overrides: Any) -> dict[str, Any]:
    """LP or FF results; an evaluation already written for the same checkpoint is reused.
    ``model_path`` None evaluates a seeded, untrained backbone (the random-init baseline)."""
    from dp4tl_ray.train.evaluate import evaluate

    sha = atomic.sha256_file(model_path) if model_path else None
    if out.is_file():
        done = json.loads(out.read_text())
        if done.get("checkpoint_sha256") == sha and done.get("mode") == mode:
            return done
    return evaluate(plan.stage("evaluate", **overrides, mode=mode, task_dir=task_dir, checkpoint=model_path, out=str(out),
                               storage_path=storage))


def _evaluations(plan: SweepPlan, shared: Shared, spec: TrialSpec, trial_id: str, model_path: str | None,
                 **overrides: Any) -> dict[str, Any]:
    """Every eval mode of the sweep on the trial's task: ``{lp_acc, lp_acc_test_max, ..., eval_s}``."""
    work, out = plan.sweep.work, {}
    t0 = time.perf_counter()
    for mode in plan.sweep.eval_modes:
        ev = _evaluate(plan, mode, shared.tasks[spec.task], model_path, work / "evals" / f"{trial_id}-{mode}.json",
                       str(work / "runs"), **overrides)
        out[f"{mode}_acc"] = ev["test_acc"]
        out[f"{mode}_acc_test_max"] = ev["test_acc_max_over_epochs"]
    out["eval_s"] = round(time.perf_counter() - t0, 3)
    return out


def _record(spec: TrialSpec, trial_id: str) -> dict[str, Any]:
    """The start of a finished trial's record: what the trial was, and that it ran."""
    record = {k: v for k, v in asdict(spec).items() if k in RECORD_KEYS}
    return {**record, "trial_id": trial_id, "status": "ok", "error": None, "key": spec.key}


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
    record = json.loads(done.read_text()) if done.is_file() else None
    reused = record is not None and (record["method"] == RANDOM_INIT or Path(record.get("checkpoint") or "-").is_file())
    with open(work / "trial_starts.log", "a") as f:  # one line per (re)start: how often each trial ran
        f.write(json.dumps({"trial_id": trial_id, "key": spec.key, "time": time.time(), "reused": reused}) + "\n")
    if reused:
        ray.tune.report(record)
        return
    if spec.method == RANDOM_INIT:  # nothing to pretrain: evaluate the seeded untrained backbone
        record = _record(spec, trial_id)
        record.update(pretrain_s=0.0, pretrain_total_s=0.0,
                      checkpoint=None, **_evaluations(plan, shared, spec, trial_id, None, arch=spec.arch, seed=spec.seed))
        atomic.write_json(done, record)
        ray.tune.report(record)
        return
    if spec.keepset:
        KeepSet.load(spec.keepset)  # the sha256 check, before any worker starts
    pcfg = plan.stage("pretrain", spec.mode, seed=spec.seed, source=shared.source, keepset=spec.keepset,
                      out=str(work / "runs"), name=f"pretrain-{trial_id}")
    t0 = time.perf_counter()
    result = pretrain(pcfg, callbacks=[TuneReportCallback()])
    total_s = time.perf_counter() - t0
    record = _record(spec, trial_id)
    record.update(pretrain_s=round(sum(h.get("epoch_s", 0.0) for h in result.history), 3),
                  pretrain_total_s=round(total_s if result.seconds else sum(h.get("epoch_s", 0.0) for h in result.history), 3),
                  workers=pcfg.num_workers, use_gpu=pcfg.use_gpu, gpus_per_worker=1 if pcfg.use_gpu else 0,
                  epoch=result.metrics.get("epoch"), loss=result.metrics.get("loss"), checkpoint=result.model_path)
    record.update(_evaluations(plan, shared, spec, trial_id, result.model_path))
    atomic.write_json(done, record)
    ray.tune.report(record)


# ----- the sweep -----


def _trial_resources(cluster: dict[str, float]) -> dict[str, float]:
    """What a trial driver holds: the head's trial_driver resource when there is one, else a sliver of CPU."""
    return {"CPU": 0, TRIAL_RESOURCE: 1} if cluster.get(TRIAL_RESOURCE) else {"CPU": 0.01}


def concurrent_trials(cluster: dict[str, float], pretrain, n_trials: int) -> int:
    """How many trials fit at once, each pretraining as ``pretrain`` (a PretrainConfig) says: GPU runs by
    GPUs (or, on an autoscaling cluster with none up yet, by trial driver slots); CPU runs by workers x
    CPUs plus one CPU for each run's data loading."""
    workers = pretrain.num_workers
    slots = int(cluster.get(TRIAL_RESOURCE, 0)) or n_trials
    if pretrain.use_gpu:
        gpus = int(cluster.get("GPU", 0))
        n = gpus // workers if gpus else slots
    else:
        need = workers * float(pretrain.cpus_per_worker) + 1
        n = int(float(cluster.get("CPU", 1)) // need)
    return max(1, min(n, slots, n_trials))


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
           "trials": [{k: v for k, v in t.to_param().items() if k != "select_s"} for t in shared.trials]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _check_same_sweep(plan: SweepPlan, shared: Shared) -> None:
    """A sweep directory belongs to one config: refuse to resume it under another."""
    path = plan.sweep.work / "plan.json"
    digest = _plan_digest(plan, shared)
    if path.is_file():
        if json.loads(path.read_text()).get("digest") != digest:
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
        base = {k: v for k, v in asdict(spec).items() if k in RECORD_KEYS} if spec else {}
        if r.error is not None:
            status, error = "error", _one_line(r.error)
        elif "lp_acc" not in m and "ff_acc" not in m:
            status, error = "stopped", "stopped before evaluation (early stopping)"
        else:
            status, error = "ok", None
        rec = {k: None for k in RECORD_KEYS}
        rec.update(base)
        rec.update({k: m[k] for k in RECORD_KEYS if k in m})
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
    n = sw.max_concurrent_trials or min(concurrent_trials(cluster, plan.settings("pretrain", m), len(shared.trials))
                                        for m in sw.modes)
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
            tune_config=tune.TuneConfig(max_concurrent_trials=n, scheduler=build_scheduler(plan),
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
           "concurrent_trials", "load_plan", "methods_per_surrogate", "prepare", "run_sweep", "run_trial"]
