"""The Kubernetes manifests and the Dockerfile: schema-valid, renderable, and consistent with the product.

Every manifest is validated offline against the Kubernetes OpenAPI schema in strict mode
(kubernetes-validate); the kustomizations are rendered (by ``tests/deploy/kustomization.py``,
checked against ``kubectl kustomize`` where kubectl exists) and their output validated too.
The rest reads as the deployment checklist: probes on the health service, graceful
shutdown longer than the server's grace, a locked-down pod, the HPA metric the adapter
serves, a training Job whose TF_CONFIG names every worker.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.kustomization import KustomizeError, object_key, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
KUSTOMIZATIONS = ["base", "training", "overlays/cpu", "overlays/cpu-training"]
# The oldest Kubernetes we support (native gRPC probes, Indexed Jobs and their labels are GA)
# and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
HEALTH_SERVICE = "textgen.v1.TextGeneration"
LIVENESS_SERVICE = "textgen.liveness"  # service.server.LIVENESS_SERVICE


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def validate(obj: dict[str, Any]) -> None:
    """Strict schema validation (unknown fields are errors); CRDs get their own checks."""
    if obj["kind"] in CRD_KINDS:
        check_crd(obj)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def check_crd(obj: dict[str, Any]) -> None:
    # ObjectMeta is core: validate it strictly inside an object whose schema we have.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(carrier, version, strict=True)
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["apiVersion"]
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, sorted(obj)
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, sorted(spec)
        assert set(spec["selector"]) == {"matchLabels"}
        assert spec["endpoints"], "a ServiceMonitor needs at least one endpoint"
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}, sorted(endpoint)
            assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
            for key in ("interval", "scrapeTimeout"):
                assert re.fullmatch(r"\d+[smh]", endpoint.get(key, "1s")), endpoint
    else:
        assert set(spec) == {"groups"}, sorted(spec)
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules"}, sorted(group)
            for rule in group["rules"]:
                assert ("record" in rule) != ("alert" in rule), rule
                assert set(rule) <= {"record", "alert", "expr", "for", "labels", "annotations"}, sorted(rule)


def rendered(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The rendered kustomization ``name``, keyed by (kind, name)."""
    return {(o["kind"], o["metadata"]["name"]): o for o in render(K8S / name)}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- schema validation and rendering ----------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates_in_strict_mode(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_renders_to_valid_objects(name: str) -> None:
    objects = render(K8S / name)
    assert objects
    for obj in objects:
        validate(obj)
    # Every file in the folder is part of the build (nothing forgotten in kustomization.yaml).
    listed = yaml.safe_load((K8S / name / "kustomization.yaml").read_text(encoding="utf-8"))["resources"]
    local = {p.name for p in (K8S / name).glob("*.yaml") if p.name != "kustomization.yaml"}
    assert local <= set(listed), f"{name}: not in resources: {sorted(local - set(listed))}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the manifests are rendered by tests/deploy/kustomization.py only")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    theirs = {object_key(o): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {object_key(o): o for o in render(K8S / name)}
    assert sorted(ours) == sorted(theirs)
    for key, obj in ours.items():
        assert obj == theirs[key], f"{name}: {key} renders differently from kubectl kustomize"


def test_strict_validation_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(rendered("base")[("Deployment", "textgen")])
    only_container(deployment)["readinesProbe"] = only_container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: staging-\n", encoding="utf-8")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [str(K8S / "base")],
                "patches": [
                    {"target": {"kind": "Deployment", "name": "textgen"}, "patch": "- {op: remove, path: /spec/nope}"}
                ],
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(KustomizeError, match="/spec/nope"):
        render(tmp_path)


# ---- the serving Deployment -------------------------------------------------------------


def server_config_map(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    deployment = objects[("Deployment", "textgen")]
    (source,) = only_container(deployment)["envFrom"]
    data: dict[str, str] = objects[("ConfigMap", source["configMapRef"]["name"])]["data"]
    return data


def test_deployment_requests_a_gpu_and_the_cpu_overlay_does_not() -> None:
    gpu = only_container(rendered("base")[("Deployment", "textgen")])["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory"} <= set(gpu["requests"])
    cpu_objects = rendered("overlays/cpu")
    cpu_deployment = cpu_objects[("Deployment", "textgen")]
    cpu = only_container(cpu_deployment)["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"] and "nvidia.com/gpu" not in cpu["requests"]
    assert {"cpu", "memory"} <= set(cpu["requests"])
    assert "tolerations" not in pod_spec(cpu_deployment)
    assert int(server_config_map(cpu_objects)["TEXTGEN_MAX_CONCURRENT"]) < int(
        server_config_map(rendered("base"))["TEXTGEN_MAX_CONCURRENT"]
    )


@pytest.mark.parametrize("name", ["base", "overlays/cpu"])
def test_probes_use_the_grpc_health_service_on_the_serving_port(name: str) -> None:
    objects = rendered(name)
    container = only_container(objects[("Deployment", "textgen")])
    config = server_config_map(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(config["TEXTGEN_PORT"]), "metrics": int(config["TEXTGEN_METRICS_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    # Ready only once the model service is SERVING; started and alive while the process answers at
    # all, so a pod whose volume has no model yet is not restarted (it stays Running, not Ready).
    assert container["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "importing TensorFlow takes seconds"


@pytest.mark.parametrize("name", ["base", "overlays/cpu"])
def test_termination_grace_outlasts_prestop_and_the_servers_drain(name: str) -> None:
    objects = rendered(name)
    deployment = objects[("Deployment", "textgen")]
    pre_stop = only_container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(server_config_map(objects)["TEXTGEN_GRACE_SECONDS"])
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > int(pre_stop[1]) + grace


@pytest.mark.parametrize("kind,name", [("Deployment", "textgen"), ("Job", "textgen-train")])
def test_pods_run_locked_down_with_a_writable_tmp(kind: str, name: str) -> None:
    objects = {**rendered("base"), **rendered("training")}
    workload = objects[(kind, name)]
    pod = pod_spec(workload)
    container = only_container(workload)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid() != 0
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    assert container["image"] == "registry.example.com/textgen:0.1.0"


def test_models_volume_is_read_only_for_serving_and_read_write_for_training() -> None:
    base = rendered("base")
    claim = base[("PersistentVolumeClaim", "textgen-models")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    def models_mount(workload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        for mount in only_container(workload)["volumeMounts"]:
            volume = volumes[mount["name"]]
            if volume.get("persistentVolumeClaim", {}).get("claimName") == "textgen-models":
                return mount, volume
        raise AssertionError("no mount of the textgen-models claim")

    deployment = base[("Deployment", "textgen")]
    mount, volume = models_mount(deployment)
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert mount["mountPath"] == server_config_map(base)["TEXTGEN_MODELS"]

    job = rendered("training")[("Job", "textgen-train")]
    mount, volume = models_mount(job)
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    out = next(a.split("=", 1)[1] for a in only_container(job)["args"] if a.startswith("--out="))
    assert Path(out).parent == Path(mount["mountPath"]), "training must export onto the model volume"
    assert Path(out).name == server_config_map(base)["TEXTGEN_DEFAULT_MODEL"], "serving defaults to what is trained"


def test_config_map_holds_only_settings_the_server_understands() -> None:
    config_module = pytest.importorskip("service.config", reason="service/config.py (the server's flags) not built yet")
    data = server_config_map(rendered("base"))
    assert all(key.startswith(config_module.ENV_PREFIX) for key in data)
    known = {config_module.ENV_PREFIX + f.name.upper() for f in fields(config_module.ServerConfig)}
    assert set(data) <= known, f"unknown settings: {sorted(set(data) - known)}"
    for name in ("base", "overlays/cpu"):
        config = config_module.parse_config([], server_config_map(rendered(name)))
        assert config.models == "/models" and config.port == 8500 and config.max_connection_age > 0


# ---- Services, autoscaling, disruption budget, monitoring -------------------------------


def test_service_exposes_named_grpc_and_metrics_ports_of_the_server_pods() -> None:
    objects = rendered("base")
    pod_labels = objects[("Deployment", "textgen")]["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in only_container(objects[("Deployment", "textgen")])["ports"]}
    service = objects[("Service", "textgen")]
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    direct = objects[("Service", "textgen-direct")]
    assert direct["spec"]["clusterIP"] == "None", "client-side balancing needs a headless Service"
    assert not direct["spec"].get("publishNotReadyAddresses"), "clients must only see ready pods"
    for svc in (service, direct):
        assert selects(svc["spec"]["selector"], pod_labels)
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports


def test_hpa_scales_the_deployment_on_the_metric_the_adapter_serves() -> None:
    objects = rendered("base")
    hpa = objects[("HorizontalPodAutoscaler", "textgen")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "textgen"}
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = yaml.safe_load((PROMETHEUS / "prometheus-adapter.yaml").read_text(encoding="utf-8"))["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == "textgen_active_sequences"
    assert re.fullmatch(rule["name"]["matches"], "textgen_active_sequences")
    assert rule["seriesQuery"].startswith("textgen_active_sequences{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "textgen_active_sequences" in exported_sample_names()
    # The per-pod target stays below what one pod admits, so the HPA adds pods before rejections.
    config = server_config_map(objects)
    assert float(metric["pods"]["target"]["averageValue"]) < int(config["TEXTGEN_MAX_CONCURRENT"])


def test_pdb_covers_the_server_pods_and_lets_a_drain_proceed() -> None:
    objects = rendered("base")
    pdb = objects[("PodDisruptionBudget", "textgen")]
    pod_labels = objects[("Deployment", "textgen")]["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] >= 1


def test_service_monitor_scrapes_each_pod_once_through_the_metrics_port() -> None:
    objects = rendered("base")
    monitor = objects[("ServiceMonitor", "textgen")]
    (endpoint,) = monitor["spec"]["endpoints"]
    services = [o for (kind, _), o in objects.items() if kind == "Service"]
    scraped = [
        s
        for s in services
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["textgen"]
    assert endpoint["path"] == "/metrics"


def test_prometheus_rule_carries_exactly_the_rules_file() -> None:
    rule = rendered("base")[("PrometheusRule", "textgen")]
    rules_file = yaml.safe_load((PROMETHEUS / "textgen-rules.yaml").read_text(encoding="utf-8"))
    assert rule["spec"]["groups"] == rules_file["groups"]
    alerts = {r["alert"] for g in rules_file["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "TextgenTimeToFirstTokenHigh",
        "TextgenInterTokenLatencyHigh",
        "TextgenModelLoadFailed",
        "TextgenResourceExhausted",
    }


def test_rules_and_adapter_use_only_metrics_the_server_exports() -> None:
    exported = exported_sample_names()
    texts = [(PROMETHEUS / "textgen-rules.yaml").read_text(encoding="utf-8")]
    texts.append((PROMETHEUS / "prometheus-adapter.yaml").read_text(encoding="utf-8"))
    used = {m for text in texts for m in re.findall(r"(?<![:\w])(textgen_[a-z_]+)", text)}
    assert used, "no textgen metric referenced"
    assert used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"


def exported_sample_names() -> set[str]:
    """Every sample name the server's registry exposes once each metric has a child."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import ServingMetrics

    metrics = ServingMetrics()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            value.labels(*["x"] * len(value._labelnames))
    text = generate_latest(metrics.registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


# ---- the training Job --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["training", "overlays/cpu-training"])
def test_training_job_is_indexed_with_a_headless_service_naming_its_workers(name: str) -> None:
    objects = rendered(name)
    job = objects[("Job", "textgen-train")]
    env = {e["name"]: e for e in only_container(job)["env"]}
    workers = int(env["TEXTGEN_TRAIN_WORKERS"]["value"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == workers >= 2
    service = objects[("Service", pod_spec(job)["subdomain"])]
    assert env["TEXTGEN_TRAIN_SERVICE"]["value"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert selects(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    port = int(env["TEXTGEN_TRAIN_PORT"]["value"])
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    assert [p["containerPort"] for p in only_container(job)["ports"]] == [port]
    gpu = "nvidia.com/gpu" in only_container(job)["resources"]["limits"]
    assert gpu == (name == "training")


def run_job_entry(job: dict[str, Any], index: int, tmp_path: Path) -> dict[str, Any]:
    """Runs the Job container's command as the kubelet would, with `textgen` replaced by a recorder."""
    container = only_container(job)
    env = {e["name"]: e.get("value") for e in container["env"]}
    env["TEXTGEN_TRAIN_JOB"] = job["metadata"]["name"]  # the Job controller's label
    env["TEXTGEN_TRAIN_RUN"] = "0f3c-run"  # the Job's uid
    env["JOB_COMPLETION_INDEX"] = str(index)
    # The kubelet expands $(VAR) in command and args from the container's env.
    argv = [re.sub(r"\$\((\w+)\)", lambda m: str(env[m.group(1)]), a) for a in container["command"] + container["args"]]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "textgen"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'tf_config': os.environ['TF_CONFIG']}))\n",
        encoding="utf-8",
    )
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    process_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    out = subprocess.run(argv, env=process_env, capture_output=True, text=True, timeout=30, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_training_entry_builds_tf_config_from_the_completion_index(tmp_path: Path) -> None:
    if shutil.which("sh") is None:
        pytest.skip("no /bin/sh to run the Job's entry script")
    job = rendered("training")[("Job", "textgen-train")]
    workers = job["spec"]["completions"]
    expected_cluster = [f"textgen-train-{i}.textgen-train:2222" for i in range(workers)]
    for index in range(workers):
        seen = run_job_entry(job, index, tmp_path)
        tf_config = json.loads(seen["tf_config"])
        assert tf_config == {"cluster": {"worker": expected_cluster}, "task": {"type": "worker", "index": index}}
        assert seen["argv"][0] == "train"
        assert "--checkpoint-dir=/checkpoints/0f3c-run/checkpoints" in seen["argv"]
        assert "--resume" in seen["argv"]


def test_training_job_arguments_are_flags_textgen_train_accepts() -> None:
    training_config = pytest.importorskip("training.config", reason="training/config.py not built yet")
    args = only_container(rendered("training")[("Job", "textgen-train")])["args"]
    config = training_config.parse_args(args)
    assert config.out == "/models/textgen"
    assert config.resume is True


def test_training_tf_config_makes_exactly_one_chief(tmp_path: Path) -> None:
    distribute = pytest.importorskip("training.distribute", reason="training/distribute.py not built yet")
    job = rendered("training")[("Job", "textgen-train")]
    specs = [
        distribute.parse_tf_config({"TF_CONFIG": run_job_entry(job, i, tmp_path)["tf_config"]})
        for i in range(job["spec"]["completions"])
    ]
    assert all(s.multi_worker and s.num_workers == len(specs) for s in specs)
    assert [s.is_chief for s in specs] == [True] + [False] * (len(specs) - 1)


# ---- the Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    text = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in dockerfile_instructions() if word == "ARG" and "=" in rest)


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def dockerfile_uid() -> int:
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users, "the final stage sets no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {uid!r}: use a numeric uid so the kubelet can enforce runAsNonRoot"
    return int(uid)


def test_dockerfile_is_multi_stage_and_runs_textgen_as_non_root() -> None:
    instructions = dockerfile_instructions()
    stages = [rest for word, rest in instructions if word == "FROM"]
    assert len(stages) >= 2, "build and runtime stages"
    assert dockerfile_uid() != 0
    entrypoints = [rest for word, rest in final_stage() if word == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [["textgen"]], "exec form, textgen"
    assert any(word == "COPY" and rest.startswith("--from=") for word, rest in final_stage())
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "service.protogen" in runs, "the image builds its protobuf stubs"
    assert "grpcio-tools" not in " ".join(rest for word, rest in final_stage()), "build tools stay in the build stage"


def test_dockerfile_bakes_no_model_and_copies_only_source_the_context_includes() -> None:
    copies = [rest for word, rest in dockerfile_instructions() if word in ("COPY", "ADD")]
    context_sources = []
    for rest in copies:
        parts = [p for p in rest.split() if not p.startswith("--")]
        if rest.startswith("--from="):
            continue
        context_sources.extend(parts[:-1])
    assert context_sources
    for source in context_sources:
        assert "model" not in source.lower(), f"COPY {source}: models come from a volume"
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert dockerignore_includes(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
    for excluded in ("models", "models/textgen/1/saved_model.pb", ".venv", ".git", "runs"):
        assert not dockerignore_includes(excluded), f".dockerignore lets {excluded} into the build context"


def test_dockerfile_tensorflow_and_python_match_pyproject() -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib_load(ROOT / "pyproject.toml")["project"]
    tf_spec = next(d for d in project["dependencies"] if re.match(r"tensorflow\b", d))
    args = dockerfile_args()
    assert Version(args["TF_VERSION"]) in SpecifierSet(tf_spec[len("tensorflow") :])
    assert Version(args["PYTHON_VERSION"] + ".0") in SpecifierSet(project["requires-python"])
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert '"tensorflow[and-cuda]==${TF_VERSION}"' in runs, "the GPU build of the pinned TensorFlow"
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            assert rest.split()[0] == "python:${PYTHON_VERSION}-slim-bookworm", rest


def tomllib_load(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with path.open("rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    return data


def dockerignore_includes(path: str) -> bool:
    """Whether ``path`` (relative to the repository) is sent to the Docker build context."""
    from fnmatch import fnmatchcase

    patterns = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    included = True
    prefixes = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern[1:] if negate else pattern
        globs = {glob, glob.removeprefix("**/")} if glob.startswith("**/") else {glob}
        if any(fnmatchcase(p, g) or g == "**" for p in prefixes for g in globs):
            included = negate
    return included


def test_build_stage_makes_a_package_with_stubs_from_the_copied_source_alone(tmp_path: Path) -> None:
    """The build stage offline: only what the Dockerfile COPYs, stubs regenerated, then a wheel."""
    context = tmp_path / "src"
    context.mkdir()
    for word, rest in dockerfile_instructions():
        if word != "COPY" or rest.startswith("--from="):
            continue
        *sources, dest = rest.split()
        for source in sources:
            origin = ROOT / source
            target = context / (source if dest.endswith("/") and dest != "./" else origin.name)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "models"))
            else:
                shutil.copy2(origin, target)
    shutil.rmtree(context / "service" / "api")  # the stubs must come from the .proto, as in the image
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-m", "service.protogen"], cwd=context, env=env, check=True, capture_output=True, timeout=60
    )
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    import zipfile

    (wheel,) = (context / "dist").glob("textgen-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"service/api/textgen_pb2.py", "service/api/textgen_pb2_grpc.py", "training/export.py"} <= names
    assert "textgen = service.cli:main" in entry_points
    assert not any("saved_model.pb" in n or n.startswith("models/") for n in names)


def test_deploy_docs_name_only_files_and_kustomizations_that_exist() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"(?<![\w/])((?:deploy|tests/deploy)/[\w./-]*[\w/])", text))
    assert "deploy/Dockerfile" in paths and "deploy/k8s/base" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/deploy.md names paths that do not exist: {missing}"
    for applied in re.findall(r"kubectl apply -k (\S+)", text):
        assert (ROOT / applied / "kustomization.yaml").is_file(), applied
