"""compose.yaml, deploy/nginx and deploy/kubernetes agree with the server (no Docker, no cluster here).

Each check is a function that returns the problems it finds: the real files must give none, and a
copy with one thing broken (the mutation tests at the bottom) must give at least one.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.core.telemetry import LiveState, Telemetry
from gateway.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/kubernetes"
NGINX = ROOT / "deploy/nginx/nginx.conf"
DEFAULTS = Settings()
PRE_STOP_COMMAND = ("sleep",)

Doc = dict[str, Any]


# ---------------------------------------------------------------- loading


def _yaml_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_docs() -> dict[tuple[str, str], Doc]:
    docs: dict[tuple[str, str], Doc] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _yaml_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in docs, f"{path.name}: {key} defined twice"
            docs[key] = doc
    return docs


def _one(docs: dict[tuple[str, str], Doc], kind: str, name: str = "embedding-gateway") -> Doc:
    assert (kind, name) in docs, f"deploy/kubernetes has no {kind} {name}"
    return docs[(kind, name)]


def _compose() -> Doc:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _exported_names() -> set[str]:
    text = Telemetry().render_prometheus(LiveState()).decode()
    return set(re.findall(r"^# TYPE (\w+) ", text, flags=re.MULTILINE))


def _setting_variables() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.field_names()}


def _seconds(value: str | int) -> float:
    """A compose duration ("1m30s", "40s") or a number of seconds."""
    if isinstance(value, int):
        return value
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert parts and value, f"unreadable duration {value!r}"
    return int(parts[1] or 0) * 60 + int(parts[2] or 0)


# ---------------------------------------------------------------- Kubernetes


def _container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    gateways = [c for c in containers if c["name"] == "gateway"]
    assert len(gateways) == 1, "the Deployment needs exactly one container named gateway"
    return gateways[0]


def _container_env(deployment: Doc, configmaps: dict[str, Doc]) -> dict[str, str]:
    """The EMBED_* environment the container gets: envFrom ConfigMaps, then env (which wins)."""
    container = _container(deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
    env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    return {key: str(value) for key, value in env.items()}


def _port_number(container: Doc, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def _shutdown_timeout(env: dict[str, str]) -> int:
    return int(env.get("EMBED_SHUTDOWN_TIMEOUT_S", DEFAULTS.shutdown_timeout_s))


def _pre_stop_seconds(container: Doc) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if tuple(command[:1]) == PRE_STOP_COMMAND and len(command) == 2:
        return float(command[1])
    return 0.0


def deployment_problems(deployment: Doc, configmaps: dict[str, Doc]) -> list[str]:
    problems: list[str] = []
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    env = _container_env(deployment, configmaps)
    try:
        settings = Settings.load(environ=env)
    except ValueError as exc:
        return [f"the container's settings do not load: {exc}"]
    if settings.host != "0.0.0.0":
        problems.append(f"EMBED_HOST is {settings.host!r}: the kubelet and the Service cannot reach it")
    if not settings.redis_url:
        problems.append("EMBED_REDIS_URL is unset: each pod would keep its own in-process cache")
    ports = {p["containerPort"] for p in container.get("ports", [])}
    if ports != {settings.port}:
        problems.append(f"container ports {ports} are not EMBED_PORT {settings.port}")

    wanted = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/livez"}
    for probe_name, path in wanted.items():
        get = container.get(probe_name, {}).get("httpGet", {})
        if get.get("path") != path:
            problems.append(f"{probe_name} asks {get.get('path')!r}, not {path}")
        if _port_number(container, get.get("port", -1)) != settings.port:
            problems.append(f"{probe_name} asks port {get.get('port')!r}, not the container's {settings.port}")
    startup = container.get("startupProbe", {})
    startup_budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if startup_budget < 300:
        problems.append(f"startupProbe allows {startup_budget} s: the model loads before the port opens")

    pre_stop = _pre_stop_seconds(container)
    if pre_stop <= 0:
        problems.append("no preStop sleep: the Service keeps sending to a pod that already drains")
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= pre_stop + settings.shutdown_timeout_s:
        problems.append(
            f"terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + "
            f"EMBED_SHUTDOWN_TIMEOUT_S {settings.shutdown_timeout_s}: SIGKILL cuts the drain"
        )

    pod_security = pod["spec"].get("securityContext", {})
    security = container.get("securityContext", {})
    if not (pod_security.get("runAsNonRoot") or security.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if not security.get("readOnlyRootFilesystem"):
        problems.append("readOnlyRootFilesystem is not set")
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    for path in ("/models", "/tmp"):  # HF_HOME (Dockerfile), and the temp dir
        if path not in mounts or "emptyDir" not in volumes.get(mounts[path], {}):
            problems.append(f"{path} is not a writable emptyDir on a read-only root filesystem")
    if "memory" not in container.get("resources", {}).get("limits", {}):
        problems.append("no memory limit")
    if settings.cpu_threads:
        request = str(container.get("resources", {}).get("requests", {}).get("cpu", ""))
        if request != str(settings.cpu_threads):
            problems.append(f"EMBED_CPU_THREADS {settings.cpu_threads} is not the CPU request {request!r}")

    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true":
        problems.append("pods are not marked for scraping")
    if annotations.get("prometheus.io/port") != str(settings.port):
        problems.append(f"scrape port {annotations.get('prometheus.io/port')!r} is not {settings.port}")
    if annotations.get("prometheus.io/path") != "/metrics":
        problems.append("scrape path is not /metrics")
    return problems


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def selector_problems(selector: dict[str, str], deployment: Doc, others: list[Doc], what: str) -> list[str]:
    problems = []
    if not _selects(selector, deployment["spec"]["template"]["metadata"]["labels"]):
        problems.append(f"{what} selector {selector} misses the gateway's pods")
    if selector != deployment["spec"]["selector"]["matchLabels"]:
        problems.append(f"{what} selector {selector} is not the Deployment's selector")
    for other in others:
        if _selects(selector, other["spec"]["template"]["metadata"]["labels"]):
            problems.append(f"{what} selector {selector} also picks {other['metadata']['name']}'s pods")
    return problems


def service_problems(service: Doc, deployment: Doc, others: list[Doc]) -> list[str]:
    problems = selector_problems(service["spec"]["selector"], deployment, others, "the Service's")
    container = _container(deployment)
    ports = {p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        if _port_number(container, port.get("targetPort", port["port"])) not in ports:
            problems.append(f"Service port {port} targets no container port")
    return problems


def pdb_problems(pdb: Doc, deployment: Doc, others: list[Doc]) -> list[str]:
    problems = selector_problems(pdb["spec"]["selector"]["matchLabels"], deployment, others, "the PDB's")
    budget = {k: pdb["spec"][k] for k in ("minAvailable", "maxUnavailable") if k in pdb["spec"]}
    if budget not in ({"maxUnavailable": 1}, {"minAvailable": 1}):
        problems.append(f"the PDB's budget {budget} is not maxUnavailable 1 or minAvailable 1")
    return problems


def _target_problems(doc: Doc, deployment: Doc) -> list[str]:
    ref = doc["spec"]["scaleTargetRef"]
    if (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment"), ref["name"]) != (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    ):
        return [f"{doc['kind']} scales {ref}, not the gateway's Deployment"]
    return []


def hpa_problems(hpa: Doc, deployment: Doc, exported: set[str]) -> list[str]:
    problems = _target_problems(hpa, deployment)
    if hpa["apiVersion"] != "autoscaling/v2":
        problems.append(f"the HPA is {hpa['apiVersion']}, not autoscaling/v2")
    queue = [m["pods"] for m in hpa["spec"].get("metrics", []) if m["type"] == "Pods" and "embedding_queue" in str(m)]
    if len(queue) != 1:
        problems.append("the HPA has no Pods metric on the queued tokens")
    for pods in queue:
        if pods["metric"]["name"] not in exported:
            problems.append(f"the HPA's metric {pods['metric']['name']!r} is not one /metrics exports")
        if pods["target"]["type"] != "AverageValue" or int(pods["target"]["averageValue"]) <= 0:
            problems.append("the HPA's target is not a positive per-pod AverageValue")
    if not 2 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]:
        problems.append("the HPA's minReplicas is below 2 (a drain would leave no pod) or above maxReplicas")
    return problems


def keda_problems(scaled: Doc, deployment: Doc, exported: set[str]) -> list[str]:
    problems = _target_problems(scaled, deployment)
    triggers = [t for t in scaled["spec"].get("triggers", []) if t["type"] == "prometheus"]
    if len(triggers) != 1:
        return [*problems, "the ScaledObject has no prometheus trigger"]
    query = triggers[0]["metadata"]["query"]
    used = set(re.findall(r"\bembedding_\w+", query))
    if "embedding_queue_tokens" not in used:
        problems.append(f"the ScaledObject's query {query!r} is not on the queued tokens")
    if used - exported:
        problems.append(f"the ScaledObject queries metrics /metrics does not export: {used - exported}")
    if float(triggers[0]["metadata"]["threshold"]) <= 0:
        problems.append("the ScaledObject's threshold is not positive")
    if not 2 <= scaled["spec"].get("minReplicaCount", 0) <= scaled["spec"]["maxReplicaCount"]:
        problems.append("the ScaledObject's minReplicaCount is below 2 or above maxReplicaCount")
    return problems


def kustomization_problems(kustomization: Doc) -> list[str]:
    listed = list(kustomization["resources"])
    problems = [f"kustomization lists {name}, which is not in deploy/kubernetes" for name in listed]
    problems = [text for name, text in zip(listed, problems, strict=True) if not (K8S / name).is_file()]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "keda.yaml"}
    if missing := on_disk - set(listed):
        problems.append(f"kustomization leaves out {sorted(missing)}")
    if {"hpa.yaml", "keda.yaml"} <= set(listed):
        problems.append("kustomization lists both hpa.yaml and keda.yaml: two autoscalers would fight")
    if not {"hpa.yaml", "keda.yaml"} & set(listed):
        problems.append("kustomization lists no autoscaler")
    return problems


def redis_problems(configmap: Doc, docs: dict[tuple[str, str], Doc]) -> list[str]:
    url = configmap["data"]["EMBED_REDIS_URL"]
    host, _, port = url.partition("://")[2].partition("/")[0].rpartition("@")[2].partition(":")
    service = docs.get(("Service", host))
    if service is None:
        return [f"EMBED_REDIS_URL names {host!r}, which no Service in deploy/kubernetes is"]
    if int(port or 6379) not in {p["port"] for p in service["spec"]["ports"]}:
        return [f"EMBED_REDIS_URL's port {port} is not the {host} Service's"]
    (redis,) = docs[("Deployment", host)]["spec"]["template"]["spec"]["containers"]
    args = " ".join(redis["args"])
    if "allkeys-lru" not in args or "--maxmemory " not in args:
        return ["the Redis Deployment is not a bounded LRU cache (maxmemory, allkeys-lru)"]
    return []


# ---------------------------------------------------------------- compose and nginx


def compose_problems(compose: Doc) -> list[str]:
    problems: list[str] = []
    services = compose["services"]
    gateway, lb = services["gateway"], services.get("lb", {})
    if "ports" in gateway:
        problems.append("gateway publishes a host port: `--scale gateway=3` would collide on it")
    if "container_name" in gateway:
        problems.append("gateway has a container_name: it cannot be scaled")
    environment = {
        key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in gateway["environment"].items()
    }
    settings = Settings.load(environ=environment)
    if settings.host != "0.0.0.0" or not settings.redis_url:
        problems.append("gateway must listen on 0.0.0.0 and share the Redis cache")
    if "/readyz" not in " ".join(gateway.get("healthcheck", {}).get("test", [])):
        problems.append("gateway's healthcheck does not ask /readyz")
    if _seconds(gateway.get("stop_grace_period", "10s")) <= settings.shutdown_timeout_s:
        problems.append("gateway's stop_grace_period does not leave EMBED_SHUTDOWN_TIMEOUT_S to drain")
    published = {str(p).rsplit(":", 1)[0]: str(p).rsplit(":", 1)[1] for p in lb.get("ports", [])}
    if published.get("8001") != "8001":
        problems.append(f"the load balancer does not publish 8001 (ports {lb.get('ports')})")
    depends = lb.get("depends_on", {})
    if "gateway" not in depends:
        problems.append("the load balancer does not depend on gateway")
    elif isinstance(depends, dict) and depends["gateway"].get("condition") != "service_healthy":
        problems.append("the load balancer starts before gateway is healthy")
    mounts = {v.split(":")[0]: v.split(":")[1] for v in lb.get("volumes", [])}
    if mounts.get("./deploy/nginx/nginx.conf") != "/etc/nginx/nginx.conf":
        problems.append("the load balancer does not load deploy/nginx/nginx.conf")
    return problems


def nginx_problems(conf: str, compose: Doc) -> list[str]:
    problems: list[str] = []
    code = re.sub(r"#[^\n]*", "", conf)  # comments say nothing to nginx
    directives = {m[1]: m[2].strip() for m in re.finditer(r"^\s*(\w+)\s+([^;{]*);", code, flags=re.MULTILINE)}
    if not re.match(r"127\.0\.0\.11\b.*\bvalid=\d+s", directives.get("resolver", "")):
        problems.append("no `resolver 127.0.0.11 valid=...`: new replicas would never be seen")
    upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", code)
    if upstream is None:
        return [*problems, "no upstream block"]
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\s+([^;]*);", upstream[2], flags=re.MULTILINE)
    gateway_port = str(compose["services"]["gateway"]["environment"].get("EMBED_PORT", DEFAULTS.port))
    if [(host, port) for host, port, _ in servers] != [("gateway", gateway_port)]:
        problems.append(f"the upstream servers {servers} are not the compose service gateway:{gateway_port}")
    elif "resolve" not in servers[0][2].split():
        problems.append("the upstream server lacks `resolve`: only the replicas alive at start would be used")
    if not re.search(r"^\s*zone\s+\w+", upstream[2], flags=re.MULTILINE):
        problems.append("the upstream has no zone (`resolve` needs one)")
    keepalive = re.search(r"^\s*keepalive\s+(\d+);", upstream[2], flags=re.MULTILINE)
    if keepalive is None or int(keepalive[1]) < 1:
        problems.append("no keepalive connections to the replicas")
    idle = re.search(r"^\s*keepalive_timeout\s+(\d+)s;", upstream[2], flags=re.MULTILINE)
    if idle is None or int(idle[1]) >= DEFAULTS.keepalive_timeout_s:
        problems.append("upstream keepalive_timeout must be below EMBED_KEEPALIVE_TIMEOUT_S (the gateway closes first)")
    if not re.search(rf"proxy_pass\s+http://{upstream[1]};", code):
        problems.append(f"proxy_pass does not go to the upstream {upstream[1]}")
    if directives.get("proxy_http_version") != "1.1" or not re.search(r'proxy_set_header\s+Connection\s+"";', code):
        problems.append("upstream keepalive needs proxy_http_version 1.1 and an empty Connection header")
    size = re.fullmatch(r"(\d+)([km]?)", directives.get("client_max_body_size", ""))
    body = int(size[1]) * {"": 1, "k": 1024, "m": 1024 * 1024}[size[2]] if size else None
    if body != DEFAULTS.max_body_bytes:
        problems.append(f"client_max_body_size is {body} bytes, not EMBED_MAX_BODY_BYTES {DEFAULTS.max_body_bytes}")
    if directives.get("listen") != "8001":
        problems.append(f"nginx listens on {directives.get('listen')!r}, not the published 8001")
    for timeout in ("proxy_connect_timeout", "proxy_send_timeout", "proxy_read_timeout"):
        if timeout not in directives:
            problems.append(f"no {timeout}")
    return problems


def variable_problems(texts: dict[str, str]) -> list[str]:
    known = _setting_variables()
    return [
        f"{name}: {variable} is not a setting in gateway/settings.py"
        for name, text in texts.items()
        for variable in sorted(set(re.findall(r"\bEMBED_[A-Z0-9_]*[A-Z0-9]", text)))
        if variable not in known
    ]


def _deploy_texts() -> dict[str, str]:
    paths = [ROOT / "compose.yaml", *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


# ---------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], Doc]:
    return _k8s_docs()


def _configmaps(docs: dict[tuple[str, str], Doc]) -> dict[str, Doc]:
    return {name: doc for (kind, name), doc in docs.items() if kind == "ConfigMap"}


def _other_deployments(docs: dict[tuple[str, str], Doc]) -> list[Doc]:
    return [doc for (kind, name), doc in docs.items() if kind == "Deployment" and name != "embedding-gateway"]


def test_every_yaml_file_parses_and_names_its_kind() -> None:
    paths = sorted((ROOT / "deploy").rglob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        for doc in _yaml_docs(path):
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document without apiVersion/kind"


def test_deployment(docs: dict[tuple[str, str], Doc]) -> None:
    assert deployment_problems(_one(docs, "Deployment"), _configmaps(docs)) == []


def test_service_selects_the_pods_and_targets_their_port(docs: dict[tuple[str, str], Doc]) -> None:
    deployment = _one(docs, "Deployment")
    assert service_problems(_one(docs, "Service"), deployment, _other_deployments(docs)) == []


def test_pdb_selects_the_pods(docs: dict[tuple[str, str], Doc]) -> None:
    deployment = _one(docs, "Deployment")
    assert pdb_problems(_one(docs, "PodDisruptionBudget"), deployment, _other_deployments(docs)) == []


def test_autoscalers_scale_the_deployment_on_an_exported_metric(docs: dict[tuple[str, str], Doc]) -> None:
    deployment, exported = _one(docs, "Deployment"), _exported_names()
    assert "embedding_queue_tokens" in exported
    assert hpa_problems(_one(docs, "HorizontalPodAutoscaler"), deployment, exported) == []
    assert keda_problems(_one(docs, "ScaledObject"), deployment, exported) == []


def test_kustomization_lists_the_files() -> None:
    (kustomization,) = _yaml_docs(K8S / "kustomization.yaml")
    assert kustomization_problems(kustomization) == []


def test_redis_url_names_the_redis_service(docs: dict[tuple[str, str], Doc]) -> None:
    assert redis_problems(_one(docs, "ConfigMap"), docs) == []


def test_every_embed_variable_is_a_setting() -> None:
    texts = _deploy_texts()
    assert any("EMBED_REDIS_URL" in text for text in texts.values())
    assert variable_problems(texts) == []


def test_compose_scales_the_gateway_behind_the_load_balancer() -> None:
    assert compose_problems(_compose()) == []


def test_nginx_proxies_to_every_gateway_replica() -> None:
    assert nginx_problems(NGINX.read_text(), _compose()) == []


# ---------------------------------------------------------------- each check can fail

Mutation = Callable[[Doc], object]


DEPLOYMENT_MUTATIONS: dict[str, Mutation] = {
    "liveness on /readyz": lambda d: _container(d)["livenessProbe"]["httpGet"].update(path="/readyz"),
    "readiness on /health": lambda d: _container(d)["readinessProbe"]["httpGet"].update(path="/health"),
    "readiness on another port": lambda d: _container(d)["readinessProbe"]["httpGet"].update(port=9000),
    "startup probe on an unknown port name": lambda d: _container(d)["startupProbe"]["httpGet"].update(port="web"),
    "short startup": lambda d: _container(d)["startupProbe"].update(failureThreshold=3),
    "grace below the drain": lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
    "no preStop": lambda d: _container(d).pop("lifecycle"),
    "container port 8080": lambda d: _container(d)["ports"][0].update(containerPort=8080),
    "root": lambda d: d["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
    "writable root": lambda d: _container(d)["securityContext"].pop("readOnlyRootFilesystem"),
    "no /models volume": lambda d: _container(d)["volumeMounts"].pop(0),
    "scrape port": lambda d: d["spec"]["template"]["metadata"]["annotations"].update({"prometheus.io/port": "80"}),
    "loopback host": lambda d: _container(d).setdefault("env", []).append({"name": "EMBED_HOST", "value": "127.0.0.1"}),
    "longer drain": lambda d: (
        _container(d).setdefault("env", []).append({"name": "EMBED_SHUTDOWN_TIMEOUT_S", "value": "120"})
    ),
    "bad setting value": lambda d: (
        _container(d).setdefault("env", []).append({"name": "EMBED_PORT", "value": "eighty"})
    ),
}


@pytest.mark.parametrize("name", sorted(DEPLOYMENT_MUTATIONS))
def test_deployment_check_catches(name: str, docs: dict[tuple[str, str], Doc]) -> None:
    deployment = copy.deepcopy(_one(docs, "Deployment"))
    DEPLOYMENT_MUTATIONS[name](deployment)
    assert deployment_problems(deployment, _configmaps(docs))


def test_service_pdb_and_autoscaler_checks_catch(docs: dict[tuple[str, str], Doc]) -> None:
    deployment, others, exported = _one(docs, "Deployment"), _other_deployments(docs), _exported_names()
    service = copy.deepcopy(_one(docs, "Service"))
    service["spec"]["selector"]["app.kubernetes.io/name"] = "gateway"
    assert service_problems(service, deployment, others)
    service = copy.deepcopy(_one(docs, "Service"))
    service["spec"]["ports"][0]["targetPort"] = 80
    assert service_problems(service, deployment, others)
    service = copy.deepcopy(_one(docs, "Service"))
    service["spec"]["selector"] = {"app.kubernetes.io/name": "redis"}
    assert service_problems(service, deployment, others)

    pdb = copy.deepcopy(_one(docs, "PodDisruptionBudget"))
    pdb["spec"]["selector"]["matchLabels"].pop("app.kubernetes.io/component")
    assert pdb_problems(pdb, deployment, others)
    pdb = copy.deepcopy(_one(docs, "PodDisruptionBudget"))
    pdb["spec"]["maxUnavailable"] = 3
    assert pdb_problems(pdb, deployment, others)

    hpa = copy.deepcopy(_one(docs, "HorizontalPodAutoscaler"))
    hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] = "embedding_queue_depth_tokens"
    assert hpa_problems(hpa, deployment, exported)
    hpa = copy.deepcopy(_one(docs, "HorizontalPodAutoscaler"))
    hpa["spec"]["scaleTargetRef"]["name"] = "redis"
    assert hpa_problems(hpa, deployment, exported)
    hpa = copy.deepcopy(_one(docs, "HorizontalPodAutoscaler"))
    hpa["spec"]["minReplicas"] = 1
    assert hpa_problems(hpa, deployment, exported)

    scaled = copy.deepcopy(_one(docs, "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["query"] = "sum(embedding_queued_tokens)"
    assert keda_problems(scaled, deployment, exported)
    scaled = copy.deepcopy(_one(docs, "ScaledObject"))
    scaled["spec"]["scaleTargetRef"]["kind"] = "StatefulSet"
    assert keda_problems(scaled, deployment, exported)

    configmap = copy.deepcopy(_one(docs, "ConfigMap"))
    configmap["data"]["EMBED_REDIS_URL"] = "redis://cache:6379/0"
    assert redis_problems(configmap, docs)
    configmap["data"]["EMBED_REDIS_URL"] = "redis://redis:6380/0"
    assert redis_problems(configmap, docs)


def test_kustomization_check_catches() -> None:
    (kustomization,) = _yaml_docs(K8S / "kustomization.yaml")
    both = copy.deepcopy(kustomization)
    both["resources"].append("keda.yaml")
    assert kustomization_problems(both)
    short = copy.deepcopy(kustomization)
    short["resources"].remove("pdb.yaml")
    assert kustomization_problems(short)
    ghost = copy.deepcopy(kustomization)
    ghost["resources"].append("ingress.yaml")
    assert kustomization_problems(ghost)


def test_variable_check_catches_a_misspelt_setting() -> None:
    assert variable_problems({"compose.yaml": "EMBED_SHUTDOWN_TIMEOUT: 30"})
    assert variable_problems({"x.yaml": "EMBED_REDIS_URL: redis://redis\nEMBED_CACHE_TTL: 60"})
    assert not variable_problems({"x.yaml": "EMBED_CACHE_TTL_SECONDS: 60"})


COMPOSE_MUTATIONS: dict[str, Mutation] = {
    "fixed host port": lambda c: c["services"]["gateway"].update(ports=["8001:8001"]),
    "container_name": lambda c: c["services"]["gateway"].update(container_name="gateway"),
    "health on /health": lambda c: c["services"]["gateway"]["healthcheck"].update(
        test=["CMD", "curl", "http://127.0.0.1:8001/health"]
    ),
    "short stop grace": lambda c: c["services"]["gateway"].pop("stop_grace_period"),
    "lb on 8080": lambda c: c["services"]["lb"].update(ports=["8080:8001"]),
    "lb without depends_on": lambda c: c["services"]["lb"].pop("depends_on"),
    "lb without its config": lambda c: c["services"]["lb"].pop("volumes"),
    "no lb": lambda c: c["services"].pop("lb"),
    "loopback gateway": lambda c: c["services"]["gateway"]["environment"].update(EMBED_HOST="127.0.0.1"),
}


@pytest.mark.parametrize("name", sorted(COMPOSE_MUTATIONS))
def test_compose_check_catches(name: str) -> None:
    compose = _compose()
    COMPOSE_MUTATIONS[name](compose)
    assert compose_problems(compose)


NGINX_MUTATIONS: dict[str, tuple[str, str]] = {
    "another resolver": ("resolver 127.0.0.11", "resolver 8.8.8.8"),
    "another service": ("server gateway:8001", "server embedder:8001"),
    "another port": ("server gateway:8001", "server gateway:8000"),
    "no resolve": ("server gateway:8001 resolve", "server gateway:8001"),
    "no keepalive": ("keepalive 64;", ""),
    "keepalive outlives the gateway's": ("keepalive_timeout 4s;", "keepalive_timeout 60s;"),
    "small bodies": ("client_max_body_size 32m;", "client_max_body_size 1m;"),
    "listen 80": ("listen 8001;", "listen 80;"),
    "no read timeout": ("proxy_read_timeout 300s;", ""),
    "proxy elsewhere": ("proxy_pass http://gateway;", "proxy_pass http://other;"),
    "HTTP/1.0 upstream": ("proxy_http_version 1.1;", ""),
}


@pytest.mark.parametrize("name", sorted(NGINX_MUTATIONS))
def test_nginx_check_catches(name: str) -> None:
    old, new = NGINX_MUTATIONS[name]
    conf = NGINX.read_text()
    assert old in conf
    assert nginx_problems(conf.replace(old, new), _compose())
