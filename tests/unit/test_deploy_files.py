"""compose.yaml, deploy/nginx and deploy/kubernetes agree with the server (no Docker, no cluster here).

Each check is a function that returns the problems it finds: the real files must give none, and a
copy with one thing broken (the mutation tests at the bottom) must give at least one.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
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


def _kustomization() -> Doc:
    (kustomization,) = _yaml_docs(K8S / "kustomization.yaml")
    return kustomization


def _env_file(path: Path) -> dict[str, str]:
    """A kustomize env file as kustomize reads it: KEY=VALUE lines, blank lines and `#` comments skipped."""
    data: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.partition("=")
        assert equals, f"{path.name}: {line!r} is not KEY=VALUE"
        data[key] = value
    return data


def _generated(kustomization: Doc) -> list[Doc]:
    """The ConfigMaps and Secrets kustomization.yaml generates, under their names before the hash suffix.

    A Secret's data stays unread: its env file is the operator's (never in git); only its name counts."""
    docs: list[Doc] = []
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in kustomization.get(field, []):
            data: dict[str, str] = {}
            if kind == "ConfigMap":
                for name in generator.get("envs", []):
                    data.update(_env_file(K8S / name))
                data.update(dict(item.partition("=")[::2] for item in generator.get("literals", [])))
            metadata = {"name": generator["name"], "annotations": {"generated-by": field}}
            docs.append({"apiVersion": "v1", "kind": kind, "metadata": metadata, "data": data})
    return docs


def _k8s_docs() -> dict[tuple[str, str], Doc]:
    docs: dict[tuple[str, str], Doc] = {}
    sources = [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in _yaml_docs(path)
    ]
    for where, doc in [*sources, *(("kustomization.yaml", doc) for doc in _generated(_kustomization()))]:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in docs, f"{where}: {key} defined twice"
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


SECRET_STAND_IN = "0123456789abcdef"  # what a secretKeyRef gives here: the real value is the operator's


def _expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's `$(NAME)` expansion: names defined so far are replaced, others left as they are."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value)


def _container_env(deployment: Doc, configmaps: dict[str, Doc], name: str = "gateway") -> dict[str, str]:
    """The environment a container gets, as the kubelet builds it: envFrom ConfigMaps, then env in
    order (which wins), each value with `$(NAME)` expanded; a secretKeyRef gives SECRET_STAND_IN."""
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update({k: str(v) for k, v in configmaps[source["configMapRef"]["name"]]["data"].items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
        elif "secretKeyRef" in item.get("valueFrom", {}):
            env[item["name"]] = SECRET_STAND_IN
    return env


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


def redis_problems(deployment: Doc, configmaps: dict[str, Doc], docs: dict[tuple[str, str], Doc]) -> list[str]:
    url = _container_env(deployment, configmaps).get("EMBED_REDIS_URL", "")
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


_K8S_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
_REDIS_UNITS = {"": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
REDIS_MAXMEMORY_SHARE = 0.75  # of the container's limit: the rest is for buffers, fragmentation, Redis itself


def _k8s_bytes(quantity: str | int) -> int:
    parts = re.fullmatch(r"(\d+)(Ki|Mi|Gi|k|M|G)?", str(quantity))
    assert parts, f"unreadable memory quantity {quantity!r}"
    return int(parts[1]) * _K8S_UNITS[parts[2] or ""]


def _redis_bytes(value: str) -> int:
    parts = re.fullmatch(r"(\d+)(kb|mb|gb|k|m|g)?", value.lower())
    assert parts, f"unreadable Redis memory {value!r}"
    return int(parts[1]) * _REDIS_UNITS[parts[2] or ""]


def _arg_after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _secret_refs(container: Doc) -> dict[str, tuple[str, str]]:
    """Variable name -> (Secret, key) for env items that hold a Secret's value, directly or as `$(NAME)`."""
    refs: dict[str, tuple[str, str]] = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs[item["name"]] = (ref["name"], ref["key"])
        elif (alias := re.fullmatch(r"\$\((\w+)\)", str(item.get("value", "")))) and alias[1] in refs:
            refs[item["name"]] = refs[alias[1]]
    return refs


