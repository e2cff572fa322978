"""cluster.yaml: valid for the installed Ray cluster launcher, and shaped as the cluster guide says.

Validation is the launcher's own: `prepare_config` (merge the AWS defaults, as `ray up` does) then
`validate_config` (the JSON schema shipped in the ray package, plus the launcher's extra checks).
No network, no AWS, no Ray cluster.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _launcher_validate(config: dict) -> dict:
    """What `ray up` does with the file before it talks to AWS; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _head(cfg: dict) -> dict:
    return cfg["available_node_types"][cfg["head_node_type"]]


def _workers(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _gpu_workers(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in _workers(cfg).items() if v["resources"].get("GPU", 0) > 0}


def _pinned_ray() -> str:
    pins = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M)
    assert len(pins) == 1, "constraints.txt pins ray exactly once"
    return pins[0]


def test_schema_is_the_launchers_and_is_strict():
    schema = json.loads(SCHEMA_PATH.read_text())
    # Unknown top-level keys are errors: what makes a misspelling detectable at all.
    assert schema["additionalProperties"] is False
    assert {"provider", "available_node_types", "docker"} <= set(schema["properties"])


def test_cluster_yaml_passes_the_launchers_validation():
    cfg = _load()
    jsonschema.validate(cfg, json.loads(SCHEMA_PATH.read_text()))  # the file as written
    prepared = _launcher_validate(cfg)  # and as `ray up` sees it, AWS defaults merged
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["cache_stopped_nodes"] is False


def _misspell_top_key(c):
    c["idle_timout_minutes"] = c.pop("idle_timeout_minutes")


def _misspell_node_type_key(c):
    w = next(iter(_gpu_workers(c).values()))
    w["min_worker"] = w.pop("min_workers")


def _misspell_docker_key(c):
    c["docker"]["imag"] = c["docker"].pop("image")


def _fractional_gpu_count(c):
    next(iter(_gpu_workers(c).values()))["resources"]["GPU"] = 0.5


def _drop_node_config(c):
    del _head(c)["node_config"]


def _unknown_head_type(c):
    c["head_node_type"] = "hed"


SCHEMA_BREAKAGES = [_misspell_top_key, _misspell_node_type_key, _misspell_docker_key, _fractional_gpu_count,
                    _drop_node_config]


@pytest.mark.parametrize("breakage", SCHEMA_BREAKAGES)
def test_a_broken_copy_fails_the_schema(breakage):
    cfg = _load()
    breakage(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, json.loads(SCHEMA_PATH.read_text()))


@pytest.mark.parametrize("breakage", SCHEMA_BREAKAGES + [_unknown_head_type])
def test_a_broken_copy_fails_the_launchers_checks(breakage):
    cfg = _load()
    breakage(cfg)
    # prepare_config asserts on some breakages (docker without an image) before the schema runs.
    with pytest.raises((jsonschema.ValidationError, ValueError, AssertionError, KeyError)):
        _launcher_validate(cfg)


def test_a_misspelled_key_is_named_in_the_error():
    cfg = _load()
    _misspell_top_key(cfg)
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        _launcher_validate(cfg)


def test_gpu_workers_autoscale_from_zero_on_spot():
    cfg = _load()
    gpu = _gpu_workers(cfg)
    assert gpu, "a GPU worker type"
    for name, node in gpu.items():
        assert node["min_workers"] == 0, name
        assert 1 <= node["max_workers"] <= cfg["max_workers"], name
        assert node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", name
        assert node["resources"]["CPU"] >= node["resources"]["GPU"] >= 1, name
        assert "trial_driver" not in node["resources"], name
    assert cfg["idle_timeout_minutes"] > 0


def test_head_carries_the_trial_driver_resource_and_no_gpu():
    head = _head(_load())
    assert head["resources"]["GPU"] == 0
    assert head["resources"].get("trial_driver", 0) >= 1
    assert head["resources"]["CPU"] >= head["resources"]["trial_driver"]
    assert "InstanceMarketOptions" not in head["node_config"], "the head runs on demand"


def test_image_is_rays_own_with_the_pinned_version_py311_gpu():
    docker = _load()["docker"]
    assert not {"head_image", "worker_image"} & set(docker), "one image for every node"
    m = re.fullmatch(r"rayproject/ray:(?P<ver>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<plat>gpu|cu\d+)", docker["image"])
    assert m, docker["image"]
    assert m["ver"] == ray.__version__ == _pinned_ray()
    assert m["py"] == "311"
    assert m["plat"] == "gpu"


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return lo == -1 or lo <= port <= hi


def test_dashboard_port_is_not_opened():
    cfg = _load()
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not [r for r in rules if _covers(r, 8265)], "8265 must stay closed; use `ray dashboard cluster.yaml`"
    # A pre-made group would carry rules this file cannot see.
    for name, node in cfg["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], name
    assert not [o for o in cfg["docker"].get("run_options", []) if re.search(r"(^|\s)(-p|--publish)\b", o)]


def test_self_check_covers_catches_an_open_dashboard():
    assert _covers({"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000}, 8265)
    assert _covers({"IpProtocol": "-1"}, 8265)
    assert not _covers({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}, 8265)


def test_every_node_installs_the_project_with_the_gpu_extra():
    cfg = _load()
    assert "gpu" in metadata.metadata("dp4tl-ray").get_all("Provides-Extra")
    repo_mounts = [remote for remote, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(repo_mounts) == 1, "the repository is synced to the nodes"
    install = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert install, "setup_commands (run on head and workers) install the project"
    assert any(
        f"cd {repo_mounts[0]}" in c and "-c constraints.txt" in c and "-e '.[gpu]'" in c for c in install
    ), install
    # Per-type worker_setup_commands would replace the global ones on that type.
    for name, node in _workers(cfg).items():
        assert "worker_setup_commands" not in node, name


def test_token_auth_is_on_for_every_ray_process():
    cfg = _load()
    # The container's environment reaches `ray start` on every node and every process it starts.
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"].get("/home/ray/.ray") == "~/.ray", "the token reaches every node"
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert not [c for c in starts if "RAY_AUTH_MODE=disabled" in c]


def test_shared_paths_reach_the_container_and_rsync_keeps_the_package():
    cfg = _load()
    opts = " ".join(cfg["docker"]["run_options"])
    for path in ("/mnt/shared", "/mnt/data"):
        assert f"-v {path}:{path}" in opts, path
    # An unanchored "data" would also skip dp4tl_ray/data when syncing the repository.
    assert all(p.startswith("/") for p in cfg["rsync_exclude"])
