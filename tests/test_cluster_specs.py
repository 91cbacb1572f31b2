"""cluster/: the launcher YAMLs pass Ray's own schema validation, the KubeRay manifests have the
structure KubeRay needs, and both keep the project's safety rules (token auth, dashboard binding,
autoscaling bounds).  Each check is also shown to fail on a broken copy."""

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
REPO = CLUSTER.parent
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"]


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _load_all(name):
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


# ------------------------------------------------------------------ cluster launcher


def validate_with_ray(config: dict) -> dict:
    """What `ray up` does before it touches a cloud: fill in the provider's defaults, then check the
    result against ray/autoscaler/ray-schema.json and Ray's own consistency rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def launcher_problems(config: dict) -> list[str]:
    """relay_ray's rules for a launcher config, beyond Ray's schema."""
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    workers = {name: t for name, t in types.items() if name != head}
    if not any(t.get("max_workers", 0) > t.get("min_workers", 0) for t in workers.values()):
        problems.append("no worker node type can autoscale (max_workers > min_workers)")
    if not any(t.get("resources", {}).get("GPU", 0) > 0 for t in workers.values()):
        problems.append("no GPU worker node type")
    if not any(t.get("resources", {}).get("CPU", 0) > 0 and not t.get("resources", {}).get("GPU")
               for t in workers.values()):
        problems.append("no CPU worker node type")
    setup = " ".join(config.get("setup_commands", []))
    if not re.search(r"pip install .*relay_ray", setup):
        problems.append("setup_commands do not install relay_ray")
    if f"ray[default,tune]=={ray.__version__}" not in setup:
        problems.append(f"setup_commands do not pin ray[default,tune]=={ray.__version__} (the client's version)")
    head_start = " ".join(config.get("head_start_ray_commands", []))
    worker_start = " ".join(config.get("worker_start_ray_commands", []))
    if "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("the head's dashboard is not bound to 127.0.0.1")
    for role, commands in (("head", head_start), ("worker", worker_start)):
        if "RAY_AUTH_MODE=token ray start" not in commands:
            problems.append(f"{role} nodes start Ray without RAY_AUTH_MODE=token")
    if not any(remote.endswith("/.ray/auth_token") for remote in config.get("file_mounts", {})):
        problems.append("the auth token is not copied to the nodes (file_mounts)")
    return problems


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_passes_rays_schema(name):
    prepared = validate_with_ray(_load(name))
    # the filled-in config is what the autoscaler runs with: bounds as written
    assert prepared["max_workers"] == 20
    assert prepared["available_node_types"]["cpu_worker"]["max_workers"] == 16


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_follows_project_rules(name):
    assert launcher_problems(_load(name)) == []


def test_fake_autoscale_yaml_passes_rays_schema():
    # complete as written (the fake provider ships no defaults file to fill in from)
    validate_config(_load("fake-autoscale.yaml"))


LAUNCHER_BREAKAGES = {
    "misspelled top-level key": (lambda c: c.update(max_worker=3), "max_worker"),
    "max_workers not an integer": (lambda c: c["available_node_types"]["cpu_worker"].update(max_workers="many"),
                                   "not of type 'integer'"),
    "misspelled node-type key": (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1), "min_worker"),
    "head type not defined": (lambda c: c.update(head_node_type="nohead"), "head_node_type"),
    "min_workers above the global max": (lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=30),
                                         "max_workers"),
}


@pytest.mark.parametrize("breakage", LAUNCHER_BREAKAGES)
def test_rays_schema_validation_catches_a_broken_launcher_yaml(breakage):
    mutate, message = LAUNCHER_BREAKAGES[breakage]
    config = _load("aws.yaml")
    mutate(config)
    with pytest.raises(Exception, match=re.escape(message)):
        validate_with_ray(config)


PROJECT_BREAKAGES = {
    "fixed size": (lambda c: [t.update(min_workers=t.get("max_workers", 0)) for t in c["available_node_types"].values()],
                   "can autoscale"),
    "no GPU type": (lambda c: c["available_node_types"].pop("gpu_worker"), "no GPU worker"),
    "no relay_ray install": (lambda c: c.update(setup_commands=c["setup_commands"][:1]), "install relay_ray"),
    "dashboard on all interfaces": (
        lambda c: c.update(head_start_ray_commands=[s.replace("127.0.0.1", "0.0.0.0") for s in
                                                    c["head_start_ray_commands"]]), "127.0.0.1"),
    "no token auth on workers": (
        lambda c: c.update(worker_start_ray_commands=[s.replace("RAY_AUTH_MODE=token ", "") for s in
                                                      c["worker_start_ray_commands"]]), "worker nodes start Ray"),
    "token not shipped": (lambda c: c.update(file_mounts={"/home/ubuntu/relay_ray": "."}), "auth token"),
}


@pytest.mark.parametrize("breakage", PROJECT_BREAKAGES)
def test_project_rules_catch_a_broken_launcher_yaml(breakage):
    mutate, message = PROJECT_BREAKAGES[breakage]
    config = _load("aws.yaml")
    mutate(config)
    assert any(message in p for p in launcher_problems(config)), launcher_problems(config)


# ------------------------------------------------------------------ KubeRay

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _pod_problems(where: str, template) -> list[str]:
    problems = []
    containers = (((template or {}).get("spec") or {}).get("containers")) or []
    if not containers:
        return [f"{where}: template.spec.containers is empty"]
    for container in containers:
        for field in ("name", "image"):
            if not container.get(field):
                problems.append(f"{where}: a container has no {field}")
    return problems


def _ray_cluster_spec_problems(where: str, spec) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: missing"]
    problems = []
    if str(spec.get("rayVersion")) != ray.__version__:
        problems.append(f"{where}.rayVersion {spec.get('rayVersion')!r} != the client's Ray {ray.__version__}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode is not token")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling is not true")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{where}.headGroupSpec: missing")
    else:
        if not isinstance(head.get("rayStartParams"), dict):
            problems.append(f"{where}.headGroupSpec.rayStartParams: missing (may be {{}})")
        elif any(not isinstance(v, str) for v in head["rayStartParams"].values()):
            problems.append(f"{where}.headGroupSpec.rayStartParams: values must be strings")
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"{where}.headGroupSpec.serviceType exposes the head beyond the cluster")
        problems += _pod_problems(f"{where}.headGroupSpec", head.get("template"))
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        problems.append(f"{where}.workerGroupSpecs: missing or empty")
        groups = []
    for group in groups:
        name = group.get("groupName")
        at = f"{where}.workerGroupSpecs[{name}]"
        if not name:
            problems.append(f"{where}.workerGroupSpecs: a group has no groupName")
        low, replicas, high = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if not all(isinstance(v, int) for v in (low, replicas, high)) or not low <= replicas <= high:
            problems.append(f"{at}: needs integers minReplicas <= replicas <= maxReplicas, got {low}/{replicas}/{high}")
        elif high <= low:
            problems.append(f"{at}: cannot autoscale (maxReplicas <= minReplicas)")
        if not isinstance(group.get("rayStartParams"), dict):
            problems.append(f"{at}.rayStartParams: missing (may be {{}})")
        problems += _pod_problems(at, group.get("template"))
    if not any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
               for g in groups for c in (((g.get("template") or {}).get("spec") or {}).get("containers") or [])):
        problems.append(f"{where}: no worker group with GPUs (nvidia.com/gpu limit)")
    return problems


def kuberay_problems(doc: dict) -> list[str]:
    """Structure KubeRay (ray.io/v1) needs, plus relay_ray's rules (token auth, autoscaling)."""
    kind = doc.get("kind")
    if kind not in ("RayJob", "RayCluster"):
        return []                                            # e.g. the shared PersistentVolumeClaim
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{kind}: apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    name = (doc.get("metadata") or {}).get("name", "")
    if not DNS1123.match(name or ""):
        problems.append(f"{kind}: metadata.name {name!r} is not a DNS-1123 name")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + [f"{kind}: spec missing"]
    if kind == "RayCluster":
        return problems + _ray_cluster_spec_problems("spec", spec)
    entrypoint = spec.get("entrypoint") or ""
    if not entrypoint.startswith("relay-ray tune "):
        problems.append(f"RayJob: entrypoint {entrypoint!r} does not run a relay-ray sweep")
    else:
        sweep = entrypoint.split()[2]
        if not (REPO / sweep).is_file():
            problems.append(f"RayJob: entrypoint sweep file {sweep} does not exist in the repo")
        if "--storage /mnt/shared" not in entrypoint:
            problems.append("RayJob: entrypoint does not put Tune's storage on the shared volume")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("RayJob: shutdownAfterJobFinishes is not true (the cluster would outlive the sweep)")
    return problems + _ray_cluster_spec_problems("spec.rayClusterSpec", spec.get("rayClusterSpec"))


