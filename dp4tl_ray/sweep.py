"""Ray Tune sweeps: method x pruning ratio x surrogate x pretraining mode x task x seed.

One trial = select -> pretrain -> evaluate. The work trials share is prepared once, on the driver,
before Tune starts: surrogate training (per surrogate arch), feature extraction of the source and of
every task, k-means (per surrogate, k and seed) and the keep-sets themselves, each cached on disk and
reused when the sweep (or another sweep with the same work dir) runs again. A trial then loads its
keep-set (checked against its sha256), fits a TorchTrainer named from its trial id, evaluates the
backbone (LP and/or FF) and reports one record. ``results.jsonl`` (one record per trial) and the
report are written when the sweep ends.

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
from dp4tl_ray.config import from_dict, load_yaml
from dp4tl_ray.errors import UserError

log = logging.getLogger(__name__)

DENSE = "dense"
RANDOM_INIT = "random-init"  # no pretraining: the downstream evaluation of a seeded untrained backbone (the floor)
REFERENCES = (DENSE, RANDOM_INIT)  # methods without a keep-set or a ratio
SURROGATE_FREE = (DENSE, "random-class", "random-image")  # methods that never look at the surrogate's outputs
SECTIONS = ("sweep", "synth", "data", "surrogate", "extract", "select", "pretrain", "pretrain_by_mode", "evaluate")
TRIAL_RESOURCE = "trial_driver"  # custom resource (cluster.yaml puts it on the head) that Tune trial drivers hold
RESULTS_FILE = "results.jsonl"
RECORD_KEYS = ("trial_id", "status", "error", "method", "ratio", "surrogate", "mode", "arch", "task", "seed",
               "lp_acc", "ff_acc", "lp_acc_test_max", "ff_acc_test_max", "kept_units", "total_units", "kept_images",
               "total_images", "select_s", "pretrain_s", "pretrain_total_s", "eval_s", "workers", "gpus_per_worker",
               "use_gpu", "epoch", "loss")


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
        from dp4tl_ray.select.pipeline import IMAGE_METHODS, METHODS, UNIT_METHODS
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
        return f"{self.storage_path.rstrip('/')}/{self.name}" if "://" in self.storage_path else \
            str(Path(self.storage_path).resolve() / self.name)

    @property
    def work(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir).resolve()
        if "://" in self.storage_path:
            raise UserError("sweep.storage_path is a URI: set sweep.work_dir to a filesystem every node mounts (EFS/NFS)")
        return Path(self.path) / "work"


@dataclass
class SweepPlan:
    """Every section of a sweep YAML: the search space plus each stage's settings (as dicts, the
    per-trial values - arch, mode, method, ratio, seed, paths - are filled in by the sweep)."""

    sweep: SweepConfig
    synth: dict[str, Any] | None = None
    data: dict[str, Any] | None = None  # {source: dir, tasks: [task dirs]} when there is no synth section
    surrogate: dict[str, Any] = field(default_factory=dict)
    extract: dict[str, Any] = field(default_factory=dict)
    select: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    pretrain_by_mode: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. moco_v2: {lr: 0.06, epochs: 200}
    evaluate: dict[str, Any] = field(default_factory=dict)

    def pretrain_for(self, mode: str) -> dict[str, Any]:
        """The pretrain section with ``mode``'s own overrides (recipes differ: MoCo's lr is not SGD's)."""
        return {**self.pretrain, **(self.pretrain_by_mode.get(mode) or {})}


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
    return path if "://" in path else str(Path(path).expanduser().resolve())


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
    from dp4tl_ray.data.synthetic import SynthConfig
    from dp4tl_ray.features import ExtractConfig
    from dp4tl_ray.select.pipeline import SelectConfig
    from dp4tl_ray.train.evaluate import EvalConfig
    from dp4tl_ray.train.trainer import MODES, PretrainConfig

    plan.sweep.validate()
    if (plan.synth is None) == (plan.data is None):
        raise UserError("a sweep config needs exactly one of the sections synth (generated data) and data "
                        "({source: <train dir or shards>, tasks: [<task dirs>]})")
    if plan.synth is not None:
        from_dict(SynthConfig, {**plan.synth, "root": "-"}, "synth")
    else:
        unknown = sorted(set(plan.data) - {"source", "tasks"})
        if unknown or not plan.data.get("source") or not plan.data.get("tasks"):
            raise UserError("data section needs source: <dir> and tasks: [<task dir>, ...] and nothing else")
    for name, cls, fixed in (("surrogate", PretrainConfig, ("source", "out", "name", "arch")),
                             ("pretrain", PretrainConfig, ("source", "out", "name", "keepset", "mode", "seed")),
                             ("extract", ExtractConfig, ("source", "out", "arch", "checkpoint", "num_classes")),
                             ("select", SelectConfig, ("method", "ratio", "source_features", "downstream_features",
                                                       "out", "seed", "match")),
                             ("evaluate", EvalConfig, ("task_dir", "checkpoint", "mode", "out", "storage_path"))):
        section = getattr(plan, name)
        set_here = sorted(set(section) & set(fixed))
        if set_here:
            raise UserError(f"{name}.{set_here[0]} is set by the sweep for every trial; remove it from the {name} section")
        from_dict(cls, {**section, **{k: "-" for k in fixed if k in ("source", "out", "source_features", "task_dir")},
                        **({"method": "lm", "ratio": 0.5} if cls is SelectConfig else {})}, name)
    unknown_modes = sorted(set(plan.pretrain_by_mode) - set(MODES))
    if unknown_modes:
        raise UserError(f"pretrain_by_mode names unknown mode(s) {unknown_modes}; modes are {', '.join(MODES)}")
    for mode in plan.pretrain_by_mode:
        overrides = plan.pretrain_by_mode[mode] or {}
        if "mode" in overrides or "keepset" in overrides:
            raise UserError(f"pretrain_by_mode.{mode}: mode and keepset are set by the sweep")
        from_dict(PretrainConfig, {**plan.pretrain_for(mode), "source": "-", "out": "-"}, f"pretrain_by_mode.{mode}")
    if any(plan.pretrain_for(m).get("num_workers", 1) < 1 for m in plan.sweep.modes):
        raise UserError("pretrain.num_workers must be >= 1 in a sweep: Ray Train's local mode cannot run inside a Tune trial")
    return plan


