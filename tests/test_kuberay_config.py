"""deploy/kuberay: the RayJob is valid for the pinned KubeRay release and shaped as docs/KUBERAY.md says.

Validation is the CRD's own: the openAPIV3Schema of KubeRay v1.7.0's RayJob CRD
(tests/kuberay/ray.io_rayjobs.yaml.gz; tests/kuberay/SOURCE.md says where it comes from), with
unknown fields made errors as `kubectl apply` (strict field validation) makes them. The CRD's few CEL
rules (immutable managedBy, deletionStrategy shapes, status) concern fields the manifest does not
set; the operator's own checks that the schema cannot express are asserted below. No cluster, no
network.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import hashlib
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray
import yaml

from dp4tl_ray.cli import add_sweep_flags
from dp4tl_ray.sweep import TRIAL_RESOURCE, load_plan

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kuberay"
CRD_PATH = Path(__file__).resolve().parent / "kuberay" / "ray.io_rayjobs.yaml.gz"
CRD_SHA256 = "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"  # KubeRay v1.7.0
MAX_RAYJOB_NAME = 47  # KubeRay's MaxRayJobNameLength (the RayCluster name limit, 53, less a suffix)


@functools.cache
def _crd() -> dict:
    """The CRD, parsed once (1.4 MB of YAML: seconds with the pure-Python loader). Read-only."""
    return yaml.load(gzip.decompress(CRD_PATH.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _strict(schema: dict) -> dict:
    """The schema with unknown fields rejected wherever an object lists its fields, as the API
    server does under strict field validation (`kubectl apply`'s default), not silently pruned."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and \
                    not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@functools.cache
def _schema() -> dict:
    (v1,) = [v for v in _crd()["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def _validate(job: dict) -> None:
    """jsonschema.validate without re-checking the (large, unchanging) schema on every call."""
    jsonschema.validators.validator_for(_schema())(_schema()).validate(job)


def _load() -> dict:
    return yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())


def _storage() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "storage.yaml").read_text()) if d]


def _cluster(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]


def _head(job: dict) -> dict:
    return _cluster(job)["headGroupSpec"]


def _pods(job: dict) -> list[dict]:
    """The pod specs of the head and of every worker group."""
    return [_head(job)["template"]["spec"]] + [g["template"]["spec"] for g in _cluster(job)["workerGroupSpecs"]]


def _ray_container(pod: dict) -> dict:
    return pod["containers"][0]  # KubeRay's RayContainerIndex


def _custom_resources(start_params: dict) -> dict[str, float]:
    """`rayStartParams.resources` as `ray start --resources=...` receives it after the shell's quoting."""
    value = start_params.get("resources")
    if value is None:
        return {}
    (arg,) = shlex.split(value)
    return json.loads(arg)