@pytest.mark.parametrize("name,kind", [("kuberay-rayjob.yaml", "RayJob"), ("kuberay-raycluster.yaml", "RayCluster")])
def test_kuberay_manifests_have_the_required_structure(name, kind):
    docs = _load_all(name)
    assert [d["kind"] for d in docs if d.get("apiVersion") == "ray.io/v1"] == [kind]
    for doc in docs:
        assert kuberay_problems(doc) == [], doc["kind"]


def test_rayjob_volumes_claim_the_shared_pvc_of_the_same_file():
    docs = _load_all("kuberay-rayjob.yaml")
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    job = next(d for d in docs if d["kind"] == "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]}
        assert claims and claims <= pvcs
        mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c["volumeMounts"]}
        assert "/mnt/shared" in mounts


def _rayjob():
    return next(d for d in _load_all("kuberay-rayjob.yaml") if d["kind"] == "RayJob")


def _raycluster():
    return _load_all("kuberay-raycluster.yaml")[0]


KUBERAY_BREAKAGES = {
    "old apiVersion": (_raycluster, lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    "bad name": (_raycluster, lambda d: d["metadata"].update(name="Relay_Ray"), "DNS-1123"),
    "no headGroupSpec": (_raycluster, lambda d: d["spec"].pop("headGroupSpec"), "headGroupSpec: missing"),
    "no worker groups": (_raycluster, lambda d: d["spec"].update(workerGroupSpecs=[]), "workerGroupSpecs"),
    "no containers": (_raycluster, lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].update(containers=[]),
                      "containers is empty"),
    "container without image": (_raycluster, lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]
                                ["containers"][0].pop("image"), "no image"),
    "non-string rayStartParams": (_raycluster, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"]
                                  .update({"num-cpus": 0}), "must be strings"),
    "replicas above max": (_raycluster, lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas=99), "replicas"),
    "fixed-size group": (_raycluster, lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=0),
                         "cannot autoscale"),
    "autoscaling off": (_raycluster, lambda d: d["spec"].update(enableInTreeAutoscaling=False),
                        "enableInTreeAutoscaling"),
    "token auth off": (_raycluster, lambda d: d["spec"].pop("authOptions"), "authOptions.mode"),
    "wrong rayVersion": (_raycluster, lambda d: d["spec"].update(rayVersion="2.9.0"), "rayVersion"),
    "head on a LoadBalancer": (_raycluster, lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
                               "serviceType"),
    "no GPU group": (_raycluster, lambda d: d["spec"].update(workerGroupSpecs=d["spec"]["workerGroupSpecs"][:1]),
                     "no worker group with GPUs"),
    "no rayClusterSpec": (_rayjob, lambda d: d["spec"].pop("rayClusterSpec"), "rayClusterSpec: missing"),
    "entrypoint not a sweep": (_rayjob, lambda d: d["spec"].update(entrypoint="python train.py"), "entrypoint"),
    "missing sweep file": (_rayjob, lambda d: d["spec"].update(entrypoint="relay-ray tune tune_configs/nope.yaml "
                                                                          "--storage /mnt/shared/x"), "does not exist"),
    "cluster outlives the job": (_rayjob, lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
                                 "shutdownAfterJobFinishes"),
    "job head without containers": (_rayjob, lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
                                    .update(spec={}), "containers is empty"),
}