# ----- shared work: data, surrogates, features, keep-sets (driver side, cached) -----


@dataclass
class Shared:
    """What the prepare step produced; trials read only this (paths and costs)."""

    source: str
    tasks: dict[str, str]  # task name -> task dir
    trials: list[dict[str, Any]]  # one spec per trial


def _data(plan: SweepPlan, work: Path) -> tuple[str, dict[str, str]]:
    """Source dir and task dirs, generating the synthetic data first when the plan has a synth section."""
    if plan.synth is not None:
        from dp4tl_ray.data.synthetic import SynthConfig, generate

        s = generate(from_dict(SynthConfig, {**plan.synth, "root": str(work / "data")}, "synth"))
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
    from dp4tl_ray.train.trainer import PretrainConfig, pretrain

    given = plan.sweep.surrogate_checkpoints.get(arch)
    if given:
        if not Path(given).is_file():
            raise UserError(f"sweep.surrogate_checkpoints.{arch}: {given} is not a file")
        return str(Path(given).resolve()), 0.0
    r = pretrain(from_dict(PretrainConfig, {**plan.surrogate, "arch": arch, "source": source,
                                            "out": str(work / "runs"), "name": f"surrogate-{arch}"}, "surrogate"))
    print(f"[sweep] surrogate {arch}: {r.metrics.get('epoch')} epochs, loss {r.metrics.get('loss', float('nan')):.3f}")
    return r.model_path, float(sum(h.get("epoch_s", 0.0) for h in r.history))


def _ratio_tag(ratio: float) -> str:
    return f"{ratio:g}".replace(".", "p")


