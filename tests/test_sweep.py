"""The sweep: config checks and resource maths without Ray; a real `ray job submit` of the tiny sweep
to a real local head (`ray start --head`, token auth on), stopped midway and resumed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dp4tl_ray.errors import UserError
from dp4tl_ray.sweep import TRIAL_RESOURCE, concurrent_trials, load_plan

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "sweep_tiny.yaml"


def _write(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(TINY.read_text())
    edit(doc)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(extra={}), "unknown section"),
    (lambda d: d["sweep"].update(ratios=[1.0]), "is not in (0, 1)"),
    (lambda d: d["sweep"].update(methods=["lm", "magic"]), "unknown method 'magic'"),
    (lambda d: d["sweep"].update(modes=["simclr"]), "unknown mode 'simclr'"),
    (lambda d: d["pretrain"].update(num_workers=0), "local mode cannot run inside a Tune trial"),
    (lambda d: d["pretrain"].update(keepset="x"), "pretrain.keepset is set by the sweep"),
    (lambda d: d["pretrain"].update(epoch=3), "unknown key(s) ['epoch']"),
    (lambda d: d.update(data={"source": "a", "tasks": ["b"]}), "exactly one of the sections synth"),
    (lambda d: d["sweep"].update(match_budget="el2n"), "match_budget must be one of"),
    (lambda d: d["sweep"].update(surrogate_modes={"lm": "moco_v2"}), "LM votes with class predictions"),
    (lambda d: d["sweep"].update(surrogate_modes={"fm": "moco_v2"}), "surrogate_modes.fm: only the sweep's own"),
    (lambda d: d["sweep"].update(surrogate_modes={"lm": "simclr"}), "unknown mode 'simclr'"),
    (lambda d: d["evaluate"].update(seed=3), "evaluate.seed is set by the sweep"),
    (lambda d: d["surrogate"].update(mode="moco_v2"), "surrogate.mode is set by the sweep"),
    (lambda d: d["sweep"].update(surrogate_costs={"resnet50": 60}), "a declared cost is for a given checkpoint"),
    (lambda d: d["sweep"].update(surrogate_checkpoints={"resnet50": "w.pt"}, surrogate_costs={"resnet50": -1}),
     "must be seconds >= 0"),
])
def test_bad_sweep_config_is_a_one_line_error(tmp_path, edit, message):
    with pytest.raises(UserError) as e:
        load_plan(_write(tmp_path, edit))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_replace_the_sweep_section(tmp_path):
    plan = load_plan(TINY, {"name": "other", "storage_path": str(tmp_path), "work_dir": None})
    assert plan.sweep.name == "other" and plan.sweep.path == str(tmp_path.resolve() / "other")
    assert plan.sweep.work == tmp_path.resolve() / "other" / "work"
    uri = load_plan(TINY, {"storage_path": "s3://bucket/sweeps"}).sweep
    assert uri.path == "s3://bucket/sweeps/tiny"
    with pytest.raises(UserError, match="work_dir"):
        _ = uri.work


def test_relative_paths_are_fixed_on_the_driver(tmp_path, monkeypatch):
    """Tune runs each trial in its own working directory: a relative storage path must not follow it."""
    monkeypatch.chdir(tmp_path)
    plan = load_plan(TINY, {"storage_path": "out/sweeps", "work_dir": "shared/work"})
    monkeypatch.chdir("/")
    assert plan.sweep.path == str(tmp_path.resolve() / "out" / "sweeps" / "tiny")
    assert plan.sweep.work == tmp_path.resolve() / "shared" / "work"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "jobs" / "configs").glob("*.yaml")))
def test_shipped_configs_pass_every_check(name):
    """demo, reproduce, imagenet, gpu-smoke: every section's keys and values are checked on load."""
    plan = load_plan(REPO / "jobs" / "configs" / name)
    assert plan.sweep.methods and plan.sweep.ratios


