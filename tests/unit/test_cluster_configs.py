"""Cluster configs under cluster/: launcher YAMLs, KubeRay manifests, Helm values, Dockerfile.

Nothing here starts Ray or talks to a cloud. The launcher YAMLs go through Ray's own validator
(`prepare_config` + `validate_config`, which is what `ray up` runs before it calls any cloud
API), and the node types go through Ray's own autoscaler scheduling code, both the v1
`ResourceDemandScheduler` (KubeRay's default) and the v2 scheduler (`ray up`'s default since
Ray 2.50), to check *which node type would be launched* for a given resource demand. These are
private Ray APIs (`ray.autoscaler._private`, `ray.autoscaler.v2`); if a Ray upgrade moves them,
these tests are the place to update.
"""
from __future__ import annotations

import copy
import re
from functools import partial
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
    _get_custom_resources,
)
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import (
    ResourceDemandScheduler,
    _default_utilization_scorer,
    get_nodes_for,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.autoscaler.v2.scheduler import ResourceDemandScheduler as SchedulerV2
from ray.autoscaler.v2.scheduler import SchedulingRequest
from ray.autoscaler.v2.schema import AutoscalerInstance
from ray.autoscaler.v2.utils import ResourceRequestUtil
from ray.core.generated.instance_manager_pb2 import Instance, NodeKind

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CLOUDS = ["aws", "gcp", "azure"]
MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
IMAGE = "mlops-ray:latest"
TORCH_PIN = "torch==2.13.0"

# Node types shared by the three launcher YAMLs.
HEAD, GPU_SPOT, CPU_SPOT, GPU_OD = "head_on_demand", "gpu_spot", "cpu_spot", "gpu_on_demand"
# One Train worker of conf/scaling/gpu.yaml (resources_per_worker) and its explicit-spot form.
GPU_WORKER = {"CPU": 2, "GPU": 1}
SPOT_GPU_WORKER = {"GPU": 1, "spot": 1}


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def launcher_path(cloud: str) -> Path:
    return CLUSTER / cloud / "spot-gpu.yaml"


def prepared(cloud: str) -> dict:
    """What `ray up` validates: the YAML merged with Ray's provider defaults."""
    return prepare_config(load_yaml(launcher_path(cloud)))


# --------------------------------------------------------------------------------------------
# Launcher YAMLs: Ray's schema
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cloud", CLOUDS)
def test_launcher_yaml_passes_rays_validator(cloud):
    validate_config(prepared(cloud))


@pytest.mark.parametrize("cloud", CLOUDS)
def test_misspelled_top_level_key_is_rejected(cloud):
    cfg = load_yaml(launcher_path(cloud))
    cfg["max_wokers"] = cfg.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("cloud", CLOUDS)
def test_misspelled_node_type_key_is_rejected(cloud):
    cfg = load_yaml(launcher_path(cloud))
    cfg["available_node_types"][GPU_SPOT]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("cloud", CLOUDS)
def test_fractional_node_resource_is_rejected(cloud):
    cfg = load_yaml(launcher_path(cloud))
    cfg["available_node_types"][GPU_SPOT]["resources"]["spot"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))


# --------------------------------------------------------------------------------------------
# Launcher YAMLs: the scheduling model
# --------------------------------------------------------------------------------------------

def is_spot_market(cloud: str, node_config: dict) -> bool:
    """Whether the cloud would launch this node as spot, read from the provider's own syntax."""
    if cloud == "aws":
        market = node_config.get("InstanceMarketOptions")
        return bool(market) and market["MarketType"] == "spot"
    if cloud == "gcp":
        scheduling = node_config.get("scheduling", {})
        assert isinstance(scheduling, dict), "GCP `scheduling` must be a dict (ray#46248)"
        return scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))
    if cloud == "azure":
        params = node_config["azure_arm_parameters"]
        if params.get("priority") != "Spot":
            return False
        assert params["evictionPolicy"] == "Delete"
        assert params["billingProfile"] == {"maxPrice": -1}
        return True
    raise AssertionError(cloud)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_node_types_resources_and_markets(cloud):
    cfg = prepared(cloud)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == HEAD
    assert set(types) == {HEAD, GPU_SPOT, CPU_SPOT, GPU_OD}

    for name, nt in types.items():
        res = nt["resources"]
        assert all(type(v) is int for v in res.values()), (name, res)   # not float, not bool
        spot = is_spot_market(cloud, nt["node_config"])
        # The Ray resource label must agree with what the cloud is asked for.
        if spot:
            assert res.get("spot") == 1 and "on_demand" not in res, name
        else:
            assert res.get("on_demand") == 1 and "spot" not in res, name

    head = types[HEAD]["resources"]
    assert not is_spot_market(cloud, types[HEAD]["node_config"])
    assert head.get("GPU", 0) == 0 and head["CPU"] == 0
    assert head["TRAIN_DRIVER"] >= 1

    assert is_spot_market(cloud, types[GPU_SPOT]["node_config"])
    assert types[GPU_SPOT]["resources"]["GPU"] >= 1 and types[GPU_SPOT]["min_workers"] == 0
    assert is_spot_market(cloud, types[CPU_SPOT]["node_config"])
    assert "GPU" not in types[CPU_SPOT]["resources"]
    assert 0 <= types[CPU_SPOT]["min_workers"] <= types[CPU_SPOT]["max_workers"]
    assert not is_spot_market(cloud, types[GPU_OD]["node_config"])
    assert types[GPU_OD]["resources"]["GPU"] >= 1
    # v2 autoscaler tie-break: plain GPU demands prefer spot.
    assert types[GPU_SPOT]["priority"] > types[GPU_OD].get("priority", 0)
    assert cfg["max_workers"] == sum(nt["max_workers"] for n, nt in types.items() if n != HEAD)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_setup_and_start_commands(cloud):
    raw = load_yaml(launcher_path(cloud))
    cfg = prepare_config(copy.deepcopy(raw))
    assert raw["file_mounts"]["/home/ray/mlops_ray"] == "."
    setup = raw["setup_commands"]
    torch_i = next(i for i, c in enumerate(setup) if f'"{TORCH_PIN}"' in c)
    proj_i = setup.index("pip install -e /home/ray/mlops_ray")
    assert torch_i < proj_i
    # head_setup_commands is left to Ray's provider defaults (the cloud SDK for the autoscaler):
    # after merging, the head runs the common setup plus at least one provider command.
    assert "head_setup_commands" not in raw
    assert cfg["head_setup_commands"][: len(setup)] == setup
    assert len(cfg["head_setup_commands"]) > len(setup)

    head_cmds = " ; ".join(raw["head_start_ray_commands"])
    worker_cmds = " ; ".join(raw["worker_start_ray_commands"])
    assert "--head" in head_cmds and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds
    assert "--address=$RAY_HEAD_IP:6379" in worker_cmds
    assert "--block" not in head_cmds + worker_cmds   # the launcher needs `ray start` to return
    assert raw["head_start_ray_commands"][0] == raw["worker_start_ray_commands"][0] == "ray stop"
    watcher = f"python -m mlops_ray.cluster.spot_watcher --provider {cloud}"
    assert watcher in worker_cmds and "mlops_ray.cluster.spot_watcher" not in head_cmds
    # Background process after `ray start`, so it can find the local node.
    assert worker_cmds.index("ray start") < worker_cmds.index(watcher)
    assert re.search(r"nohup python -m mlops_ray\.cluster\.spot_watcher[^;]*&", worker_cmds)
    for cmds in (head_cmds, worker_cmds):
        assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=15" in cmds
        assert "RAY_AUTH_MODE=token" in cmds
    assert "-e RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=15" in raw["docker"]["run_options"]