def _redis_container(docs: dict[tuple[str, str], Doc]) -> Doc:
    (redis,) = _one(docs, "Deployment", "redis")["spec"]["template"]["spec"]["containers"]
    return redis


def redis_memory_problems(docs: dict[tuple[str, str], Doc]) -> list[str]:
    redis = _redis_container(docs)
    maxmemory = _arg_after(redis.get("args", []), "--maxmemory")
    limit = redis.get("resources", {}).get("limits", {}).get("memory")
    if maxmemory is None or limit is None:
        return ["the Redis container needs both --maxmemory and a memory limit"]
    if _redis_bytes(maxmemory) > REDIS_MAXMEMORY_SHARE * _k8s_bytes(limit):
        return [
            f"Redis' maxmemory {maxmemory} is above {REDIS_MAXMEMORY_SHARE:.0%} of its {limit} limit: client "
            "buffers, fragmentation and Redis' own memory would get it OOM-killed (the whole cache lost)"
        ]
    return []


def redis_auth_problems(deployment: Doc, docs: dict[tuple[str, str], Doc]) -> list[str]:
    """Redis asks for a password from a Secret, and the gateway's EMBED_REDIS_URL carries the same one."""
    problems: list[str] = []
    redis = _redis_container(docs)
    redis_refs = _secret_refs(redis)
    password = _arg_after(redis.get("args", []), "--requirepass")
    variable = re.fullmatch(r"\$\((\w+)\)", password or "")
    if password is None:
        return ["Redis runs without --requirepass: any pod that reaches it can read and write vectors"]
    if variable is None or variable[1] not in redis_refs:
        return ["Redis' --requirepass is not `$(NAME)` of an env item from a Secret: never a password in git"]
    secret = redis_refs[variable[1]]
    if ("Secret", secret[0]) not in docs:
        problems.append(f"the Secret {secret[0]!r} of Redis' password is neither generated nor in deploy/kubernetes")
    probe = " ".join(redis.get("readinessProbe", {}).get("exec", {}).get("command", []))
    if "redis-cli" in probe and redis_refs.get("REDISCLI_AUTH") != secret:
        problems.append("the Redis probe's redis-cli has no REDISCLI_AUTH from the Secret: it gets NOAUTH")

    container = _container(deployment)
    urls = [item for item in container.get("env", []) if item["name"] == "EMBED_REDIS_URL"]
    if not urls or "value" not in urls[0]:
        return [
            *problems,
            "the gateway's EMBED_REDIS_URL is not in its env (a ConfigMap's `$(NAME)` is never expanded)",
        ]
    userinfo = str(urls[0]["value"]).partition("://")[2].partition("/")[0].rpartition("@")[0]
    used = re.fullmatch(r"[^:]*:\$\((\w+)\)", userinfo)
    earlier = _secret_refs({"env": container["env"][: container["env"].index(urls[0])]})
    if used is None or earlier.get(used[1]) != secret:
        problems.append(
            f"the gateway's EMBED_REDIS_URL does not take Redis' password from {secret} through `$(NAME)` "
            "of an env item defined before it"
        )
    return problems