def _select(plan: SweepPlan, method: str, ratio: float, seed: int, source_store, task_store, out: Path,
            match: Path | None) -> tuple[dict[str, Any], float]:
    """The keep-set's metadata and its own selection seconds; reused when ``out`` holds the same selection."""
    from dp4tl_ray.select.keepset import KeepSet
    from dp4tl_ray.select.pipeline import SelectConfig, select_keepset

    cfg = from_dict(SelectConfig, {**plan.select, "method": method, "ratio": ratio, "seed": seed,
                                   "source_features": str(source_store.path),
                                   "downstream_features": [str(task_store.path)], "out": str(out),
                                   "match": str(match) if match and method in _image_methods() else None}, "select")
    key = hashlib.sha256(json.dumps({**asdict(cfg), "source_key": source_store.manifest["store_key"],
                                     "task_key": task_store.manifest["store_key"],
                                     "match_sha": KeepSet.load(match).meta.sha256 if cfg.match else None},
                                    sort_keys=True).encode()).hexdigest()
    sidecar = out.parent / f"{out.name}.select.json"
    if sidecar.is_file():
        done = json.loads(sidecar.read_text())
        if done.get("key") == key:
            try:
                return asdict(KeepSet.load(out).meta), float(done["seconds"])
            except UserError as e:
                log.warning("cached keep-set %s is unusable (%s): selecting again", out, e)
    t0 = time.perf_counter()
    keepset = select_keepset(cfg)
    seconds = time.perf_counter() - t0
    atomic.write_json(sidecar, {"key": key, "seconds": round(seconds, 3), "config": asdict(cfg)})
    return asdict(keepset.meta), seconds


def _image_methods() -> tuple[str, ...]:
    from dp4tl_ray.select.pipeline import IMAGE_METHODS

    return IMAGE_METHODS


def _uses_kmeans(method: str) -> bool:
    from dp4tl_ray.select.pipeline import KMEANS_METHODS

    return method in KMEANS_METHODS