def _gpu_groups(job: dict) -> list[dict]:
    return [g for g in _cluster(job)["workerGroupSpecs"]
            if int(_ray_container(g["template"]["spec"])["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]


def _pinned_ray() -> str:
    pins = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M)
    assert len(pins) == 1, "constraints.txt pins ray exactly once"
    return pins[0]


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def test_crd_is_the_pinned_kuberay_release_and_strictness_applies():
    assert hashlib.sha256(gzip.decompress(CRD_PATH.read_bytes())).hexdigest() == CRD_SHA256
    crd = _crd()
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == "RayJob"
    schema = _schema()
    assert schema["properties"]["spec"]["additionalProperties"] is False
    worker = schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["workerGroupSpecs"]["items"]
    assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(worker["properties"])


def test_rayjob_yaml_passes_the_crd_schema():
    job = _load()
    crd = _crd()
    assert job["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert job["kind"] == crd["spec"]["names"]["kind"]
    _validate(job)
    # The operator's own checks on the name (ValidateRayJobMetadata).
    name = job["metadata"]["name"]
    assert len(name) <= MAX_RAYJOB_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def _misspell_worker_key(j):
    g = _cluster(j)["workerGroupSpecs"][0]
    g["minReplica"] = g.pop("minReplicas")


def _misspell_spec_key(j):
    j["spec"]["shutdownAfterJobFinish"] = j["spec"].pop("shutdownAfterJobFinishes")


def _misspell_container_key(j):
    c = _ray_container(_head(j)["template"]["spec"])
    c["volumeMount"] = c.pop("volumeMounts")


def _unknown_upscaling_mode(j):
    _cluster(j)["autoscalerOptions"]["upscalingMode"] = "Fast"


def _unknown_auth_mode(j):
    _cluster(j)["authOptions"]["mode"] = "password"


def _numeric_start_param(j):
    _head(j)["rayStartParams"]["num-cpus"] = 0  # rayStartParams are strings


def _bad_quantity(j):
    _ray_container(_head(j)["template"]["spec"])["resources"]["limits"]["memory"] = "52 GB"


def _no_group_name(j):
    del _cluster(j)["workerGroupSpecs"][0]["groupName"]


@pytest.mark.parametrize("breakage", [_misspell_worker_key, _misspell_spec_key, _misspell_container_key,
                                      _unknown_upscaling_mode, _unknown_auth_mode, _numeric_start_param,
                                      _bad_quantity, _no_group_name])
def test_a_broken_copy_fails_the_crd_schema(breakage):
    job = _load()
    breakage(job)
    with pytest.raises(jsonschema.ValidationError):
        _validate(job)


def test_a_misspelled_key_is_named_in_the_error():
    job = _load()
    _misspell_worker_key(job)
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        _validate(job)


def test_head_carries_the_trial_driver_resource_and_runs_no_training():
    job = _load()
    head = _head(job)
    params = head["rayStartParams"]
    # No CPU or GPU for Ray's scheduler: tasks and actors that need either go to the workers.
    assert params["num-cpus"] == "0" and params["num-gpus"] == "0"
    assert not head.get("resources"), "one way of giving resources (the operator refuses both)"
    slots = _custom_resources(params).get(TRIAL_RESOURCE, 0)
    assert slots >= 1
    pod = head["template"]["spec"]
    limits = _ray_container(pod)["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert pod["nodeSelector"]["eks.amazonaws.com/capacityType"] == "ON_DEMAND", "a lost head loses the cluster"
    assert head["template"]["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    for g in _cluster(job)["workerGroupSpecs"]:
        assert TRIAL_RESOURCE not in _custom_resources(g["rayStartParams"]), g["groupName"]


def test_custom_resources_parse_as_ray_start_receives_them():
    assert _custom_resources({"resources": '"{\\"trial_driver\\": 8}"'}) == {"trial_driver": 8}
    assert _custom_resources({}) == {}


def test_gpu_workers_autoscale_from_zero_on_spot():
    job = _load()
    cluster = _cluster(job)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    groups = _gpu_groups(job)
    assert groups, "a GPU worker group"
    names = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for g in groups:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, g["groupName"]
        assert 1 <= g["maxReplicas"] <= 64, g["groupName"]
        pod = g["template"]["spec"]
        res = _ray_container(pod)["resources"]
        assert res["requests"] == res["limits"], "requests = limits: Ray's CPU count is the pod's guaranteed share"
        assert int(res["limits"]["cpu"]) >= int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert pod["nodeSelector"]["eks.amazonaws.com/capacityType"] == "SPOT", g["groupName"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_token_auth_is_on_with_the_token_from_a_secret():
    job = _load()
    cluster = _cluster(job)
    auth = cluster["authOptions"]
    assert auth["mode"] == "token"
    # KubeRay >= 1.6 turns secretName into RAY_AUTH_TOKEN (valueFrom.secretKeyRef, key auth_token) and
    # RAY_AUTH_MODE=token on every Ray container, the autoscaler and the submitter.
    assert auth.get("secretName"), "a Secret you create, not a token generated per cluster"
    assert not auth.get("enableK8sTokenAuth"), "KubeRay does not support Kubernetes token auth for a RayJob"
    assert _version(cluster["rayVersion"]) >= (2, 52, 0), "KubeRay refuses token auth below Ray 2.52"
    # Nothing may override it: no literal token, no auth mode other than token.
    containers = [c for pod in _pods(job) for c in pod["containers"] + pod.get("initContainers", [])]
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token", c["name"]
        if "RAY_AUTH_TOKEN" in env:
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": auth["secretName"], "key": "auth_token"}, c["name"]
    assert "submitterPodTemplate" not in job["spec"], "the default submitter gets the token from KubeRay"


def test_dashboard_is_not_exposed():
    head = _head(_load())
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress") and "ingressOptions" not in head
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    for pod in _pods(_load()):
        assert not pod.get("hostNetwork")
        for c in pod["containers"]:
            assert not [p for p in c.get("ports", []) if "hostPort" in p], c["name"]


def _mounts(pod: dict) -> dict[str, tuple[dict, dict]]:
    """mount path -> (volume, mount) for the Ray container."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (volumes[m["name"]], m) for m in _ray_container(pod).get("volumeMounts", [])}


SHARED, DATA = "/mnt/shared", "/mnt/data"


def test_shared_work_and_data_volumes_are_mounted_alike_on_every_pod():
    job = _load()
    claims = {d["metadata"]["name"]: d for d in _storage() if d["kind"] == "PersistentVolumeClaim"}
    mounts = [_mounts(pod) for pod in _pods(job)]
    for m in mounts:
        shared_vol, shared_mount = m[SHARED]
        data_vol, data_mount = m[DATA]
        assert "ReadWriteMany" in claims[shared_vol["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"]
        assert not shared_mount.get("readOnly")
        assert data_mount.get("readOnly") is True and data_vol["persistentVolumeClaim"].get("readOnly") is True
        assert claims[data_vol["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"] == ["ReadOnlyMany"]
        assert m["/dev/shm"][0]["emptyDir"]["medium"] == "Memory", "Ray's object store in memory, not 64 MB"
    # The same claims at the same paths everywhere: a path written on one pod is read on another.
    as_claims = [{p: v.get("persistentVolumeClaim", {}).get("claimName") for p, (v, _) in m.items()} for m in mounts]
    assert all(c == as_claims[0] for c in as_claims)


def test_storage_claims_bind_to_their_volumes():
    docs = _storage()
    pvs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolume"}
    classes = {d["metadata"]["name"] for d in docs if d["kind"] == "StorageClass"}
    for claim in (d for d in docs if d["kind"] == "PersistentVolumeClaim"):
        spec = claim["spec"]
        if spec.get("volumeName"):  # static: the named volume, with the same access mode, claimed back
            pv = pvs[spec["volumeName"]]
            assert spec["storageClassName"] == "" == pv["spec"]["storageClassName"]
            assert pv["spec"]["accessModes"] == spec["accessModes"]
            assert pv["spec"]["claimRef"]["name"] == claim["metadata"]["name"]
        else:
            assert spec["storageClassName"] in classes
    (data_pv,) = pvs.values()
    assert "read-only" in data_pv["spec"]["mountOptions"]


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _workdir() -> PurePosixPath:
    (wd,) = re.findall(r"^WORKDIR\s+(\S+)$", _dockerfile(), flags=re.M)
    return PurePosixPath(wd)


def test_every_pod_runs_one_image_built_on_rays_pinned_image():
    job = _load()
    images = {c["image"] for pod in _pods(job) for c in pod["containers"]}
    assert len(images) == 1, images
    (base,) = re.findall(r"^FROM\s+(\S+)$", _dockerfile(), flags=re.M)
    assert base == f"rayproject/ray:{_pinned_ray()}-py311-gpu"
    assert _pinned_ray() == ray.__version__ == _cluster(job)["rayVersion"]


def test_image_installs_the_project_with_the_gpu_extra_from_a_context_holding_it():
    assert re.search(r"pip install .*-c constraints\.txt -e '\.\[gpu\]'", _dockerfile())
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split("\n")
    assert ignore[ignore.index("*") + 1:], "everything excluded, then the install's inputs let back in"
    kept = {line[1:] for line in ignore if line.startswith("!")}
    readme = re.search(r'^readme = "(.+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)[1]
    assert {"pyproject.toml", "constraints.txt", readme, "dp4tl_ray", "jobs"} <= kept


def _entrypoint_args(job: dict) -> argparse.Namespace:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    script = PurePosixPath(argv[1])
    assert script == _workdir() / "jobs" / "sweep.py", "the sweep job, from the image's copy of the repository"
    ap = argparse.ArgumentParser()
    add_sweep_flags(ap)
    return ap.parse_args(argv[2:])


def test_entrypoint_runs_the_sweep_with_every_path_on_a_volume():
    job = _load()
    args = _entrypoint_args(job)
    config = PurePosixPath(args.config)
    assert config.is_relative_to(_workdir())
    local = ROOT / config.relative_to(_workdir())
    assert local.is_file(), f"{config} is not in the repository (so not in the image)"
    plan = load_plan(local, {"name": args.name, "storage_path": args.storage_path, "work_dir": args.work_dir})
    sw = plan.sweep
    under = lambda path, root: PurePosixPath(path).is_relative_to(root)  # noqa: E731
    assert sw.work_dir and under(sw.work_dir, SHARED), "work shared by every pod"
    assert sw.storage_path.startswith("s3://") or under(sw.storage_path, SHARED), "results outlive the cluster"
    assert under(plan.data["source"], DATA)
    assert all(under(t, DATA) for t in plan.data["tasks"])
    assert all(under(p, DATA) for p in sw.surrogate_checkpoints.values())
    slots = _custom_resources(_head(job)["rayStartParams"])[TRIAL_RESOURCE]
    assert sw.max_concurrent_trials <= slots


def test_cluster_lives_only_as_long_as_the_job_and_a_failure_is_retried():
    spec = _load()["spec"]
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True, "no cluster billed after the sweep (and suspend needs it)"
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["backoffLimit"] >= 1, "a lost head or driver retries on a new cluster; the sweep resumes"
    assert "clusterSelector" not in spec, "the RayJob makes its own cluster"