# --------------------------------------------------------------------------------------------
# Launcher YAMLs: what Ray's autoscaler would launch
# --------------------------------------------------------------------------------------------

HEAD_IP = "10.0.0.1"


class HeadOnlyProvider:
    """The two NodeProvider methods the v1 scheduler calls for existing nodes: one head."""

    def node_tags(self, node_id):
        return {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: HEAD}

    def internal_ip(self, node_id):
        return HEAD_IP


def v1_nodes_to_launch(cfg: dict, demands: list[dict]) -> dict:
    """ResourceDemandScheduler.get_nodes_to_launch (autoscaler v1) for a cluster that is just
    the head (idle), with `demands` pending."""
    sched = ResourceDemandScheduler(
        HeadOnlyProvider(), cfg["available_node_types"], cfg["max_workers"],
        cfg["head_node_type"], cfg["upscaling_speed"])
    to_launch, unfulfilled = sched.get_nodes_to_launch(
        nodes=["head-0"], launching_nodes={}, resource_demands=demands,
        unused_resources_by_ip={HEAD_IP: dict(cfg["available_node_types"][HEAD]["resources"])},
        pending_placement_groups=[], max_resources_by_ip={}, ensure_min_cluster_size=[],
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    assert unfulfilled == []
    return dict(to_launch)


def v1_get_nodes_for(node_types: dict, head_type: str, demands: list[dict]):
    """get_nodes_for: the bin-packing core of v1, without the per-round launch limit."""
    scorer = partial(_default_utilization_scorer,
                     node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    to_add, unfulfilled = get_nodes_for(node_types, {head_type: 1}, head_type, 1000, demands,
                                        utilization_scorer=scorer)
    return dict(to_add), unfulfilled


def v2_nodes_to_launch(cloud: str, demands: list[dict], **availability) -> tuple[dict, list]:
    """The v2 scheduler (`ray up`'s default) for a cluster that is just the head."""
    raw = load_yaml(launcher_path(cloud))
    # The launch-config hash reads the SSH key files named in `auth` (Azure): not on this machine,
    # and not needed with disable_launch_config_check.
    for key in ("ssh_private_key", "ssh_public_key"):
        raw["auth"].pop(key, None)
    config = AutoscalingConfig(raw, skip_content_hash=True)
    head = AutoscalerInstance(im_instance=Instance(
        instance_id="head-0", instance_type=HEAD, status=Instance.RAY_INSTALLING,
        node_kind=NodeKind.HEAD))
    reply = SchedulerV2().schedule(SchedulingRequest(
        disable_launch_config_check=True,
        node_type_configs=config.get_node_type_configs(),
        max_num_nodes=config.get_max_num_worker_nodes(),
        resource_requests=ResourceRequestUtil.group_by_count(
            [ResourceRequestUtil.make(d) for d in demands]),
        current_instances=[head],
        **availability))
    launched = {r.instance_type: r.count for r in reply.to_launch}
    return launched, [ResourceRequestUtil.to_resource_map(r)
                      for r in reply.infeasible_resource_requests]


def without_min_workers(launched: dict, cfg: dict) -> dict:
    """Drop the nodes launched only to satisfy min_workers (the warm cpu_spot node)."""
    out = dict(launched)
    for name, nt in cfg["available_node_types"].items():
        if name != HEAD and nt.get("min_workers") and out.get(name) == nt["min_workers"]:
            out.pop(name)
    return out


@pytest.mark.parametrize("cloud", CLOUDS)
def test_v1_spot_gpu_demand_launches_spot_gpu_nodes(cloud):
    cfg = prepared(cloud)
    launched = v1_nodes_to_launch(cfg, [SPOT_GPU_WORKER] * 4)
    assert HEAD not in launched
    assert launched[CPU_SPOT] == cfg["available_node_types"][CPU_SPOT]["min_workers"]
    # spot: 1 per node and the bundle asks for 1, so one bundle per node: 4 nodes.
    assert without_min_workers(launched, cfg) == {GPU_SPOT: 4}


@pytest.mark.parametrize("cloud", CLOUDS)
def test_v1_plain_gpu_demand_prefers_spot_over_on_demand(cloud):
    # Both GPU pools fit {"CPU": 2, "GPU": 1} with the same utilization score; v1 breaks the tie
    # by node-type *name* (sorted descending), so "gpu_spot" > "gpu_on_demand" decides it.
    cfg = prepared(cloud)
    assert without_min_workers(v1_nodes_to_launch(cfg, [GPU_WORKER] * 4), cfg) == {GPU_SPOT: 4}


@pytest.mark.parametrize("cloud", CLOUDS)
def test_v1_on_demand_and_driver_demands(cloud):
    cfg = prepared(cloud)
    od = v1_nodes_to_launch(cfg, [{"GPU": 1, "on_demand": 1}] * 2)
    assert without_min_workers(od, cfg) == {GPU_OD: 2}
    # Tune trial drivers fit on the head: nothing but the min_workers node is launched.
    drivers = v1_nodes_to_launch(cfg, [{"CPU": 0, "TRAIN_DRIVER": 0.01}] * 10)
    assert without_min_workers(drivers, cfg) == {}
    # CPU work never starts a GPU node.
    cpu = v1_nodes_to_launch(cfg, [{"CPU": 8}] * 4)
    assert set(cpu) == {CPU_SPOT}


def test_v1_spot_demand_beyond_max_workers_is_not_spilled_to_on_demand():
    cfg = prepared("aws")
    max_spot = cfg["available_node_types"][GPU_SPOT]["max_workers"]
    to_add, unfulfilled = v1_get_nodes_for(cfg["available_node_types"], HEAD,
                                           [SPOT_GPU_WORKER] * (max_spot + 2))
    assert to_add == {GPU_SPOT: max_spot}
    assert unfulfilled == [SPOT_GPU_WORKER] * 2


@pytest.mark.parametrize("cloud", CLOUDS)
def test_v2_scheduler_prefers_spot_and_falls_back_to_on_demand(cloud):
    cfg = prepared(cloud)
    launched, infeasible = v2_nodes_to_launch(cloud, [GPU_WORKER] * 4)
    assert infeasible == [] and HEAD not in launched
    assert without_min_workers(launched, cfg) == {GPU_SPOT: 4}          # by `priority`

    launched, _ = v2_nodes_to_launch(cloud, [SPOT_GPU_WORKER] * 4)
    assert without_min_workers(launched, cfg) == {GPU_SPOT: 4}

    # After a spot instance timed out in allocation (ALLOCATION_TIMEOUT), v2's
    # CloudResourceMonitor reports the type's recoverable availability as 0.0; that ranks
    # before `priority`, so the same plain GPU demand now goes to the on-demand pool...
    launched, _ = v2_nodes_to_launch(
        cloud, [GPU_WORKER] * 4, recoverable_resource_availabilities={GPU_SPOT: 0.0})
    assert without_min_workers(launched, cfg) == {GPU_OD: 4}
    # ...but a demand that insists on spot never does.
    launched, infeasible = v2_nodes_to_launch(
        cloud, [SPOT_GPU_WORKER] * 2, recoverable_resource_availabilities={GPU_SPOT: 0.0})
    assert GPU_OD not in launched


# --------------------------------------------------------------------------------------------
# KubeRay manifests: structural check
# --------------------------------------------------------------------------------------------

# Keys this project may use, per level (a subset of the ray.io/v1 CRDs). Anything else is
# reported, which is how typos such as `workerGroupSpec` are caught.
CLUSTER_SPEC_KEYS = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                     "headGroupSpec", "workerGroupSpecs", "headServiceAnnotations", "suspend",
                     "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy", "authOptions"}
HEAD_GROUP_KEYS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress",
                   "resources", "labels"}