def prepare(plan: SweepPlan) -> Shared:
    """Do every piece of work trials share, once, and list the trials."""
    from dp4tl_ray.features import ExtractConfig, extract_features
    from dp4tl_ray.kmeans import kmeans_distributed
    from dp4tl_ray.select.pipeline import SelectConfig, kmeans_config

    sw = plan.sweep
    work = sw.work
    work.mkdir(parents=True, exist_ok=True)
    source, tasks = _data(plan, work)
    trials: list[dict[str, Any]] = []
    common = {"arch": plan.pretrain.get("arch", "resnet50")}
    selecting = [m for m in sw.methods if m not in REFERENCES]
    # Unit methods first: image-level baselines match their image budget.
    order = sorted(selecting, key=lambda m: (m in _image_methods(), m != sw.match_budget))
    need_match = bool(set(selecting) & set(_image_methods())) and sw.match_budget
    for i, arch in enumerate(sw.surrogates if selecting else []):
        uses_surrogate = [m for m in order if m not in SURROGATE_FREE]
        if i > 0 and not uses_surrogate:
            break
        ckpt, surrogate_s = _surrogate(plan, arch, source, work)
        extract = {**plan.extract, "arch": arch, "checkpoint": ckpt}
        src_store = extract_features(from_dict(ExtractConfig, {**extract, "source": source,
                                                               "out": str(work / "features" / arch / "source")}, "extract"))
        n_classes = len(src_store.manifest["classes"])
        for task, task_dir in tasks.items():
            task_store = extract_features(from_dict(ExtractConfig, {**extract, "source": str(Path(task_dir) / "train"),
                                                                    "out": str(work / "features" / arch / task),
                                                                    "num_classes": n_classes}, "extract"))
            shared_s = surrogate_s + src_store.manifest["seconds"] + task_store.manifest["seconds"]
            for seed in sw.seeds:
                kmeans_s = 0.0
                if any(_uses_kmeans(m) for m in order):
                    kcfg = kmeans_config(from_dict(SelectConfig, {**plan.select, "method": "fm", "ratio": 0.5, "seed": seed,
                                                                  "source_features": str(src_store.path)}, "select"), src_store)
                    kmeans_s = kmeans_distributed(src_store.path, kcfg).seconds
                methods = [m for m in order if i == 0 or m not in SURROGATE_FREE]
                if need_match and sw.match_budget not in methods:
                    methods.insert(0, sw.match_budget)
                for ratio in sw.ratios:
                    for method in methods:
                        out = work / "keepsets" / arch / task / f"{method}-r{_ratio_tag(ratio)}-s{seed}"
                        match = work / "keepsets" / arch / task / f"{sw.match_budget}-r{_ratio_tag(ratio)}-s{seed}"
                        meta, own_s = _select(plan, method, ratio, seed, src_store, task_store, out,
                                              match if need_match else None)
                        if method not in sw.methods:
                            continue  # computed only as another method's image budget
                        cost = own_s + (0.0 if method in SURROGATE_FREE else shared_s) + (kmeans_s if _uses_kmeans(method) else 0.0)
                        for mode in sw.modes:
                            trials.append({
                                "method": method, "ratio": ratio, "surrogate": None if method in SURROGATE_FREE else arch,
                                "mode": mode, "task": task, "seed": seed, "keepset": str(out), "select_s": round(cost, 3),
                                "kept_units": meta["units_kept"], "total_units": meta["units_total"],
                                "kept_images": meta["images_kept"], "total_images": meta["images_total"], **common})
        print(f"[sweep] surrogate {arch}: features and keep-sets ready under {work}")
    if DENSE in sw.methods:
        from dp4tl_ray.data.source import open_source

        src = open_source(source, "auto", plan.pretrain.get("class_index"))
        for task in tasks:
            for seed in sw.seeds:
                for mode in sw.modes:
                    trials.insert(0, {"method": DENSE, "ratio": 0.0, "surrogate": None, "mode": mode, "task": task,
                                      "seed": seed, "keepset": None, "select_s": 0.0, "kept_units": len(src.classes),
                                      "total_units": len(src.classes), "kept_images": src.num_rows,
                                      "total_images": src.num_rows, **common})
    if RANDOM_INIT in sw.methods:  # one per task and seed, whatever the pretraining mode: nothing is pretrained
        trials += [{"method": RANDOM_INIT, "ratio": 0.0, "surrogate": None, "mode": None, "task": task, "seed": seed,
                    "keepset": None, "select_s": 0.0, "kept_units": 0, "total_units": None, "kept_images": 0,
                    "total_images": None, **common} for task in tasks for seed in sw.seeds]
    for t in trials:
        t["key"] = "-".join(str(x) for x in (t["method"], _ratio_tag(t["ratio"]), t["surrogate"] or "any", t["mode"] or "any",
                                              t["task"], f"s{t['seed']}"))
    trials.sort(key=lambda t: t["key"])
    return Shared(source=source, tasks=tasks, trials=trials)


# ----- one trial (runs in a Tune trial actor) -----


def _evaluate(plan: SweepPlan, mode: str, task_dir: str, model_path: str | None, out: Path, storage: str,
              **overrides: Any) -> dict[str, Any]:
    """LP or FF results; an evaluation already written for the same checkpoint is reused.
    ``model_path`` None evaluates a seeded, untrained backbone (the random-init baseline)."""
    from dp4tl_ray.train.evaluate import EvalConfig, evaluate

    sha = atomic.sha256_file(model_path) if model_path else None
    if out.is_file():
        done = json.loads(out.read_text())
        if done.get("checkpoint_sha256") == sha and done.get("mode") == mode:
            return done
    return evaluate(from_dict(EvalConfig, {**plan.evaluate, **overrides, "mode": mode, "task_dir": task_dir,
                                           "checkpoint": model_path, "out": str(out), "storage_path": storage}, "evaluate"))