def _applies_to(selector: Doc, labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", {})
    return not selector.get("matchExpressions") and all(labels.get(k) == v for k, v in match.items())


def network_policy_problems(deployment: Doc, docs: dict[tuple[str, str], Doc]) -> list[str]:
    """Only the gateway's pods reach Redis, and only on its port."""
    redis_pod = _one(docs, "Deployment", "redis")["spec"]["template"]
    redis, gateway_labels = _redis_container(docs), deployment["spec"]["template"]["metadata"]["labels"]
    others = [d for (kind, name), d in docs.items() if kind == "Deployment" and name != deployment["metadata"]["name"]]
    policies = [
        doc
        for (kind, _), doc in docs.items()
        if kind == "NetworkPolicy"
        and _applies_to(doc["spec"].get("podSelector", {}), redis_pod["metadata"]["labels"])
        and "Ingress" in doc["spec"].get("policyTypes", ["Ingress"])
    ]
    if not policies:
        return ["no NetworkPolicy (Ingress) selects the Redis pods: every pod in the cluster can reach them"]
    problems: list[str] = []
    for policy in policies:
        name = policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("from"):
                problems.append(f"{name}: an ingress rule without `from` admits every pod")
            for peer in rule.get("from", []):
                if set(peer) != {"podSelector"}:
                    problems.append(f"{name}: {sorted(set(peer) - {'podSelector'})} admit more than the gateway's pods")
                    continue
                selector = peer["podSelector"]
                if not selector.get("matchLabels") or not _applies_to(selector, gateway_labels):
                    problems.append(f"{name}: the podSelector {selector} does not pick (only) the gateway's pods")
                for other in others:
                    if _applies_to(selector, other["spec"]["template"]["metadata"]["labels"]):
                        problems.append(f"{name}: the podSelector {selector} also admits {other['metadata']['name']}")
            if not rule.get("ports"):
                problems.append(f"{name}: an ingress rule without `ports` opens every port")
            for port in rule.get("ports", []):
                if _port_number(redis, port.get("port", -1)) != 6379 or port.get("protocol", "TCP") != "TCP":
                    problems.append(f"{name}: admits {port}, not TCP 6379")
    return problems


VERSION_TAG = re.compile(r"v?\d+\.\d+\.\d+(?:[-+.][\w.]+)?")  # 0.1.0, 7.4.6-alpine, v2.55.1; never latest
COMMIT = re.compile(r"[0-9a-f]{40}")


def _image_parts(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of `registry/name:tag@sha256:...`."""
    image, _, digest = image.partition("@")
    name, colon, tag = image.rpartition(":")
    return (name, tag, digest) if colon and "/" not in tag else (image, "", digest)


def image_problems(kustomization: Doc, docs: dict[tuple[str, str], Doc]) -> list[str]:
    """Every image a Deployment runs, after kustomization.yaml's `images:`, is a version or a digest."""
    problems: list[str] = []
    overrides = {entry["name"]: entry for entry in kustomization.get("images", [])}
    for (kind, deployment), doc in docs.items():
        for container in doc["spec"]["template"]["spec"]["containers"] if kind == "Deployment" else []:
            name, tag, digest = _image_parts(container["image"])
            override = overrides.get(name, {})
            tag, digest = str(override.get("newTag", tag)), override.get("digest", digest)
            if not digest and not VERSION_TAG.fullmatch(tag):
                problems.append(
                    f"{deployment}'s image {container['image']} runs tag {tag or '(none)'!r}: pin a version "
                    "(kustomization.yaml's `images:` newTag) or a digest, so every pod runs the same build"
                )
    return problems


def rollout_problems(kustomization: Doc, deployment: Doc, docs: dict[tuple[str, str], Doc]) -> list[str]:
    """A config change rolls the pods, and every pod, whenever started, loads the same model commit."""
    problems: list[str] = []
    generated = {g["name"]: g for g in kustomization.get("configMapGenerator", [])}
    unhashed = kustomization.get("generatorOptions", {}).get("disableNameSuffixHash", False)
    container = _container(deployment)
    for source in container.get("envFrom", []):
        name = source.get("configMapRef", {}).get("name")
        if name is None:
            continue
        if name not in generated:
            problems.append(
                f"the ConfigMap {name!r} is not from a configMapGenerator: without its hash suffix a change "
                "restarts no pod, and pods the HPA adds later run the new settings beside the old"
            )
        elif unhashed or generated[name].get("options", {}).get("disableNameSuffixHash", False):
            problems.append(f"the ConfigMap {name!r} is generated without its hash suffix (disableNameSuffixHash)")
    settings = Settings.load(environ=_container_env(deployment, _configmaps(docs)))
    if not settings.model.startswith(("/", ".", "~")) and not COMMIT.fullmatch(settings.revision):
        problems.append(
            f"EMBED_REVISION is {settings.revision!r}, not a 40-hex commit of {settings.model}: pods started at "
            "different times could load different revisions of the model"
        )
    return problems


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
    if settings.cpu_threads == 0:
        problems.append(
            "gateway leaves EMBED_CPU_THREADS at 0 (every core): `--scale gateway=3` on one host runs three "
            "times the threads there are cores"
        )
    for name, service in services.items():
        if "image" in service and not VERSION_TAG.fullmatch(_image_parts(service["image"])[1]):
            problems.append(f"{name}'s image {service['image']} is not pinned to a version")
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
    problems += nginx_retry_problems(code)
    return problems


# What nginx may retry on another replica. nginx counts every proxy_next_upstream condition it meets
# towards the server's max_fails: with http_503 there, one replica's backpressure (503 + Retry-After)
# takes it out of the pool, the others get its load, answer 503 too, and nginx ends up with no live
# upstream, answering 502 without Retry-After. Only a replica that cannot be reached counts.
RETRY_CONDITIONS = {"error", "timeout", "non_idempotent"}


def nginx_retry_problems(code: str) -> list[str]:
    problems: list[str] = []
    retries = re.findall(r"^\s*proxy_next_upstream\s+([^;]*);", code, flags=re.MULTILINE)
    if not retries:
        problems.append("no proxy_next_upstream: nginx's default retries only connection errors, not POSTs")
    for retry in retries:
        conditions = set(retry.split())
        if extra := sorted(conditions - RETRY_CONDITIONS):
            problems.append(
                f"proxy_next_upstream retries {extra}: nginx counts them towards max_fails, so a replica's "
                "backpressure (503 + Retry-After) marks it failed instead of reaching the client"
            )
        if not {"error", "timeout", "non_idempotent"} <= conditions:
            problems.append("proxy_next_upstream must retry connection errors and timeouts, POSTs included")
    if re.search(r"\bproxy_intercept_errors\s+on\s*;", code):
        problems.append("proxy_intercept_errors on: nginx would replace the gateway's 503 and its Retry-After")
    # nginx's own 502 (no replica reachable) goes out as 503 with Retry-After, as the gateway's would.
    fallback = re.search(r"^\s*error_page\s+[^;]*\b502\b[^;]*=503\s+(@\w+);", code, flags=re.MULTILINE)
    if fallback is None:
        problems.append("nginx's own 502 (no replica reachable) is not turned into 503 + Retry-After")
    elif not re.search(rf"location\s+{fallback[1]}\s*\{{[^}}]*?add_header\s+Retry-After\s+\d+\s+always;", code):
        problems.append(f"the location {fallback[1]} does not add `Retry-After` (with `always`, as 503 needs)")
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
    expected = {"deployment", "service", "pdb", "hpa", "keda", "redis", "kustomization"}
    assert {f"{name}.yaml" for name in expected} <= {path.name for path in paths}
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
    assert kustomization_problems(_kustomization()) == []


def test_redis_url_names_the_redis_service(docs: dict[tuple[str, str], Doc]) -> None:
    assert redis_problems(_one(docs, "Deployment"), _configmaps(docs), docs) == []


def test_config_change_rolls_the_pods_and_the_model_revision_is_pinned(docs: dict[tuple[str, str], Doc]) -> None:
    assert rollout_problems(_kustomization(), _one(docs, "Deployment"), docs) == []
    generated = _one(docs, "ConfigMap")["metadata"].get("annotations", {})
    assert generated == {"generated-by": "configMapGenerator"}, "the gateway's ConfigMap is a plain manifest"


def test_every_image_is_a_pinned_version(docs: dict[tuple[str, str], Doc]) -> None:
    assert image_problems(_kustomization(), docs) == []


def test_redis_asks_for_the_password_the_gateway_sends(docs: dict[tuple[str, str], Doc]) -> None:
    deployment = _one(docs, "Deployment")
    assert redis_auth_problems(deployment, docs) == []
    url = Settings.load(environ=_container_env(deployment, _configmaps(docs))).redis_url
    assert url == f"redis://:{SECRET_STAND_IN}@redis:6379/0"


def test_only_the_gateway_reaches_redis(docs: dict[tuple[str, str], Doc]) -> None:
    assert network_policy_problems(_one(docs, "Deployment"), docs) == []


def test_redis_memory_leaves_headroom_below_its_limit(docs: dict[tuple[str, str], Doc]) -> None:
    assert redis_memory_problems(docs) == []


def test_no_secret_value_is_in_git() -> None:
    """Redis' password comes from an env file the operator writes; git ignores it and holds no Secret."""
    generators = _kustomization().get("secretGenerator", [])
    files = [name for generator in generators for name in [*generator.get("envs", []), *generator.get("files", [])]]
    assert files and not any(generator.get("literals") for generator in generators)
    ignored = (K8S / ".gitignore").read_text().split()
    assert all(name in ignored for name in files), f"{files} are not all in deploy/kubernetes/.gitignore"
    assert not [key for key in _k8s_docs() if key[0] == "Secret" and key[1] not in {g["name"] for g in generators}]


def _render(tmp_path: Path, components: tuple[str, ...] = ()) -> dict[tuple[str, str], Doc]:
    """`kubectl kustomize` of a copy of deploy/kubernetes with a throwaway Redis password file (and
    the opt-in ``components`` switched on, as an operator would)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (.ci/run renders the manifests where it is)")
    copy_dir = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy_dir)
    for generator in _kustomization().get("secretGenerator", []):
        for name in generator.get("envs", []):
            (copy_dir / name).write_text(f"password={SECRET_STAND_IN}\n")
    if components:
        with (copy_dir / "kustomization.yaml").open("a") as kustomization:
            kustomization.write("components:\n" + "".join(f"  - {name}\n" for name in components))
    rendered = subprocess.run([kubectl, "kustomize", str(copy_dir)], capture_output=True, text=True, check=False)
    assert rendered.returncode == 0, rendered.stderr
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(rendered.stdout) if doc}


def test_kustomize_renders_hashed_names_and_pinned_images(tmp_path: Path) -> None:
    rendered = _render(tmp_path)
    (gateway,) = [doc for (kind, name), doc in rendered.items() if (kind, name) == ("Deployment", "embedding-gateway")]
    (config,) = [name for kind, name in rendered if kind == "ConfigMap" and name.startswith("embedding-gateway-")]
    (secret,) = [name for kind, name in rendered if kind == "Secret"]
    assert re.fullmatch(r"embedding-gateway-[a-z0-9]{10}", config) and re.fullmatch(r"[a-z-]+-[a-z0-9]{10}", secret)
    container = _container(gateway)
    assert {"configMapRef": {"name": config}} in container["envFrom"]
    assert {ref[0] for ref in _secret_refs(container).values()} == {secret}
    assert {ref[0] for ref in _secret_refs(_redis_container(rendered)).values()} == {secret}
    assert VERSION_TAG.fullmatch(_image_parts(container["image"])[1]), container["image"]
    assert image_problems({}, rendered) == []
    assert [key for key in rendered if key[0] == "NetworkPolicy"]


def test_the_int8_component_builds_once_and_pods_read_the_cache_read_only(tmp_path: Path) -> None:
    assert "components" not in _kustomization(), "int8 is opt-in: the default deployment serves float"
    rendered = _render(tmp_path, components=("int8",))
    (gateway,) = [doc for (kind, name), doc in rendered.items() if (kind, name) == ("Deployment", "embedding-gateway")]
    (job,) = [doc for (kind, _), doc in rendered.items() if kind == "Job"]
    assert [key for key in rendered if key[0] == "PersistentVolumeClaim"]
    env = {item["name"]: item.get("value") for item in _container(gateway)["env"]}
    assert env["EMBED_QUANTIZE"] == "int8" and env["EMBED_ONNX_CACHE_DIR"] == "/onnx"
    mounts = {mount["mountPath"]: mount for mount in _container(gateway)["volumeMounts"]}
    assert mounts["/onnx"].get("readOnly") is True, "pods never write the cache: it is built once by the Job"
    (builder,) = job["spec"]["template"]["spec"]["containers"]
    command = " ".join(builder.get("command", []) + builder.get("args", []))
    assert "int8 build" in command
    job_mounts = {mount["mountPath"]: mount for mount in builder["volumeMounts"]}
    assert not job_mounts["/onnx"].get("readOnly")


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

    for url in ("redis://:$(REDIS_PASSWORD)@cache:6379/0", "redis://:$(REDIS_PASSWORD)@redis:6380/0"):
        moved = copy.deepcopy(deployment)
        _env_item(moved, "EMBED_REDIS_URL")["value"] = url
        assert redis_problems(moved, _configmaps(docs), docs)


def _env_item(deployment: Doc, name: str, container: str = "gateway") -> Doc:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == container]
    (item,) = [item for item in found.get("env", []) if item["name"] == name]
    return item


DocsMutation = Callable[[dict[tuple[str, str], Doc]], object]


def _gateway(docs: dict[tuple[str, str], Doc]) -> Doc:
    return _container(docs[("Deployment", "embedding-gateway")])


def _policy_rule(docs: dict[tuple[str, str], Doc]) -> Doc:
    (policy,) = [doc for (kind, _), doc in docs.items() if kind == "NetworkPolicy"]
    return policy["spec"]["ingress"][0]


def _drop_env(container: Doc, name: str) -> None:
    container["env"] = [item for item in container["env"] if item["name"] != name]


def _swap_args(container: Doc, flag: str, value: str) -> None:
    container["args"][container["args"].index(flag) + 1] = value


REDIS_MUTATIONS: dict[str, tuple[str, DocsMutation]] = {
    # what the review found (issue 27, item 10), and its neighbours
    "no requirepass": (
        "auth",
        lambda d: _redis_container(d).update(
            args=["redis-server", "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"]
        ),
    ),
    "a literal password": ("auth", lambda d: _swap_args(_redis_container(d), "--requirepass", "hunter2")),
    "password from an undefined variable": (
        "auth",
        lambda d: _swap_args(_redis_container(d), "--requirepass", "$(REDIS_PASS)"),
    ),
    "gateway without the password": (
        "auth",
        lambda d: _env_item(d[("Deployment", "embedding-gateway")], "EMBED_REDIS_URL").update(
            value="redis://redis:6379/0"
        ),
    ),
    "gateway password from another Secret": (
        "auth",
        lambda d: _env_item(d[("Deployment", "embedding-gateway")], "REDIS_PASSWORD")["valueFrom"][
            "secretKeyRef"
        ].update(name="other"),
    ),
    "gateway password defined after the URL": (
        "auth",
        lambda d: _gateway(d)["env"].sort(key=lambda item: item["name"] != "EMBED_REDIS_URL"),
    ),
    "probe without REDISCLI_AUTH": ("auth", lambda d: _drop_env(_redis_container(d), "REDISCLI_AUTH")),
    "Secret neither generated nor shipped": ("auth", lambda d: d.pop(next(k for k in d if k[0] == "Secret"))),
    "no NetworkPolicy": ("policy", lambda d: d.pop(next(k for k in d if k[0] == "NetworkPolicy"))),
    "policy open to every pod": ("policy", lambda d: _policy_rule(d).pop("from")),
    "policy open to every namespace": ("policy", lambda d: _policy_rule(d)["from"].append({"namespaceSelector": {}})),
    "policy selects another app": (
        "policy",
        lambda d: _policy_rule(d)["from"][0]["podSelector"].update(matchLabels={"app.kubernetes.io/name": "worker"}),
    ),
    "policy admits Redis' own pods": (
        "policy",
        lambda d: _policy_rule(d)["from"][0]["podSelector"].update(
            matchLabels={"app.kubernetes.io/component": "cache"}
        ),
    ),
    "policy on every port": ("policy", lambda d: _policy_rule(d).pop("ports")),
    "policy on another port": ("policy", lambda d: _policy_rule(d)["ports"][0].update(port=8001)),
    "maxmemory 2gb under 2560Mi": (
        "memory",
        lambda d: (
            _swap_args(_redis_container(d), "--maxmemory", "2gb"),
            _redis_container(d)["resources"]["limits"].update(memory="2560Mi"),
        ),
    ),
    "maxmemory equal to the limit": (
        "memory",
        lambda d: _swap_args(
            _redis_container(d), "--maxmemory", str(_k8s_bytes(_redis_container(d)["resources"]["limits"]["memory"]))
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(REDIS_MUTATIONS))
def test_redis_checks_catch(name: str, docs: dict[tuple[str, str], Doc]) -> None:
    check, mutation = REDIS_MUTATIONS[name]
    broken = copy.deepcopy(docs)
    mutation(broken)
    deployment = broken[("Deployment", "embedding-gateway")]
    problems = {
        "auth": lambda: redis_auth_problems(deployment, broken),
        "policy": lambda: network_policy_problems(deployment, broken),
        "memory": lambda: redis_memory_problems(broken),
    }[check]()
    assert problems


ROLLOUT_MUTATIONS: dict[str, Callable[[Doc, dict[tuple[str, str], Doc]], object]] = {
    # what the review found (issue 27, item 9), and its neighbours
    "image latest": lambda k, d: k["images"][0].update(newTag="latest"),
    "no images entry, image latest": lambda k, d: (
        k.pop("images"),
        _gateway(d).update(image="embedding-gateway:latest"),
    ),
    "no images entry, no tag": lambda k, d: (k.pop("images"), _gateway(d).update(image="embedding-gateway")),
    "floating redis tag": lambda k, d: _redis_container(d).update(image="redis:7-alpine"),
    "plain ConfigMap": lambda k, d: k.pop("configMapGenerator"),
    "no hash suffix": lambda k, d: k.update(generatorOptions={"disableNameSuffixHash": True}),
    "no hash suffix for the one": lambda k, d: k["configMapGenerator"][0].update(
        options={"disableNameSuffixHash": True}
    ),
    "unpinned revision": lambda k, d: d[("ConfigMap", "embedding-gateway")]["data"].pop("EMBED_REVISION"),
    "a branch for a revision": lambda k, d: d[("ConfigMap", "embedding-gateway")]["data"].update(EMBED_REVISION="main"),
    "a short commit": lambda k, d: d[("ConfigMap", "embedding-gateway")]["data"].update(EMBED_REVISION="5617a9f"),
}


@pytest.mark.parametrize("name", sorted(ROLLOUT_MUTATIONS))
def test_rollout_checks_catch(name: str, docs: dict[tuple[str, str], Doc]) -> None:
    kustomization, broken = _kustomization(), copy.deepcopy(docs)
    ROLLOUT_MUTATIONS[name](kustomization, broken)
    deployment = broken[("Deployment", "embedding-gateway")]
    assert rollout_problems(kustomization, deployment, broken) + image_problems(kustomization, broken)


def test_a_local_model_folder_needs_no_revision(docs: dict[tuple[str, str], Doc]) -> None:
    local = copy.deepcopy(docs)
    local[("ConfigMap", "embedding-gateway")]["data"].update(EMBED_MODEL="/models/bge-m3", EMBED_REVISION="")
    assert rollout_problems(_kustomization(), local[("Deployment", "embedding-gateway")], local) == []


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
    # issue 27, item 11: threads for every core in every replica
    "no EMBED_CPU_THREADS": lambda c: c["services"]["gateway"]["environment"].pop("EMBED_CPU_THREADS"),
    "EMBED_CPU_THREADS 0": lambda c: c["services"]["gateway"]["environment"].update(EMBED_CPU_THREADS="0"),
    "floating redis tag": lambda c: c["services"]["redis"].update(image="redis:7-alpine"),
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
    # issue 27, item 8: backpressure must reach the client, not take the replica out
    "retry on 503": (
        "proxy_next_upstream error timeout non_idempotent;",
        "proxy_next_upstream error timeout http_503 non_idempotent;",
    ),
    "retry on 5xx": (
        "proxy_next_upstream error timeout non_idempotent;",
        "proxy_next_upstream error timeout http_500 http_502 non_idempotent;",
    ),
    "retry on 429": (
        "proxy_next_upstream error timeout non_idempotent;",
        "proxy_next_upstream error timeout http_429 non_idempotent;",
    ),
    "no retry on connection errors": (
        "proxy_next_upstream error timeout non_idempotent;",
        "proxy_next_upstream timeout non_idempotent;",
    ),
    "no retry of POSTs": ("proxy_next_upstream error timeout non_idempotent;", "proxy_next_upstream error timeout;"),
    "no retry at all": ("proxy_next_upstream error timeout non_idempotent;", ""),
    "intercepted errors": ("proxy_pass http://gateway;", "proxy_pass http://gateway; proxy_intercept_errors on;"),
    "nginx's 502 as is": ("error_page 502 =503 @no_replica;", ""),
    "no Retry-After on nginx's 503": ("add_header Retry-After 1 always;", ""),
    "Retry-After only on 2xx": ("add_header Retry-After 1 always;", "add_header Retry-After 1;"),
}


@pytest.mark.parametrize("name", sorted(NGINX_MUTATIONS))
def test_nginx_check_catches(name: str) -> None:
    old, new = NGINX_MUTATIONS[name]
    conf = NGINX.read_text()
    assert old in conf
    assert nginx_problems(conf.replace(old, new), _compose())