WORKER_GROUP_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                     "template", "idleTimeoutSeconds", "numOfHosts", "scaleStrategy", "suspend",
                     "resources", "labels"}
RAYJOB_SPEC_KEYS = {"entrypoint", "entrypointResources", "entrypointNumCpus",
                    "entrypointNumGpus", "runtimeEnvYAML", "shutdownAfterJobFinishes",
                    "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                    "rayClusterSpec", "clusterSelector", "submissionMode",
                    "submitterPodTemplate", "submitterConfig", "suspend", "jobId", "metadata",
                    "deletionStrategy", "managedBy"}
RAYSERVICE_SPEC_KEYS = {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
                        "excludeHeadPodFromServeSvc"}
REQUIRED = {"RayCluster": {"headGroupSpec", "workerGroupSpecs", "rayVersion"},
            "RayJob": {"entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"},
            "RayService": {"serveConfigV2", "rayClusterConfig"}}


def _check_keys(obj, allowed: set, required: set, where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected a mapping, got {type(obj).__name__}"]
    errors = [f"{where}: unknown key {k!r}" for k in sorted(set(obj) - allowed)]
    errors += [f"{where}: missing key {k!r}" for k in sorted(required - set(obj))]
    return errors


def _check_group(group, allowed: set, required: set, where: str) -> list[str]:
    errors = _check_keys(group, allowed, required, where)
    if not isinstance(group, dict):
        return errors
    params = group.get("rayStartParams", {})
    if not isinstance(params, dict):
        errors.append(f"{where}.rayStartParams: expected a mapping")
    else:   # map[string]string in the CRD: a bare YAML number or bool is rejected by the API
        errors += [f"{where}.rayStartParams.{k}: value must be a string, got {v!r}"
                   for k, v in params.items() if not isinstance(v, str)]
    containers = (group.get("template") or {}).get("spec", {}).get("containers")
    if not containers:
        errors.append(f"{where}.template.spec.containers: missing or empty")
    else:
        for i, c in enumerate(containers):
            if not c.get("name"):
                errors.append(f"{where}.template.spec.containers[{i}]: missing name")
            if c.get("image") != IMAGE:
                errors.append(f"{where}.template.spec.containers[{i}].image: "
                              f"expected {IMAGE!r}, got {c.get('image')!r}")
    return errors


def check_cluster_spec(spec, where: str) -> list[str]:
    errors = _check_keys(spec, CLUSTER_SPEC_KEYS,
                         {"headGroupSpec", "workerGroupSpecs", "rayVersion"}, where)
    if not isinstance(spec, dict):
        return errors
    if spec.get("rayVersion") != ray.__version__:
        errors.append(f"{where}.rayVersion: {spec.get('rayVersion')!r} != installed Ray "
                      f"{ray.__version__!r}")
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}.enableInTreeAutoscaling: must be true")
    if "headGroupSpec" in spec:
        head = spec["headGroupSpec"]
        errors += _check_group(head, HEAD_GROUP_KEYS, {"rayStartParams", "template"},
                               f"{where}.headGroupSpec")
        if isinstance(head, dict) and (head.get("rayStartParams") or {}).get("num-cpus") != "0":
            errors.append(f"{where}.headGroupSpec.rayStartParams.num-cpus: must be \"0\"")
    groups = spec.get("workerGroupSpecs")
    if "workerGroupSpecs" in spec and (not isinstance(groups, list) or not groups):
        errors.append(f"{where}.workerGroupSpecs: must be a non-empty list")
        groups = []
    names = []
    for i, g in enumerate(groups or []):
        w = f"{where}.workerGroupSpecs[{i}]"
        errors += _check_group(g, WORKER_GROUP_KEYS,
                               {"groupName", "replicas", "minReplicas", "maxReplicas",
                                "rayStartParams", "template"}, w)
        if not isinstance(g, dict):
            continue
        names.append(g.get("groupName"))
        counts = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(type(c) is int for c in counts):
            errors.append(f"{w}: minReplicas/replicas/maxReplicas must be integers")
        elif not counts[0] <= counts[1] <= counts[2]:
            errors.append(f"{w}: need minReplicas <= replicas <= maxReplicas, got {counts}")
    if len(names) != len(set(names)):
        errors.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    return errors