def test_gpu_smoke_config_puts_every_stage_on_the_gpu():
    from dp4tl_ray.featurestore import FeatureStore
    from dp4tl_ray.select.pipeline import SelectConfig, kmeans_config

    plan = load_plan(REPO / "jobs" / "configs" / "gpu-smoke.yaml")
    assert plan.surrogate["use_gpu"] and plan.pretrain["use_gpu"] and plan.evaluate["use_gpu"]
    select = SelectConfig(method="fm", ratio=0.8, source_features="-", downstream_features=["-"],
                          **plan.select)
    store = FeatureStore(Path("-"), {"classes": [f"c{i}" for i in range(40)]})
    kcfg = kmeans_config(select, store)
    assert kcfg.num_gpus_per_actor == 0.5 and kcfg.num_actors == 2 and kcfg.k == 40


def test_surrogate_free_methods_are_selected_once_and_the_budget_method_first():
    from dp4tl_ray.sweep import SurrogateRef, SweepConfig, methods_per_surrogate

    sw = SweepConfig(methods=["dense", "random-image", "fm", "random-class", "moderate"], surrogates=["resnet18", "resnet50"])
    assert methods_per_surrogate(sw) == {SurrogateRef("resnet18"): ["lm", "fm", "random-class", "random-image", "moderate"],
                                         SurrogateRef("resnet50"): ["lm", "fm", "moderate"]}
    assert methods_per_surrogate(SweepConfig(methods=["random-class"], surrogates=["resnet18", "resnet50"])) == \
        {SurrogateRef("resnet18"): ["random-class"]}


def test_fm_gets_its_own_self_supervised_surrogate():
    from dp4tl_ray.sweep import SurrogateRef, SweepConfig, methods_per_surrogate

    sw = SweepConfig(methods=["dense", "lm", "fm", "fm-reverse", "moderate"], surrogate_modes={"fm": "moco_v2"})
    sw.validate()
    moco = SurrogateRef("resnet18", "moco_v2")
    assert methods_per_surrogate(sw) == {SurrogateRef("resnet18"): ["lm", "fm-reverse", "moderate"], moco: ["fm"]}
    assert moco.name == "resnet18-moco_v2" and SurrogateRef("resnet18").name == "resnet18"
    # the baselines go with the method whose image budget they keep: its keep-set is selected beside them
    by_fm = SweepConfig(methods=["lm", "fm", "moderate", "random-class"], surrogate_modes={"fm": "moco_v2"}, match_budget="fm")
    assert methods_per_surrogate(by_fm) == {moco: ["fm", "random-class", "moderate"], SurrogateRef("resnet18"): ["lm"]}