def _evaluations(plan: SweepPlan, shared: Shared, spec: dict[str, Any], trial_id: str, model_path: str | None,
                 **overrides: Any) -> dict[str, Any]:
    """Every eval mode of the sweep on the trial's task: ``{lp_acc, lp_acc_test_max, ..., eval_s}``."""
    work, out = plan.sweep.work, {}
    t0 = time.perf_counter()
    for mode in plan.sweep.eval_modes:
        ev = _evaluate(plan, mode, shared.tasks[spec["task"]], model_path, work / "evals" / f"{trial_id}-{mode}.json",
                       str(work / "runs"), **overrides)
        out[f"{mode}_acc"] = ev["test_acc"]
        out[f"{mode}_acc_test_max"] = ev["test_acc_max_over_epochs"]
    out["eval_s"] = round(time.perf_counter() - t0, 3)
    return out


def _record(spec: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The start of a finished trial's record: what the trial was, and that it ran."""
    record = {k: spec[k] for k in ("method", "ratio", "surrogate", "mode", "arch", "task", "seed", "select_s",
                                   "kept_units", "total_units", "kept_images", "total_images")}
    return {**record, "trial_id": trial_id, "status": "ok", "error": None, "key": spec["key"]}


def run_trial(config: dict[str, Any], plan: SweepPlan, shared: Shared) -> None:
    """select (load the prepared keep-set) -> pretrain (TorchTrainer named from the trial id) -> evaluate -> report."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dp4tl_ray.select.keepset import KeepSet
    from dp4tl_ray.train.trainer import PretrainConfig, pretrain

    spec = config["trial"]
    trial_id = ray.tune.get_context().get_trial_id()
    work = plan.sweep.work
    done = work / "trials" / f"{trial_id}.json"
    # Killed after the trial finished but before Tune saved that: its record stands, nothing is redone.
    record = json.loads(done.read_text()) if done.is_file() else None
    reused = record is not None and (record["method"] == RANDOM_INIT or Path(record.get("checkpoint") or "-").is_file())
    with open(work / "trial_starts.log", "a") as f:  # one line per (re)start: how often each trial ran
        f.write(json.dumps({"trial_id": trial_id, "key": spec["key"], "time": time.time(), "reused": reused}) + "\n")
    if reused:
        ray.tune.report(record)
        return
    if spec["method"] == RANDOM_INIT:  # nothing to pretrain: evaluate the seeded untrained backbone
        record = _record(spec, trial_id)
        record.update(pretrain_s=0.0, pretrain_total_s=0.0,
                      checkpoint=None, **_evaluations(plan, shared, spec, trial_id, None, arch=spec["arch"],
                                                      seed=spec["seed"]))
        atomic.write_json(done, record)
        ray.tune.report(record)
        return
    if spec["keepset"]:
        KeepSet.load(spec["keepset"])  # the sha256 check, before any worker starts
    pcfg = from_dict(PretrainConfig, {**plan.pretrain_for(spec["mode"]), "mode": spec["mode"], "seed": spec["seed"],
                                      "source": shared.source, "keepset": spec["keepset"],
                                      "out": str(work / "runs"), "name": f"pretrain-{trial_id}"}, "pretrain")
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


def concurrent_trials(cluster: dict[str, float], pretrain: dict[str, Any], n_trials: int) -> int:
    """How many trials fit at once: GPU runs by GPUs (or, on an autoscaling cluster with none up yet, by
    trial driver slots); CPU runs by workers x CPUs plus one CPU for each run's data loading."""
    workers = int(pretrain.get("num_workers", 1))
    slots = int(cluster.get(TRIAL_RESOURCE, 0)) or n_trials
    if pretrain.get("use_gpu"):
        gpus = int(cluster.get("GPU", 0))
        n = gpus // workers if gpus else slots
    else:
        need = workers * float(pretrain.get("cpus_per_worker", 1)) + 1
        n = int(float(cluster.get("CPU", 1)) // need)
    return max(1, min(n, slots, n_trials))


def build_scheduler(plan: SweepPlan):
    """ASHA over the pretraining epochs (Train forwards each epoch's metrics to Tune), or None (FIFO)."""
    sw = plan.sweep
    if not sw.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=sw.asha.metric, mode=sw.asha.mode,
                         max_t=max(int(plan.pretrain_for(m).get("epochs", 90)) for m in sw.modes),
                         grace_period=sw.asha.grace_period, reduction_factor=sw.asha.reduction_factor)


def _plan_digest(plan: SweepPlan, shared: Shared) -> str:
    doc = {"plan": {k: v for k, v in asdict(plan).items() if k != "sweep"},
           "trials": [{k: v for k, v in t.items() if k != "select_s"} for t in shared.trials]}
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
        atomic.write_json(path, {"digest": digest, "plan": asdict(plan), "trials": shared.trials})


def _one_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def collect_results(grid, shared: Shared) -> list[dict[str, Any]]:
    """One record per trial from Tune's result grid (errored and stopped trials included, marked)."""
    by_key = {t["key"]: t for t in shared.trials}
    records = []
    for r in grid:
        spec = by_key.get(((r.config or {}).get("trial") or {}).get("key"), {})
        m = dict(r.metrics or {})
        base = {k: spec.get(k) for k in RECORD_KEYS if k in spec}
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
                   error=error, key=spec.get("key"))
        records.append(rec)
    return sorted(records, key=lambda x: x.get("key") or "")