def check_manifest(doc) -> list[str]:
    """Errors in a KubeRay manifest (empty list = OK)."""
    if not isinstance(doc, dict):
        return ["manifest: expected a mapping"]
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: expected 'ray.io/v1', got {doc.get('apiVersion')!r}")
    kind = doc.get("kind")
    if kind not in REQUIRED:
        return errors + [f"kind: expected one of {sorted(REQUIRED)}, got {kind!r}"]
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("metadata.name: missing")
    spec = doc.get("spec")
    if kind == "RayCluster":
        return errors + check_cluster_spec(spec, "spec")
    if kind == "RayJob":
        errors += _check_keys(spec, RAYJOB_SPEC_KEYS, REQUIRED[kind], "spec")
        if not isinstance(spec, dict):
            return errors
        entrypoint = spec.get("entrypoint")
        if not isinstance(entrypoint, str) or not entrypoint.startswith("python -m jobs."):
            errors.append(f"spec.entrypoint: must start with 'python -m jobs.', got {entrypoint!r}")
        if spec.get("shutdownAfterJobFinishes") is not True:
            errors.append("spec.shutdownAfterJobFinishes: must be true")
        if "rayClusterSpec" in spec:
            errors += check_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
        return errors
    # RayService
    errors += _check_keys(spec, RAYSERVICE_SPEC_KEYS, REQUIRED[kind], "spec")
    if not isinstance(spec, dict):
        return errors
    serve_cfg = spec.get("serveConfigV2")
    if not isinstance(serve_cfg, str):
        errors.append("spec.serveConfigV2: must be a YAML string (use `|`), not a mapping")
    else:
        try:
            parsed = yaml.safe_load(serve_cfg)
        except yaml.YAMLError as e:
            parsed = None
            errors.append(f"spec.serveConfigV2: not valid YAML: {e}")
        apps = parsed.get("applications") if isinstance(parsed, dict) else None
        if not isinstance(apps, list) or not apps:
            errors.append("spec.serveConfigV2: needs a non-empty `applications` list")
        else:
            for i, app in enumerate(apps):
                if not isinstance(app, dict) or not app.get("import_path") or not app.get("name"):
                    errors.append(f"spec.serveConfigV2.applications[{i}]: "
                                  "needs `name` and `import_path`")
    if "rayClusterConfig" in spec:
        errors += check_cluster_spec(spec["rayClusterConfig"], "spec.rayClusterConfig")
    return errors