@pytest.mark.parametrize("breakage", KUBERAY_BREAKAGES)
def test_structural_check_catches_a_broken_manifest(breakage):
    load, mutate, message = KUBERAY_BREAKAGES[breakage]
    doc = copy.deepcopy(load())
    mutate(doc)
    problems = kuberay_problems(doc)
    assert any(message in p for p in problems), problems


# ------------------------------------------------------------------ cluster/autoscale.py


def _autoscale_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cluster_autoscale", CLUSTER / "autoscale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line_exit(excinfo) -> str:
    message = str(excinfo.value.code)
    assert message.startswith("cluster/autoscale.py: error: ") and "\n" not in message, message
    return message


def test_autoscale_wrapper_sizes_the_request_with_the_engines_shape():
    shape = _autoscale_module()._run_shape
    one_cpu_actors = shape(["relay-ray", "run", "--dataset", "digits", "--workers", "16", "--workers-per-actor", "1",
                            "--cpus-per-actor", "1"])
    assert (one_cpu_actors.num_actors, one_cpu_actors.bundle) == (16, {"CPU": 1.0})
    groups = shape(["relay-ray", "run", "--workers", "16", "--workers-per-actor", "4", "--cpus-per-actor", "4"])
    assert (groups.num_actors, groups.workers_per_actor, groups.bundle) == (4, 4, {"CPU": 4.0})
    uneven = shape(["relay-ray", "run", "--workers", "10", "--workers-per-actor", "4", "--cpus-per-actor", "2"])
    assert uneven.num_actors == 3                          # 4 + 4 + 2 workers
    gpu_shares = shape(["relay-ray", "compare", "--workers", "8", "--workers-per-actor", "2", "--cpus-per-actor",
                        "0.5", "--gpus-per-actor", "0.25"])
    assert (gpu_shares.num_actors, gpu_shares.bundle) == (4, {"CPU": 0.5, "GPU": 0.25})
    # --device cuda: one GPU per actor unless --gpus-per-actor says otherwise (the engine's default)
    cuda = shape(["relay-ray", "run", "--workers", "16", "--workers-per-actor", "4", "--cpus-per-actor", "4",
                  "--device", "cuda"])
    assert cuda.bundle == {"CPU": 4.0, "GPU": 1.0}
    # the worker count is resolved as relay-ray resolves it: social has 32 workers
    social = shape(["relay-ray", "run", "--topology", "social", "--workers-per-actor", "4", "--cpus-per-actor", "2"])
    assert (social.num_workers, social.num_actors) == (32, 8)