def write_results(path: str, records: list[dict[str, Any]]) -> str:
    """``results.jsonl`` in the sweep directory (local: atomic rename; URI: one pyarrow write)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    target = f"{path}/{RESULTS_FILE}"
    if "://" in path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(target)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
    else:
        atomic.write_bytes(Path(target), text.encode())
    return target


def run_sweep(plan: SweepPlan) -> dict[str, Any]:
    """Prepare the shared work, run (or resume) the Tune experiment, write results.jsonl and the report."""
    import ray
    from ray import tune

    sw = plan.sweep
    # Tune saves its experiment state at most every 10 s by default; a sweep stopped in that window would
    # rerun trials that had finished. Save every few seconds (cheap next to a trial).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if not ray.is_initialized():
        ray.init()
    t0 = time.perf_counter()
    shared = prepare(plan)
    _check_same_sweep(plan, shared)
    cluster = ray.cluster_resources()
    n = sw.max_concurrent_trials or min(concurrent_trials(cluster, plan.pretrain_for(m), len(shared.trials)) for m in sw.modes)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, shared=shared), _trial_resources(cluster))
    print(f"[sweep] {len(shared.trials)} trials, {n} at a time -> {sw.path}")
    if tune.Tuner.can_restore(sw.path):
        print(f"[sweep] resuming {sw.path}: finished trials are kept, the rest run")
        tuner = tune.Tuner.restore(sw.path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(shared.trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=n, scheduler=build_scheduler(plan),
                                        trial_name_creator=lambda t: t.config["trial"]["key"],
                                        trial_dirname_creator=lambda t: f"{t.trial_id}-{t.config['trial']['key']}"),
            run_config=tune.RunConfig(name=sw.name, storage_path=sw.path.rsplit("/", 1)[0]),
        )
    grid = tuner.fit()
    records = collect_results(grid, shared)
    results = write_results(sw.path, records)
    summary = {"sweep": sw.path, "results": results, "trials": len(records),
               "ok": sum(r["status"] == "ok" for r in records), "seconds": round(time.perf_counter() - t0, 1)}
    try:
        from dp4tl_ray.report import write_report
    except ImportError:  # the report module is optional in a stripped-down install
        write_report = None
    if write_report is not None and summary["ok"]:
        local = None if "://" not in sw.path else sw.work / "report"  # a report is local files; a URI sweep's goes to work_dir
        summary["report"] = {k: str(v) for k, v in write_report(sw.path, local).items()}
    return summary


__all__ = ["AshaConfig", "SweepConfig", "SweepPlan", "build_scheduler", "check_plan", "collect_results", "concurrent_trials", "load_plan",
           "prepare", "run_sweep", "run_trial", "write_results"]