def load_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.fixture(scope="module")
def manifest_docs() -> dict:
    """Every document of each manifest file (the KubeRay resource and its NetworkPolicy)."""
    return {name: load_docs(CLUSTER / "kuberay" / name) for name in MANIFESTS}


@pytest.fixture(scope="module")
def manifests(manifest_docs) -> dict:
    """The one KubeRay custom resource of each manifest file."""
    out = {}
    for name, docs in manifest_docs.items():
        ray_docs = [d for d in docs if str(d.get("apiVersion", "")).startswith("ray.io/")]
        assert len(ray_docs) == 1, f"{name}: expected one ray.io resource, got {len(ray_docs)}"
        out[name] = ray_docs[0]
    return out


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_is_well_formed(manifests, name):
    assert check_manifest(manifests[name]) == []


def test_kuberay_manifest_kinds_and_entrypoints(manifests):
    assert [manifests[n]["kind"] for n in MANIFESTS] == ["RayCluster", "RayJob", "RayService"]
    # ray.address=auto: with the default `ray.address: null`, mlops_ray.runtime.ensure_ray
    # starts a new local Ray in the head pod instead of joining the cluster.
    assert manifests["rayjob.yaml"]["spec"]["entrypoint"] == (
        "python -m jobs.train +experiment=adult_mlp storage=s3 "
        "storage.uri=s3://YOUR-BUCKET/mlops_ray ray.address=auto")
    apps = yaml.safe_load(manifests["rayservice.yaml"]["spec"]["serveConfigV2"])["applications"]
    assert apps[0]["import_path"] == "mlops_ray.serving.app:build_app"


def test_rayservice_embeds_a_serve_config_like_jobs_serve_export(manifests):
    """Serve's schema accepts it, and its ingress settings are the ones the code reads today."""
    from ray.serve.schema import ServeDeploySchema

    from mlops_ray.config.compose import job
    from mlops_ray.config.serve import ServeJob
    from mlops_ray.serving.control import ingress_config
    from mlops_ray.serving.core import IngressCfg
    cfg = yaml.safe_load(manifests["rayservice.yaml"]["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(cfg)
    ingress = cfg["applications"][0]["args"]["ingress"]
    current = ingress_config(job("serve", ServeJob, ["ref=adult_mlp"]))
    IngressCfg.model_validate(ingress)  # what the ingress replica validates it against
    assert set(ingress) == set(current) | {"api_keys_env"}
    for section in ("cache", "limits", "drift", "feedback"):
        assert set(ingress[section]) == set(current[section]), section
    arm = cfg["applications"][0]["deployments"][0]["user_config"]["arms"][0]
    assert {"ref", "artifact_uri", "content_hash", "weight", "role"} <= set(arm)


def _mutated(manifests, name, mutate):
    doc = copy.deepcopy(manifests[name])
    mutate(doc)
    return " | ".join(check_manifest(doc))


def test_structural_check_catches_typos_and_bad_values(manifests):
    def rename(d, old, new):
        d[new] = d.pop(old)

    # The typo from the brief: a missing "s" would make KubeRay run a head-only cluster.
    msg = _mutated(manifests, "raycluster.yaml",
                   lambda d: rename(d["spec"], "workerGroupSpecs", "workerGroupSpec"))
    assert "unknown key 'workerGroupSpec'" in msg and "missing key 'workerGroupSpecs'" in msg
    msg = _mutated(manifests, "rayjob.yaml", lambda d: rename(
        d["spec"]["rayClusterSpec"]["headGroupSpec"], "rayStartParams", "rayStartParam"))
    assert "unknown key 'rayStartParam'" in msg
    msg = _mutated(manifests, "rayservice.yaml",
                   lambda d: rename(d["spec"], "serveConfigV2", "serveConfigv2"))
    assert "unknown key 'serveConfigv2'" in msg

    def bad_replicas(d):
        d["spec"]["workerGroupSpecs"][0].update(minReplicas=3, replicas=1, maxReplicas=8)
    assert "minReplicas <= replicas <= maxReplicas" in _mutated(
        manifests, "raycluster.yaml", bad_replicas)
    assert "must be a string" in _mutated(
        manifests, "raycluster.yaml",
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}))
    assert "apiVersion" in _mutated(
        manifests, "raycluster.yaml", lambda d: d.update(apiVersion="ray.io/v1alpha1"))
    assert "python -m jobs." in _mutated(
        manifests, "rayjob.yaml", lambda d: d["spec"].update(entrypoint="python train.py"))
    assert "applications" in _mutated(
        manifests, "rayservice.yaml",
        lambda d: d["spec"].update(serveConfigV2="application:\n  - name: x\n"))
    assert "YAML string" in _mutated(
        manifests, "rayservice.yaml",
        lambda d: d["spec"].update(serveConfigV2={"applications": []}))


# --------------------------------------------------------------------------------------------
# KubeRay manifests through Ray's own RayCluster -> autoscaler translation
# --------------------------------------------------------------------------------------------

def cluster_specs(manifests) -> dict:
    return {"raycluster": manifests["raycluster.yaml"]["spec"],
            "rayjob": manifests["rayjob.yaml"]["spec"]["rayClusterSpec"],
            "rayservice": manifests["rayservice.yaml"]["spec"]["rayClusterConfig"]}


