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
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service import config as config_module
from tests.deploy.kustomization import KustomizeError, object_key, render
from tests.helpers import RunningServer, need_tool
from training import config as training_config
from training import distribute

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
KUSTOMIZATIONS = ["base", "training", "overlays/cpu", "overlays/cpu-training", "overlays/tls"]
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
    kubectl = need_tool("kubectl")  # missing: skipped, and named at the end of the run
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
    assert ports == {
        "grpc": int(config["TEXTGEN_PORT"]),
        "metrics": int(config["TEXTGEN_METRICS_PORT"]),
        "http": int(config["TEXTGEN_HTTP_PORT"]),
    }
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
    data = server_config_map(rendered("base"))
    assert all(key.startswith(config_module.ENV_PREFIX) for key in data)
    known = {config_module.ENV_PREFIX + f.name.upper() for f in fields(config_module.ServerConfig)}
    assert set(data) <= known, f"unknown settings: {sorted(set(data) - known)}"
    for name in ("base", "overlays/cpu"):
        config = config_module.parse_config([], server_config_map(rendered(name)))
        assert config.models == "/models" and config.port == 8500 and config.max_connection_age > 0


# ---- Services, autoscaling, disruption budget, monitoring -------------------------------


def test_service_exposes_named_grpc_http_and_metrics_ports_of_the_server_pods() -> None:
    objects = rendered("base")
    pod_labels = objects[("Deployment", "textgen")]["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in only_container(objects[("Deployment", "textgen")])["ports"]}
    service = objects[("Service", "textgen")]
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics", "http"}
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


# ---- the TLS overlay ------------------------------------------------------------------------

TLS = "overlays/tls"
TLS_ENV = ("TEXTGEN_TLS_CERT", "TEXTGEN_TLS_KEY", "TEXTGEN_TLS_CLIENT_CA", "TEXTGEN_AUTH_TOKEN_FILE")
# What the overlay's comments tell operators to put in each Secret (kubectl create secret ...).
SECRET_KEYS = {"textgen-tls": {"tls.crt", "tls.key", "ca.crt"}, "textgen-auth-tokens": {"tokens"}}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def secret_mounts(workload: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (volumeMount, volume) for every Secret volume the container mounts."""
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    return {
        m["mountPath"]: (m, volumes[m["name"]])
        for m in only_container(workload)["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }


def test_tls_overlay_moves_every_probe_to_the_plaintext_health_port() -> None:
    objects = rendered(TLS)
    container = only_container(objects[("Deployment", "textgen")])
    base_container = only_container(rendered("base")[("Deployment", "textgen")])
    config = server_config_map(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health = int(config["TEXTGEN_HEALTH_PORT"])
    assert ports == {
        "grpc": int(config["TEXTGEN_PORT"]),
        "metrics": int(config["TEXTGEN_METRICS_PORT"]),
        "http": int(config["TEXTGEN_HTTP_PORT"]),
        "health": health,
    }
    assert len(set(ports.values())) == 4
    for probe in PROBES:
        # The kubelet's gRPC probe speaks plaintext and has no client certificate: on the TLS port it would fail.
        assert container[probe]["grpc"]["port"] == health, probe
        moved = copy.deepcopy(base_container[probe])
        moved["grpc"]["port"] = health
        assert container[probe] == moved, f"{probe}: only the port changes (same service name, same timing)"
    # Only the kubelet talks to the health port: no Service exposes it.
    for (kind, name), obj in objects.items():
        if kind == "Service":
            for port in obj["spec"]["ports"]:
                assert port["targetPort"] not in ("health", health) and port["port"] != health, name


def test_tls_overlay_points_the_tls_and_token_flags_into_read_only_secret_volumes() -> None:
    objects = rendered(TLS)
    deployment = objects[("Deployment", "textgen")]
    config = server_config_map(objects)
    mounts = secret_mounts(deployment)
    used: dict[str, set[str]] = {}
    for variable in TLS_ENV:
        path = Path(config[variable])
        assert path.is_absolute(), (variable, path)
        # The file's folder is the mount itself: a whole-Secret mount, which the kubelet updates
        # by swapping a symlink (a subPath mount would never see a rotated token).
        mount, volume = mounts[str(path.parent)]
        assert "subPath" not in mount and "subPathExpr" not in mount
        assert mount.get("readOnly") is True, f"{mount['name']}: mount it readOnly"
        secret = volume["secret"]
        assert path.name in SECRET_KEYS[secret["secretName"]], (variable, path)
        assert "items" not in secret and not secret.get("optional", False)
        used.setdefault(secret["secretName"], set()).add(path.name)
    assert used == SECRET_KEYS
    # Readable by the server's group (the kubelet gives Secret files group fsGroup) and by nobody else.
    pod = pod_spec(deployment)
    for mount, volume in mounts.values():
        mode = volume["secret"]["defaultMode"]
        assert mode & 0o040 and not mode & 0o222 and not mode & 0o007, (mount["name"], oct(mode))
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    # The lock-down of the base holds unchanged with the mounts.
    base = rendered("base")[("Deployment", "textgen")]
    assert pod["securityContext"] == pod_spec(base)["securityContext"]
    assert only_container(deployment)["securityContext"] == only_container(base)["securityContext"]
    assert only_container(deployment)["securityContext"]["readOnlyRootFilesystem"] is True


def test_tls_overlay_documents_every_secret_it_references_and_ships_none() -> None:
    objects = rendered(TLS)
    text = (K8S / TLS / "kustomization.yaml").read_text(encoding="utf-8")
    names = {v["secret"]["secretName"] for _, v in secret_mounts(objects[("Deployment", "textgen")]).values()}
    assert names == set(SECRET_KEYS)
    for name in names:
        assert re.search(rf"kubectl create secret \w+ {name}\b", text), f"{name}: no `kubectl create secret` comment"
        for key in SECRET_KEYS[name]:
            assert re.search(rf"(--from-file={re.escape(key)}=|`{re.escape(key)}`|\b{re.escape(key)}\b)", text), key
    assert "subPath" in text, "the comment must warn that a subPath mount never updates"
    assert not [key for key in objects if key[0] == "Secret"], "keys and tokens never live in the repository"


def test_tls_overlay_leaves_metrics_plaintext_on_their_own_port() -> None:
    base, tls = rendered("base"), rendered(TLS)
    assert tls[("ServiceMonitor", "textgen")] == base[("ServiceMonitor", "textgen")]
    assert server_config_map(tls)["TEXTGEN_METRICS_PORT"] == server_config_map(base)["TEXTGEN_METRICS_PORT"]

    def metrics_port(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
        return next(p for p in objects[("Service", "textgen")]["spec"]["ports"] if p["name"] == "metrics")

    assert metrics_port(tls) == metrics_port(base)
    assert metrics_port(tls)["appProtocol"] == "http"
    # What the overlay may change; everything else is the base's.
    changed = {
        ("Deployment", "textgen"),
        ("ConfigMap", "textgen-server"),
        ("Service", "textgen"),
        ("Service", "textgen-direct"),
    }
    assert set(tls) == set(base)
    for key in set(base) - changed:
        assert tls[key] == base[key], key
    for name in ("textgen", "textgen-direct"):
        grpc_port = next(p for p in tls[("Service", name)]["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] != "kubernetes.io/h2c", f"{name}: the gRPC port is not cleartext any more"
    http_port = next(p for p in tls[("Service", "textgen")]["spec"]["ports"] if p["name"] == "http")
    assert http_port["appProtocol"] == "https", "the HTTP API speaks TLS with the gRPC port's certificate"


def write_secret_volume(folder: Path, data: dict[str, bytes], generation: int) -> None:
    """Lays out (or updates) ``folder`` as the kubelet does a Secret volume (its AtomicWriter).

    Each key is a symlink ``key -> ..data/key``; ``..data`` links to a timestamped folder
    holding the files; an update writes a new folder and swaps ``..data`` with a rename.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stamped = folder / f"..2026_01_01_00_00_{generation:02d}.000000001"
    stamped.mkdir()
    for key, value in data.items():
        (stamped / key).write_bytes(value)
        (stamped / key).chmod(0o440)
    staging = folder / "..data_tmp"
    staging.symlink_to(stamped.name)
    old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
    os.replace(staging, folder / "..data")
    for key in data:
        if not (folder / key).is_symlink():
            (folder / key).symlink_to(f"..data/{key}")
    if old is not None:
        shutil.rmtree(folder / old)


def test_tls_overlay_settings_serve_tls_with_plaintext_health_and_rotating_tokens(
    tiny_model_repo: Path, tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    """The real server from the overlay's environment, with its Secrets laid out as the kubelet does."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.api import textgen_pb2_grpc
    from service.client import build_request
    from service.config import parse_config
    from service.tls import channel_credentials
    from tests.security.certs import make_pki

    objects = rendered(TLS)
    deployment = objects[("Deployment", "textgen")]
    pki = make_pki(tmp_path / "pki")
    contents = {
        "textgen-tls": {"tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": pki.ca.cert},
    }
    root = tmp_path / "pod"
    for mount_path, (_, volume) in secret_mounts(deployment).items():
        name = volume["secret"]["secretName"]
        data = (
            {k: p.read_bytes() for k, p in contents[name].items()} if name in contents else {"tokens": b"first-token\n"}
        )
        write_secret_volume(root / mount_path.lstrip("/"), data, generation=1)
    environ: dict[str, str] = {}
    for key, value in server_config_map(objects).items():
        environ[key] = str(root / value.lstrip("/")) if key in TLS_ENV else value
    config = parse_config([], environ)
    health_port = next(p["containerPort"] for p in only_container(deployment)["ports"] if p["name"] == "health")
    assert config.health_port == health_port
    assert config.tls_client_ca is not None and config.auth_token_file is not None
    # Everything from the overlay except where this test can bind and find its model.
    config = dataclasses.replace(
        config,
        models=str(tiny_model_repo),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        http_port=0,
        health_port=0,
        default_model=None,
    )
    running = start_server(config=config)
    try:
        probe_target = f"127.0.0.1:{running.server.health_port}"
        with grpc.insecure_channel(probe_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for probe in PROBES:
                service = only_container(deployment)[probe]["grpc"]["service"]
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, probe
        with grpc.insecure_channel(running.target) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        def complete(token: str) -> grpc.StatusCode:
            credentials = channel_credentials(str(pki.ca.cert), str(pki.client.cert), str(pki.client.key), token=token)
            with grpc.secure_channel(running.target, credentials) as channel:
                try:
                    textgen_pb2_grpc.TextGenerationStub(channel).Complete(
                        build_request("The ", max_tokens=2, seed=1), timeout=30
                    )
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        assert complete("first-token") == grpc.StatusCode.OK
        assert complete("second-token") == grpc.StatusCode.UNAUTHENTICATED
        # `kubectl apply` of new Secret data: the kubelet swaps ..data; the server reloads, no restart.
        tokens_mount = Path(config.auth_token_file).parent
        write_secret_volume(tokens_mount, {"tokens": b"second-token\n"}, generation=2)
        assert complete("second-token") == grpc.StatusCode.OK
        assert complete("first-token") == grpc.StatusCode.UNAUTHENTICATED
        # /metrics stays plaintext HTTP on its own port.
        assert running.sample("textgen_requests_total", {"code": "OK"}) >= 2
    finally:
        running.stop(grace=0)


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
    args = only_container(rendered("training")[("Job", "textgen-train")])["args"]
    config = training_config.parse_args(args)
    assert config.out == "/models/textgen"
    assert config.resume is True


def test_training_tf_config_makes_exactly_one_chief(tmp_path: Path) -> None:
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