def test_autoscale_wrapper_takes_workers_and_device_from_a_config_or_a_resumed_run(tmp_path):
    shape = _autoscale_module()._run_shape
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"dataset": "digits", "num_workers": 12, "device": "cuda"}))
    resumed = shape(["relay-ray", "run", "--resume", str(tmp_path), "--workers-per-actor", "3", "--cpus-per-actor", "2"])
    assert (resumed.num_workers, resumed.num_actors, resumed.bundle) == (12, 4, {"CPU": 2.0, "GPU": 1.0})
    overridden = shape(["relay-ray", "run", "--config", str(tmp_path / "config.yaml"), "--workers", "6",
                        "--workers-per-actor", "3", "--cpus-per-actor", "2"])
    assert (overridden.num_workers, overridden.num_actors) == (6, 2)


@pytest.mark.parametrize("flags", [
    [],                                                    # auto, cluster's CPUs shared
    ["--workers-per-actor", "4"],                          # CPUs still the cluster's share
    ["--cpus-per-actor", "1"],                             # actor count still auto
    ["--workers-per-actor", "auto", "--cpus-per-actor", "1"],
])
def test_autoscale_wrapper_needs_an_explicit_shape(flags):
    with pytest.raises(SystemExit) as excinfo:
        _autoscale_module()._run_shape(["relay-ray", "run", "--workers", "16", *flags])
    message = _one_line_exit(excinfo)
    assert "--workers-per-actor K and --cpus-per-actor C" in message