def autoscaling_config(spec: dict) -> dict:
    """What the KubeRay autoscaler sidecar derives from the CR (also runs validate_config)."""
    cr = {"metadata": {"name": "mlops-ray", "namespace": "default"}, "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(cr)


@pytest.mark.parametrize("which", ["raycluster", "rayjob", "rayservice"])
def test_kuberay_groups_translate_to_valid_node_types(manifests, which):
    cfg = autoscaling_config(cluster_specs(manifests)[which])
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["resources"]
    assert head["CPU"] == 0 and head.get("GPU", 0) == 0 and head["on_demand"] == 1
    if which != "rayservice":
        assert head["TRAIN_DRIVER"] >= 1
    for name, nt in types.items():
        if name == cfg["head_node_type"]:
            continue
        res = nt["resources"]
        assert all(type(v) is int for v in res.values()), (name, res)
        if "spot" in name:
            assert res.get("spot") == 1 and "on_demand" not in res, name
        else:
            assert res.get("on_demand") == 1 and "spot" not in res, name
        assert ("GPU" in res) == name.startswith("gpu"), name   # from the nvidia.com/gpu limit


def test_kuberay_gpu_demand_goes_to_spot_group(manifests):
    cfg = autoscaling_config(manifests["raycluster.yaml"]["spec"])
    head = cfg["head_node_type"]
    # v1 is KubeRay's default autoscaler; "gpu-spot" > "gpu-on-demand" wins its name tie-break.
    assert v1_get_nodes_for(cfg["available_node_types"], head, [GPU_WORKER] * 4) == (
        {"gpu-spot": 4}, [])
    assert v1_get_nodes_for(cfg["available_node_types"], head,
                            [{"GPU": 1, "on_demand": 1}] * 2) == ({"gpu-on-demand": 2}, [])
    assert v1_get_nodes_for(cfg["available_node_types"], head, [{"CPU": 4}] * 2)[0] == {
        "cpu-spot": 1}


def test_kuberay_resources_string_format_is_enforced():
    # KubeRay's quoted-JSON format; without the extra quotes Ray's parser fails.
    assert _get_custom_resources({}, {"resources": '"{\\"spot\\": 1}"'}, "g") == {"spot": 1}
    with pytest.raises(ValueError):  # json.JSONDecodeError
        _get_custom_resources({}, {"resources": '{"spot": 1}'}, "g")


# --------------------------------------------------------------------------------------------
# KubeRay manifests: security (token auth, secrets, who can reach the dashboard)
# --------------------------------------------------------------------------------------------

AUTH_SECRET, AUTH_KEY = "ray-auth-token", "auth_token"   # the key KubeRay's authOptions reads
REGISTRY_SECRET = ("mlops-registry-key", "key")
SERVE_KEYS = {"MLOPS_RAY_SERVE_API_KEYS": "api", "MLOPS_RAY_SERVE_ADMIN_KEYS": "admin",
              "MLOPS_RAY_SERVE_FEEDBACK_KEYS": "feedback"}
SERVE_SECRET = "mlops-serve-keys"
OPERATOR_POD = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance":
                "kuberay-operator", "app.kubernetes.io/component": "kuberay-operator"}
DASHBOARD, CLIENT, GCS, AGENT = 8265, 10001, 6379, 52365
PUBLIC_TYPES = {"LoadBalancer", "NodePort"}


def helm_ray_cluster() -> dict:
    return load_yaml(CLUSTER / "kuberay" / "helm-values.yaml")["rayCluster"]


def cluster_name(manifests, name: str) -> str:
    """The RayCluster name KubeRay gives the pods' ray.io/cluster label. RayJob and RayService
    clusters get a random suffix, so a policy must not count on it."""
    doc = manifests[name]
    return doc["metadata"]["name"] + ("" if doc["kind"] == "RayCluster" else "-x7k2q")


def stack_pods(manifests, name: str) -> dict[str, dict]:
    """group -> the labels KubeRay puts on its pods (template labels + its own)."""
    spec = cluster_specs(manifests)[name.removesuffix(".yaml")]
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g
                                                  for g in spec["workerGroupSpecs"]}}
    pods = {}
    for group, g in groups.items():
        labels = dict(((g.get("template") or {}).get("metadata") or {}).get("labels") or {})
        labels.update({"ray.io/cluster": cluster_name(manifests, name), "ray.io/group": group,
                       "ray.io/node-type": "head" if group == "head" else "worker",
                       "app.kubernetes.io/name": "kuberay",
                       "app.kubernetes.io/created-by": "kuberay-operator"})
        pods[group] = labels
    return pods


def ray_containers(manifests, name: str):
    """(where, container) for the Ray container of the head and of every worker group."""
    spec = cluster_specs(manifests)[name.removesuffix(".yaml")]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g)
                                                   for g in spec["workerGroupSpecs"]]
    for group, g in groups:
        yield f"{name}:{group}", g["template"]["spec"]["containers"][0]


def helm_envs() -> list[tuple[str, list]]:
    """(where, containerEnv) for the head and every enabled worker group of the Helm values."""
    rc = helm_ray_cluster()
    groups = {"worker": rc["worker"], **{n: g for n, g in rc["additionalWorkerGroups"].items()
                                         if not g.get("disabled")}}
    return [("helm:head", rc["head"].get("containerEnv") or [])] + [
        (f"helm:{n}", g.get("containerEnv") or []) for n, g in groups.items()]


def env_map(env: list) -> dict[str, dict]:
    return {e["name"]: e for e in env or []}


def secret_ref(entry: dict | None) -> tuple | None:
    ref = ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not ref or ref.get("optional"):
        return None   # a literal value, or a Secret the pod may start without
    return ref["name"], ref["key"]