def test_a_plan_pairing_a_method_with_a_mode_the_paper_does_not_says_so(caplog):
    from dp4tl_ray.sweep import SweepConfig

    with caplog.at_level(logging.WARNING, logger="dp4tl_ray.sweep"):
        SweepConfig(methods=["dense", "lm", "fm", "random-class"], modes=["supervised", "moco_v2"]).validate()
    assert [r.getMessage().split(". ")[0] for r in caplog.records] == \
        ["Outside the paper's pairings: fm under supervised, lm under moco_v2"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dp4tl_ray.sweep"):
        SweepConfig(methods=["dense", "lm", "lm-reverse", "moderate"], modes=["supervised", "adversarial"]).validate()
        SweepConfig(methods=["fm", "fm-reverse", "random-class"], modes=["moco_v2"]).validate()
    assert not caplog.records


def test_a_surrogate_checkpoint_is_given_per_surrogate_name(tmp_path):
    from dp4tl_ray.sweep import SurrogateCost, SurrogateRef, _surrogate

    (tmp_path / "moco.pt").write_bytes(b"weights")
    plan = load_plan(_write(tmp_path, lambda d: d["sweep"].update(
        methods=["lm", "fm"], surrogate_modes={"fm": "moco_v2"},
        surrogate_checkpoints={"resnet18-moco_v2": str(tmp_path / "moco.pt")})))
    assert _surrogate(plan, SurrogateRef("resnet18", "moco_v2"), "-", tmp_path) == \
        (str(tmp_path / "moco.pt"), SurrogateCost(None, "undeclared"))  # a given checkpoint with no declared cost


def test_the_evaluation_follows_the_trial_seed(tmp_path):
    from dp4tl_ray.sweep import TrialSpec, eval_config

    plan = load_plan(TINY, {"storage_path": str(tmp_path)})
    spec = lambda seed: TrialSpec("lm", 0.5, "resnet18", "supervised", "task_0", seed, "resnet18", "/k", 1.0, 3, 6, 24, 48)  # noqa: E731
    a, b, c = (eval_config(plan, spec(s), "lp", "/t", "/m.pt", tmp_path / "e.json") for s in (0, 0, 1))
    assert a.seed == b.seed == 0 and c.seed == 1  # and so the hold-out split and the head init (test_evaluate)
    assert a == b and {k for k in vars(a) if getattr(a, k) != getattr(c, k)} == {"seed"}
    floor = eval_config(plan, TrialSpec("random-init", 0.0, None, None, "task_0", 2, "resnet34", None, 0.0, 0, None, 0, None),
                        "lp", "/t", None, tmp_path / "f.json")
    assert floor.seed == 2 and floor.arch == "resnet34" and floor.checkpoint is None


def test_a_trial_spec_is_plain_data_for_tune_and_back():
    from dp4tl_ray.sweep import TrialSpec

    spec = TrialSpec("lm", 0.5, "resnet18", "supervised", "task_0", 1, "resnet50", "/w/keepsets/x", 12.5, 3, 6, 24, 48)
    param = spec.to_param()
    assert param["key"] == "lm-0p5-resnet18-supervised-task_0-s1" and json.loads(json.dumps(param)) == param
    assert TrialSpec.from_param(param) == spec


def test_dense_and_pruned_runs_share_the_data_path_decided_from_the_dense_size(tmp_path):
    """The decode cache is decided once from the dense size: a pruned keep-set that alone would fit the
    object store still streams when the dense source does not (and the other way round)."""
    from dp4tl_ray.sweep import TrialSpec, data_paths, trial_pretrain_config
    from dp4tl_ray.train.trainer import decode_cache_fits

    plan = load_plan(TINY)
    settings = plan.settings("pretrain", "supervised")
    dense, store = 1000, 1.6e6  # 16 px: 780 B an image; a quarter of the store holds ~512 images
    assert decode_cache_fits(settings, dense // 5, store) and not decode_cache_fits(settings, dense, store)
    assert data_paths(plan, dense, store) == {"supervised": False}
    assert data_paths(plan, dense // 5, store) == {"supervised": True}
    for method, ratio, kept in (("dense", 0.0, dense), ("lm", 0.8, dense // 5)):
        spec = TrialSpec(method, ratio, None, "supervised", "task_0", 0, "resnet18", None, 0.0, 6, 6, kept, dense,
                         cache_decoded=data_paths(plan, dense, store)["supervised"])
        assert trial_pretrain_config(plan, spec, "src", tmp_path, "run").cache_decoded == "false"
    forced = load_plan(_write(tmp_path, lambda d: d["pretrain"].update(cache_decoded="true")))
    assert data_paths(forced, dense, store) == {"supervised": True}


def test_a_keepset_costs_every_stage_that_produced_it_reused_ones_marked():
    from dp4tl_ray.results import KEEPSET_COST_KEYS, keepset_seconds
    from dp4tl_ray.sweep import TrialSpec, keepset_costs

    before = {"surrogate_s": 300.0, "surrogate_cost": "trained", "extract_source_s": 40.0, "extract_task_s": 2.0,
              "reused_stages": ["surrogate"]}
    selection = {"select_s": 1.5, "kmeans_s": 0.0, "scores_s": 900.0, "reused": True, "scores_reused": True}
    costs = keepset_costs(selection, before)
    assert costs["reused_stages"] == ["surrogate", "scores", "select"] and costs["scores_s"] == 900.0
    spec = TrialSpec("el2n", 0.8, "resnet18", "supervised", "task_0", 0, "resnet18", "/k", 1.5, 9, 48, 9, 48,
                     costs=costs, cache_decoded=True)
    record = spec.record_fields()
    assert set(KEEPSET_COST_KEYS) <= set(record) and record["cache_decoded"] is True
    assert record["keepset"] == "/k"  # the report reads the keep-set's diagnostics from it
    assert keepset_seconds(record) == pytest.approx(300 + 40 + 2 + 900 + 1.5)
    free = keepset_costs({"select_s": 0.1, "kmeans_s": 0.0, "scores_s": 0.0, "reused": False}, None)
    assert free["surrogate_s"] is None and free["reused_stages"] == []  # random-class never reads the surrogate


def test_a_record_reaches_tune_without_a_tensorboard_warning_and_comes_back_whole(tmp_path):
    """Tune's TensorBoard logger tried to plot ``reused_stages`` (a list) as a histogram and warned on the console."""
    from types import SimpleNamespace

    from ray.tune.logger import TBXLoggerCallback
    from ray.util.debug import reset_log_once

    from dp4tl_ray.sweep import _for_tune, collect_results

    record = {"method": "el2n", "lp_acc": 0.5, "reused_stages": ["scores", "extract_source"], "trial_id": "t0"}
    logs = TBXLoggerCallback()

    class Trial:  # hashable, as Tune's trials are
        local_path, evaluated_params = str(tmp_path), {}

        def init_local_path(self):
            pass

    trial = Trial()
    logs.log_trial_start(trial)
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: warned.append(r.getMessage())
    tbx_log = logging.getLogger("ray.tune.logger.tensorboardx")  # Ray's loggers do not reach the root's caplog
    tbx_log.addHandler(handler)
    try:
        reset_log_once("invalid_tbx_value")
        logs.log_trial_result(1, trial, {**record, "training_iteration": 1})  # Tune adds the iteration
        assert any("invalid value" in w for w in warned)  # the list, as before
        warned.clear()
        reset_log_once("invalid_tbx_value")
        logs.log_trial_result(2, trial, {**_for_tune(record), "training_iteration": 2})
        assert warned == []
    finally:
        tbx_log.removeHandler(handler)
    grid = [SimpleNamespace(config={"trial": {"key": "k"}}, metrics=_for_tune(record), error=None)]
    (back,) = collect_results(grid, SimpleNamespace(trials=[]))
    assert back["reused_stages"] == ["scores", "extract_source"] and back["lp_acc"] == 0.5


def test_plan_sections_read_as_their_stage_configs_with_the_dataclass_defaults():
    plan = load_plan(TINY)
    assert plan.settings("pretrain", "moco_v2").arch == "resnet18" and plan.settings("pretrain", "moco_v2").mode == "moco_v2"
    assert plan.settings("surrogate").arch == "resnet50" and plan.settings("pretrain").num_workers == 1
    # per-trial fields named like the method's own arguments still land in the config
    assert plan.stage("surrogate", name="surrogate-x", source="s", out="o").name == "surrogate-x"
    assert plan.stage("evaluate", mode="ff", task_dir="t").mode == "ff"


def test_concurrent_trials_fit_the_cluster():
    from dp4tl_ray.train.trainer import PretrainConfig

    cpu = PretrainConfig(source="-", out="-", num_workers=1, cpus_per_worker=1)
    assert concurrent_trials({"CPU": 2}, cpu, 10) == 1  # one worker CPU + one CPU for its data
    assert concurrent_trials({"CPU": 16, TRIAL_RESOURCE: 3}, cpu, 10) == 3  # capped by driver slots
    assert concurrent_trials({"CPU": 16}, PretrainConfig(source="-", out="-", num_workers=2, cpus_per_worker=3), 10) == 2
    gpu = PretrainConfig(source="-", out="-", num_workers=4, use_gpu=True)
    assert concurrent_trials({"CPU": 64, "GPU": 8, TRIAL_RESOURCE: 8}, gpu, 10) == 2
    # An autoscaling cluster with no GPU node up yet: as many as the head's driver slots, never more than trials.
    assert concurrent_trials({"CPU": 12, TRIAL_RESOURCE: 8}, gpu, 5) == 5
    assert concurrent_trials({"CPU": 1}, cpu, 4) == 1
    # A cached keep-set is augmented by the workers themselves: no data CPU held while a run trains.
    assert concurrent_trials({"CPU": 2}, cpu, 10, cached=True) == 2
    assert concurrent_trials({"CPU": 16}, PretrainConfig(source="-", out="-", num_workers=2, cpus_per_worker=3), 10,
                             cached=True) == 2
    # ... but the decode before a run's fit needs a whole CPU, which fractional workers would not leave.
    half = PretrainConfig(source="-", out="-", num_workers=1, cpus_per_worker=0.5)
    assert concurrent_trials({"CPU": 2}, half, 10, cached=True) == 2


def test_asha_stops_the_worst_pretraining_runs_early(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from dp4tl_ray.sweep import build_scheduler

    assert build_scheduler(load_plan(TINY)) is None  # FIFO unless asked
    plan = load_plan(_write(tmp_path, lambda d: (d["sweep"].update(asha={"enabled": True, "grace_period": 1}),
                                                 d["pretrain"].update(epochs=4))))
    asha = build_scheduler(plan)
    assert (asha._time_attr, asha._metric, asha._mode, asha._max_t) == ("epoch", "loss", "min", 4)

    class Trial:  # what the scheduler reads of a trial
        def __init__(self, i):
            self.trial_id, self.config, self.status = f"t{i}", {}, "RUNNING"

    trials = [Trial(i) for i in range(4)]
    for t in trials:
        asha.on_trial_add(None, t)
    # Epoch-1 losses forwarded from Train: the worse half is stopped at the first rung, the better goes on.
    decisions = [asha.on_trial_result(None, t, {"epoch": 1, "loss": loss, "training_iteration": 1})
                 for t, loss in zip(trials, (0.5, 0.4, 3.0, 2.9))]
    assert decisions[-2:] == [TrialScheduler.STOP, TrialScheduler.STOP] and decisions[1] == TrialScheduler.CONTINUE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    ray_bin = str(Path(sys.executable).parent / "ray")
    done = subprocess.run([ray_bin, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert not check or done.returncode == 0, f"ray {' '.join(args[:2])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture
def local_head(tmp_path):
    """A real head node (`ray start --head --block`) with token auth and the trial-driver resource;
    yields (dashboard address, client env); afterwards the head's whole process session is killed."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
    dash, gcs_port = _free_port(), _free_port()
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={gcs_port}", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--num-cpus=2", f"--resources={json.dumps({TRIAL_RESOURCE: 2})}",
         "--disable-usage-stats",
         # Own agent ports: the suite's embedded Ray already holds the defaults (52365 ...), and an agent
         # that cannot bind never registers - every submit then answers "No available agent".
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = {**env, "RAY_AUTH_TOKEN": _ray("get-auth-token", env=env).stdout.strip()}
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while _ray("job", "list", "--address", address, env=client, check=False).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the head's job server did not come up in 120 s"
            time.sleep(2)
        yield address, client
    finally:  # every process of the head lives in the session that `ray start` leads
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        deadline = time.time() + 30
        while any(_session_of(int(p)) == head.pid for p in os.listdir("/proc") if p.isdigit()) and time.time() < deadline:
            time.sleep(0.5)
        _forget_dead_head(gcs_port)


def _forget_dead_head(gcs_port: int) -> None:
    """`ray start` records its GCS in /tmp/ray/ray_current_cluster and a killed head leaves it behind.
    Ray's State API then resolves that dead address: every later Ray Train run in this process tree
    waits ~12 s at shutdown (its placement-group cleaner's actor-state query times out)."""
    marker = Path("/tmp/ray/ray_current_cluster")
    try:
        if marker.read_text().strip().endswith(f":{gcs_port}"):
            marker.unlink()
    except OSError:
        pass


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _finished_in_tune_state(sweep_dir: Path) -> set[str]:
    """Trial ids that Tune's saved experiment state lists as finished (what a restore will skip)."""
    done = set()
    for path in sweep_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now
        done |= {t["trial_id"] for t in (json.loads(entry[0]) for entry in trials) if t.get("status") == "TERMINATED"}
    return done


@pytest.mark.ray
def test_sweep_job_on_a_local_head_resumes_after_stop(local_head, tmp_path):
    """`ray job submit` runs the sweep on the head; `ray job stop` once a trial has finished; the same
    submission again finishes the sweep without rerunning the finished trial."""
    address, env = local_head
    storage = tmp_path / "sweeps"
    submit = ["job", "submit", "--address", address, "--working-dir", ".",
              "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "out", "__pycache__"]})]
    entry = ["--", "python", "jobs/sweep.py", "--config", str(TINY.relative_to(REPO)), "--storage-path", str(storage)]
    # The head answers `job list` before its node's dashboard agent takes submissions: retry a little.
    deadline, attempt = time.time() + 120, 0
    while (sub := _ray(*submit, "--submission-id", job := f"sweep-1-{attempt}", "--no-wait", *entry, env=env,
                       check=False)).returncode:
        assert time.time() < deadline, f"ray job submit kept failing:\n{sub.stdout[-2000:]}\n{sub.stderr[-3000:]}"
        attempt += 1
        time.sleep(3)
    trials = storage / "tiny" / "work" / "trials"
    deadline = time.time() + 400
    while not _finished_in_tune_state(storage / "tiny"):
        status = _ray("job", "status", "--address", address, job, env=env, check=False).stdout
        assert "FAILED" not in status, _ray("job", "logs", "--address", address, job, env=env, check=False).stdout[-3000:]
        assert time.time() < deadline, "no trial finished in 400 s"
        time.sleep(2)
    first = {json.loads((trials / f"{t}.json").read_text())["key"] for t in _finished_in_tune_state(storage / "tiny")}
    _ray("job", "stop", "--address", address, job, env=env)
    starts_before = (storage / "tiny" / "work" / "trial_starts.log").read_text().splitlines()
    # random-init (no pretraining, the quick one) finished first - both trials may start together on the
    # head's 2 CPUs - so the stop lands while lm runs
    assert first and all(k.startswith("random-init-") for k in first), (first, starts_before)

    second = _ray(*submit, "--submission-id", "sweep-2", *entry, env=env, timeout=500, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    assert "succeeded" in second.stdout.lower()
    assert "resuming" in second.stdout
    # Shared work is not redone: the surrogate run and both FeatureStores are reused.
    assert "run surrogate-resnet18 already finished" in second.stdout
    assert second.stdout.count("is up to date") == 2

    records = [json.loads(line) for line in (storage / "tiny" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["lm", "random-init"]
    assert all(r["status"] == "ok" and 0 <= r["lp_acc"] <= 1 for r in records), records
    lm = next(r for r in records if r["method"] == "lm")
    assert lm["kept_units"] == 3 and lm["total_units"] == 6 and lm["kept_images"] == 24
    # its keep-set's cost, stage by stage (the surrogate trained here), and the sweep's one data path
    assert lm["surrogate_cost"] == "trained" and lm["surrogate_s"] > 0 and lm["extract_source_s"] > 0
    assert lm["extract_task_s"] > 0 and lm["select_s"] >= 0 and lm["pretrain_total_s"] >= lm["pretrain_s"] > 0
    assert lm["cache_decoded"] is json.loads((storage / "tiny" / "work" / "data_path.json").read_text())["cache_decoded"]["supervised"]
    starts = [json.loads(line)["key"] for line in (storage / "tiny" / "work" / "trial_starts.log").read_text().splitlines()]
    assert first and set(starts) == {r["key"] for r in records}
    for key in first:  # finished before the stop: never started again
        assert starts.count(key) == 1, starts
    assert len(starts) > len(starts_before)  # the rest ran in the second job
    assert (storage / "tiny" / "report" / "report.md").is_file()
    assert (storage / "tiny" / "report" / "accuracy_lp.png").stat().st_size > 1000