@pytest.mark.parametrize("command,message", [
    (["python", "train.py", "--workers", "16"], "expected a `relay-ray run"),
    (["relay-ray", "tune", "tune_configs/quickstart.yaml"], "expected a `relay-ray run"),
    (["relay-ray", "run", "--workers", "16", "--cpus-per-worker", "1"], "unrecognized arguments: --cpus-per-worker"),
    (["relay-ray", "run", "--workers", "x", "--workers-per-actor", "2", "--cpus-per-actor", "1"],
     "invalid int value: 'x'"),
    (["relay-ray", "run", "--workers", "16", "--workers-per-actor", "0", "--cpus-per-actor", "1"],
     "--workers-per-actor must be >= 1"),
    (["relay-ray", "run", "--workers", "1", "--workers-per-actor", "1", "--cpus-per-actor", "1"],
     "--workers must be at least 2"),
    (["relay-ray", "run", "--workers", "4", "--workers-per-actor", "1", "--cpus-per-actor", "1", "--backend", "local"],
     "needs no cluster"),
    (["relay-ray", "run", "--resume", "/nonexistent/run", "--workers-per-actor", "1", "--cpus-per-actor", "1"],
     "has no config.yaml"),
])
def test_autoscale_wrapper_rejects_a_bad_command_in_one_line(command, message):
    with pytest.raises(SystemExit) as excinfo:
        _autoscale_module()._run_shape(command)
    assert message in _one_line_exit(excinfo)


def test_autoscale_wrapper_waits_with_the_engines_bundle_rule():
    from relay_ray.engine import placement

    module = _autoscale_module()
    assert not hasattr(module, "_bundles_that_fit")        # no private copy of the rule
    shape = module._run_shape
    fits = module._fits
    four_cpu_nodes = [{"CPU": 4.0}] * 4
    sixteen = shape(["relay-ray", "run", "--workers", "16", "--workers-per-actor", "1", "--cpus-per-actor", "1"])
    assert fits(sixteen, four_cpu_nodes) and not fits(sixteen, four_cpu_nodes[:3])
    assert not fits(sixteen, [{"CPU": 0.0}])               # a head with no CPUs holds no actor
    wide = shape(["relay-ray", "run", "--workers", "16", "--workers-per-actor", "1", "--cpus-per-actor", "1.5"])
    assert not fits(wide, [{"CPU": 4.0}] * 6)              # 24 CPUs = 16 x 1.5, but 2 per node: 12 actors
    assert fits(wide, four_cpu_nodes + [{"CPU": 4.0}] * 4)
    groups = shape(["relay-ray", "run", "--workers", "16", "--workers-per-actor", "4", "--cpus-per-actor", "4"])
    assert not fits(groups, [{"CPU": 3.0}] * 8)            # 24 CPUs, but no node holds a 4-CPU actor
    gpu = shape(["relay-ray", "run", "--workers", "16", "--workers-per-actor", "4", "--cpus-per-actor", "4",
                 "--device", "cuda"])
    assert not fits(gpu, [{"CPU": 16.0}] * 4)              # CPUs enough, no GPU
    assert fits(gpu, [{"CPU": 4.0, "GPU": 1.0}] * 4)
    for shp, nodes in ((sixteen, four_cpu_nodes[:3]), (wide, four_cpu_nodes), (gpu, [{"CPU": 4.0, "GPU": 1.0}] * 4)):
        assert fits(shp, nodes) == (placement.bundles_that_fit(shp.bundle, nodes) >= shp.num_actors)