def auth_errors(env: list, where: str) -> list[str]:
    e = env_map(env)
    errors = []
    if (e.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        errors.append(f"{where}: RAY_AUTH_MODE must be 'token'")
    if secret_ref(e.get("RAY_AUTH_TOKEN")) != (AUTH_SECRET, AUTH_KEY):
        errors.append(f"{where}: RAY_AUTH_TOKEN must come from secretKeyRef "
                      f"{AUTH_SECRET}/{AUTH_KEY}")
    if "value" in (e.get("RAY_AUTH_TOKEN") or {}):
        errors.append(f"{where}: RAY_AUTH_TOKEN must never be a literal")
    return errors


def _selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels only, which is all these manifests use)."""
    assert not (selector or {}).get("matchExpressions"), "extend _selects for matchExpressions"
    return (selector or {}).get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, src: dict, same_ns: bool) -> bool:
    assert "ipBlock" not in peer, "an ipBlock peer: extend this check"
    if "namespaceSelector" in peer:
        # Namespace labels are not modelled: only {} (every namespace) is understood.
        assert peer["namespaceSelector"] == {}, "a namespaceSelector with labels: extend this"
    elif not same_ns:
        return False                   # a bare podSelector means the policy's namespace only
    return "podSelector" not in peer or _selects(peer["podSelector"], src)


def admitted(policies: list[dict], dst: dict, src: dict, port: int, same_ns=True) -> bool:
    """Whether Kubernetes NetworkPolicy semantics let `src` (pod labels) connect to `dst` on
    `port`: allowed when no policy selects dst for Ingress, else only if a rule admits it."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], dst)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for pol in selecting:
        for rule in pol["spec"].get("ingress") or []:
            peers_ok = "from" not in rule or any(
                _peer_admits(peer, src, same_ns) for peer in rule["from"])
            ports_ok = "ports" not in rule or any(
                pp.get("port") in (port, None) and pp.get("protocol", "TCP") == "TCP"
                for pp in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


def network_policies(docs: list) -> list[dict]:
    pols = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    assert all(p.get("apiVersion") == "networking.k8s.io/v1" for p in pols)
    return pols


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_token_auth_in_every_ray_container(manifests, name):
    errors = []
    for where, c in ray_containers(manifests, name):
        errors += auth_errors(c.get("env"), where)
    assert errors == []
    # The operator sends the token to the dashboard (RayJob status, RayService deploys) and
    # gives it to the containers it adds (autoscaler, RayJob submitter) only with authOptions.
    spec = cluster_specs(manifests)[name.removesuffix(".yaml")]
    assert spec.get("authOptions") == {"mode": "token", "secretName": AUTH_SECRET}, name


def test_helm_values_token_auth_in_every_ray_container():
    rc = helm_ray_cluster()
    errors = [err for where, env in helm_envs() for err in auth_errors(env, where)]
    # The ray-cluster chart has no authOptions: the autoscaler sidecar gets the token by hand.
    errors += auth_errors(rc["head"]["autoscalerOptions"].get("env"), "helm:autoscaler")
    assert errors == []


def test_rayservice_wires_the_serve_api_keys_from_a_secret(manifests):
    errors = []
    for where, c in ray_containers(manifests, "rayservice.yaml"):
        env = env_map(c.get("env"))
        for var, key in SERVE_KEYS.items():
            if secret_ref(env.get(var)) != (SERVE_SECRET, key):
                errors.append(f"{where}: {var} must come from secretKeyRef {SERVE_SECRET}/{key}")
    assert errors == []
    ingress = yaml.safe_load(manifests["rayservice.yaml"]["spec"]["serveConfigV2"])[
        "applications"][0]["args"]["ingress"]
    assert ingress["api_keys"] == []   # keys never in the file, only the variables' names
    assert {ingress[f"{scope}_keys_env"] for scope in ("api", "admin", "feedback")} == set(
        SERVE_KEYS)


def test_registry_signing_key_reaches_the_drivers(manifests):
    from mlops_ray.registry.signing import KEY_ENV
    wanted = [("rayjob.yaml", "head")] + [("raycluster.yaml", g) for g in stack_pods(
        manifests, "raycluster.yaml")]
    containers = {where: c for n in MANIFESTS for where, c in ray_containers(manifests, n)}
    errors = [f"{n}:{g}: {KEY_ENV} must come from secretKeyRef {'/'.join(REGISTRY_SECRET)}"
              for n, g in wanted
              if secret_ref(env_map(containers[f"{n}:{g}"].get("env")).get(KEY_ENV))
              != REGISTRY_SECRET]
    errors += [f"{where}: {KEY_ENV}" for where, env in helm_envs()
               if secret_ref(env_map(env).get(KEY_ENV)) != REGISTRY_SECRET]
    assert errors == []


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_dashboard_is_reachable_only_from_operator_and_own_pods(
        manifests, manifest_docs, name):
    policies = network_policies(manifest_docs[name])
    pods = stack_pods(manifests, name)
    worker = next(v for k, v in pods.items() if k != "head")
    stranger = {"app": "web", "team": "other"}
    for group, dst in pods.items():
        # Every Ray pod is behind a policy: the dashboard agents on the workers take jobs too.
        assert any(_selects(p["spec"]["podSelector"], dst) for p in policies), (name, group)
        for port in (DASHBOARD, CLIENT, GCS, AGENT):
            assert not admitted(policies, dst, stranger, port), (name, group, port)
            assert not admitted(policies, dst, stranger, port, same_ns=False), (name, group, port)
            assert admitted(policies, dst, worker, port), (name, group, port)   # same cluster
        assert not admitted(policies, dst, OPERATOR_POD, GCS, same_ns=False), (name, group)
    head = pods["head"]
    # RayJob / RayService drive the head through the dashboard: the operator must get in.
    assert admitted(policies, head, OPERATOR_POD, DASHBOARD, same_ns=False), name
    assert admitted(policies, head, pods["head"], DASHBOARD), name
    if manifests[name]["kind"] == "RayJob":   # the K8sJobMode submitter pod (`ray job submit`)
        job = manifests[name]["metadata"]["name"]
        submitter = {"batch.kubernetes.io/job-name": job, "job-name": job,
                     "ray.io/originated-from-cr-name": job,
                     "ray.io/originated-from-crd": "RayJob"}
        assert admitted(policies, head, submitter, DASHBOARD), name
        assert not admitted(policies, head, submitter, GCS), name
    if manifests[name]["kind"] == "RayService":   # predictions: open port, API keys required
        assert all(admitted(policies, p, stranger, 8000) for p in pods.values())


def test_helm_ray_cluster_is_covered_by_the_raycluster_policy(manifest_docs):
    rc = helm_ray_cluster()
    policies = network_policies(manifest_docs["raycluster.yaml"])
    # The chart names the RayCluster after fullnameOverride; raycluster.yaml's policy selects it.
    head = {"ray.io/cluster": rc["fullnameOverride"], "ray.io/node-type": "head",
            "app.kubernetes.io/instance": "mlops-ray"}
    assert any(_selects(p["spec"]["podSelector"], head) for p in policies)
    assert not admitted(policies, head, {"app": "web"}, DASHBOARD)
    assert admitted(policies, head, OPERATOR_POD, DASHBOARD, same_ns=False)


def _service_exposes(svc_spec: dict | None, ports=(DASHBOARD, "dashboard")) -> bool:
    svc_spec = svc_spec or {}
    if svc_spec.get("type", "ClusterIP") not in PUBLIC_TYPES:
        return False
    listed = svc_spec.get("ports")
    return not listed or any(p.get("port") in ports or p.get("targetPort") in ports
                             for p in listed)


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_no_public_service_for_the_dashboard(manifests, manifest_docs, name):
    spec = cluster_specs(manifests)[name.removesuffix(".yaml")]
    head = spec["headGroupSpec"]
    # KubeRay's head Service carries 8265 (and 10001, 6379): it must stay ClusterIP.
    assert head.get("serviceType", "ClusterIP") not in PUBLIC_TYPES, name
    assert (head.get("headService") or {}).get("spec", {}).get(
        "type", "ClusterIP") not in PUBLIC_TYPES, name
    assert not head.get("enableIngress"), name   # an Ingress for the dashboard
    serve_svc = (manifests[name]["spec"].get("serveService") or {}).get("spec")
    assert not _service_exposes(serve_svc), name
    for doc in manifest_docs[name]:
        assert doc["kind"] in {manifests[name]["kind"], "NetworkPolicy", "Service"}, doc["kind"]
        if doc["kind"] == "Service":
            assert not _service_exposes(doc["spec"]), (name, doc["metadata"]["name"])
    rc = helm_ray_cluster()
    assert rc.get("service", {}).get("type", "ClusterIP") == "ClusterIP"
    assert (rc["head"].get("headService") or {}).get("spec", {}).get(
        "type", "ClusterIP") not in PUBLIC_TYPES


def test_policy_check_would_catch_an_open_dashboard(manifests, manifest_docs):
    """The evaluator above is not vacuous: no policy, or an open rule, lets a stranger in."""
    pods = stack_pods(manifests, "raycluster.yaml")
    stranger = {"app": "web"}
    assert admitted([], pods["head"], stranger, DASHBOARD)
    opened = copy.deepcopy(network_policies(manifest_docs["raycluster.yaml"]))
    opened[0]["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": DASHBOARD}]})
    assert admitted(opened, pods["head"], stranger, DASHBOARD)
    assert not admitted(opened, pods["head"], stranger, GCS)
    assert auth_errors([{"name": "RAY_AUTH_TOKEN", "value": "abc"}], "x") != []


