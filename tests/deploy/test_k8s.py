"""deploy/k8s: the kustomize base renders (``kubectl kustomize`` where kubectl is installed,
and always by a small renderer here that must agree with it), every object validates against
the Kubernetes JSON schemas of two releases in strict mode (PyPI ``kubernetes-validate``, which
bundles them: no network), and the objects fit together: selectors, volumes, ConfigMaps and
Secret keys, service ports, the `prvng` command lines (parsed by the real CLI), the settings
in the environment and platform.ncl (built by the real settings loader, Nickel contract
included), and the NATS configuration (checked by the real ``nats-server -t``)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from provisioning.core.settings import load_settings
from tests.deploy.artifacts import DEFAULT_PORTS, DEPLOY, check_env, parse_cli, run, show, tool

BASE = DEPLOY / "k8s"
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
#: Deployment -> (replicas, persistent volume)
WORKLOADS = {
    "control-center": (1, True),
    "orchestrator": (2, False),
    "ops-keeper": (1, True),
    "ops-controller": (2, False),
    "audit-mirror": (1, True),
}

Obj = dict[str, Any]


def load(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d]


def render_here() -> list[Obj]:
    """What kustomize does with this base: resources in order, the namespace, the labels
    (not on selectors) and the image name."""
    kust = load(BASE / "kustomization.yaml")[0]
    known = {"apiVersion", "kind", "namespace", "labels", "images", "resources"}
    assert set(kust) <= known, f"this renderer does not handle {set(kust) - known}"
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kust.get("images", [])}
    labels = {k: v for entry in kust.get("labels", []) for k, v in entry["pairs"].items()}
    out = []
    for resource in kust["resources"]:
        for obj in load(BASE / resource):
            obj = copy.deepcopy(obj)
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kust["namespace"]
            obj["metadata"].setdefault("labels", {}).update(labels)
            for c in containers(obj):
                c["image"] = images.get(c["image"], c["image"])
            out.append(obj)
    return out


def containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    mine = render_here()
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return mine
    proc = run([kubectl, "kustomize", str(BASE)])
    assert proc.returncode == 0, show(proc)
    theirs = [d for d in yaml.safe_load_all(proc.stdout) if d]

    def ident(objs: list[Obj]) -> list[tuple[str, str, str, str]]:
        return sorted(
            (o["kind"], o["metadata"]["name"], o["metadata"].get("namespace", ""), img)
            for o in objs
            for img in [",".join(c["image"] for c in containers(o))]
        )

    assert ident(mine) == ident(theirs), "the renderer here and kustomize disagree"
    return theirs


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def secret_example() -> Obj:
    return load(BASE / "secret.example.yaml")[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(
    objects: list[Obj], version: str
) -> None:
    for obj in [*objects, secret_example()]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, getattr(exc, "path", [])))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}) {where}: {exc}")


def test_the_schema_check_refuses_a_misspelt_field(objects: list[Obj]) -> None:
    broken = copy.deepcopy(find(objects, "Deployment", "orchestrator"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_everything_lives_in_the_prvng_namespace(objects: list[Obj]) -> None:
    ns = find(objects, "Namespace", "prvng")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(o["metadata"].get("namespace") == "prvng" for o in objects if o is not ns)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_each_service_runs_its_command_on_its_port_hardened_and_probed(
    objects: list[Obj], name: str
) -> None:
    replicas, persistent = WORKLOADS[name]
    deploy = find(objects, "Deployment", name)
    spec = deploy["spec"]
    assert spec["replicas"] == replicas
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    [c] = pod["containers"]
    assert c["image"].startswith("registry.example.com/prvng:")
    path, params = parse_cli(c["args"])
    assert path == f"prvng serve {name}"
    assert params["host"] == "0.0.0.0"
    [port] = c["ports"]
    assert (port["name"], port["containerPort"]) == ("http", DEFAULT_PORTS[name])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {"/var/lib/prvng", "/tmp", "/var/lib/prvng/config/platform.ncl"} <= set(mounts)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
    data = volumes[mounts["/var/lib/prvng"]["name"]]
    if persistent:
        claim = data["persistentVolumeClaim"]["claimName"]
        assert find(objects, "PersistentVolumeClaim", claim)
        assert spec["strategy"]["type"] == "Recreate", "a ReadWriteOnce volume: never two pods"
    else:
        assert "emptyDir" in data
    service = find(objects, "Service", name)
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    [sport] = service["spec"]["ports"]
    assert (sport["port"], sport["targetPort"]) == (DEFAULT_PORTS[name], "http")


def test_config_and_secret_references_resolve(objects: list[Obj]) -> None:
    secret = secret_example()
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
        for c in containers(obj):
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in configmaps
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in secret["stringData"], ref
            for m in c.get("volumeMounts", []):
                if "subPath" in m:
                    [vol] = [v for v in pod["volumes"] if v["name"] == m["name"]]
                    assert m["subPath"] in configmaps[vol["configMap"]["name"]]["data"]


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_each_service_environment_and_platform_ncl_are_settings(
    objects: list[Obj], name: str, tmp_path: Path
) -> None:
    secret = secret_example()["stringData"]
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    [c] = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(configmaps[src["configMapRef"]["name"]]["data"])
    for e in c.get("env", []):
        src = e.get("valueFrom", {})
        if "secretKeyRef" in src:
            env[e["name"]] = secret[src["secretKeyRef"]["key"]]
        elif "fieldRef" in src:
            env[e["name"]] = f"{name}-7d9f-abcde"  # the pod's name
        else:
            env[e["name"]] = e["value"]
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "platform.ncl").write_text(
        configmaps["prvng-config"]["data"]["platform.ncl"], "utf-8"
    )
    settings = check_env({**env, "PRVNG_HOME": str(home)}, home, f"Deployment {name}")
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for url in (settings.control_center_url, settings.orchestrator_url, settings.ops_keeper.url):
        parts = urlsplit(url)
        svc = services[str(parts.hostname)]
        assert parts.port in [p["port"] for p in svc["spec"]["ports"]], url
    sts = find(objects, "StatefulSet", "nats")
    pods = {f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}" for i in range(3)}
    assert {urlsplit(u).hostname for u in settings.nats_servers} == pods
    if name == "orchestrator":
        assert settings.orchestrator.worker_id == "orchestrator-7d9f-abcde"
    if name != "audit-mirror":
        assert settings.state.url.startswith("postgresql://")


def test_platform_ncl_breaking_its_contract_is_refused(objects: list[Obj], tmp_path: Path) -> None:
    text = find(objects, "ConfigMap", "prvng-config")["data"]["platform.ncl"]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "platform.ncl").write_text(
        text.replace('idempotency = "state"', 'idempotency = "redis"'), "utf-8"
    )
    with pytest.raises(Exception, match="idempotency"):
        load_settings(home=tmp_path, env={})


def test_nats_is_a_three_node_jetstream_cluster_nats_server_accepts(
    objects: list[Obj], tmp_path: Path
) -> None:
    sts = find(objects, "StatefulSet", "nats")
    assert sts["spec"]["replicas"] == 3
    headless = find(objects, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    conf_text = find(objects, "ConfigMap", "nats-config")["data"]["nats.conf"]
    routes = {f"nats://nats-{i}.{headless['metadata']['name']}:6222" for i in range(3)}
    assert all(r in conf_text for r in routes)
    assert "sync_interval: always" in conf_text
    conf = tmp_path / "nats.conf"
    conf.write_text(conf_text, "utf-8")
    proc = run([tool("nats-server"), "-t", "-c", str(conf)], env={"POD_NAME": "nats-0"})
    assert proc.returncode == 0 and "is valid" in proc.stdout + proc.stderr, show(proc)
    [c] = sts["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
    assert find(objects, "PodDisruptionBudget", "nats")["spec"]["minAvailable"] == 2