# --------------------------------------------------------------------------------------------
# Helm values and Dockerfile: consistency
# --------------------------------------------------------------------------------------------

def test_helm_values_shape():
    values = load_yaml(CLUSTER / "kuberay" / "helm-values.yaml")
    # Top level = kuberay-operator chart; ray-cluster chart keys must stay under rayCluster.
    assert not {"head", "worker", "additionalWorkerGroups"} & set(values)
    rc = values["rayCluster"]
    assert f'{rc["image"]["repository"]}:{rc["image"]["tag"]}' == IMAGE
    assert rc["head"]["enableInTreeAutoscaling"] is True
    assert rc["head"]["rayStartParams"]["num-cpus"] == "0"
    groups = {"worker": rc["worker"], **rc["additionalWorkerGroups"]}
    for name, g in {"head": rc["head"], **groups}.items():
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), name
        res = _get_custom_resources({}, params, name)   # Ray's own parser
        assert ("spot" in res) != ("on_demand" in res), (name, res)
    for name, g in groups.items():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name


def test_one_ray_and_torch_version_everywhere(manifests):
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE=rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert f"ARG TORCH_SPEC={TORCH_PIN}" in dockerfile
    assert "pip install --no-cache-dir -e ." in dockerfile
    for cloud in CLOUDS:
        text = launcher_path(cloud).read_text()
        images = re.findall(r"rayproject/ray:([\w.\-]+)", text)
        assert images and all(i.startswith(f"{ray.__version__}-") for i in images), images
    for which, spec in cluster_specs(manifests).items():
        assert spec["rayVersion"] == ray.__version__, which
