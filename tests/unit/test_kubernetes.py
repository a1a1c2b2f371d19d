"""The manifests under deploy/kubernetes: valid for Kubernetes 1.30 (offline schemas), and
right where the schemas cannot tell: propagation and privilege, commands the image has, the
memory limit against store.size, the paths the links need."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ramstage import cli
from ramstage.config import parse_config
from ramstage.nodelabels import label_key
from ramstage.schema import SCHEMA_FILE

DEPLOY = Path(__file__).parents[2] / "deploy" / "kubernetes"
CONTAINERFILE = DEPLOY / "Containerfile"
DAEMON_OVERHEAD_BYTES = 512 << 20  # the daemon besides its store: Python, copy buffers
UNITS = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
}


def manifests() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def documents() -> list[dict[str, Any]]:
    return [d for path in manifests() for d in yaml.safe_load_all(path.read_text()) if d]


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    return next(
        d for d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    )


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
            yield doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def quantity_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", text).groups()  # type: ignore[union-attr]
    return int(number) * UNITS.get(unit, 1)


def agent_config() -> Any:
    return parse_config(yaml.safe_load(find("ConfigMap")["data"]["ramstage.yaml"]))


# ---- the checks the schemas miss, each a function of the documents ---------------------------


def propagation_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Bidirectional only in privileged containers (the API server refuses it otherwise);
    HostToContainer only read-only, for consumers."""
    problems = []
    for spec in pod_specs(docs):
        for container in containers(spec):
            for mount in container.get("volumeMounts", []):
                propagation = mount.get("mountPropagation")
                privileged = container.get("securityContext", {}).get("privileged")
                if propagation == "Bidirectional" and privileged is not True:
                    problems.append(f"{container['name']}: Bidirectional without privileged")
                if propagation == "HostToContainer" and not mount.get("readOnly"):
                    problems.append(f"{container['name']}: HostToContainer mount not read-only")
    return problems


def command_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every `ramstage …` a container or probe runs parses with the CLI the image installs."""
    problems = []
    for spec in pod_specs(docs):
        for container in containers(spec):
            commands = [container.get("command", [])]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                commands.append(container.get(probe, {}).get("exec", {}).get("command", []))
            for command in commands:
                if command[:1] != ["ramstage"]:
                    continue
                try:
                    cli.build_parser().parse_args(command[1:])
                except SystemExit:
                    problems.append(f"{container['name']}: no such command: {command}")
    return problems


def memory_problems(docs: list[dict[str, Any]], store_size_bytes: int) -> list[str]:
    """The daemon's container is charged for the store's tmpfs pages: its limit covers
    store.size plus the daemon, and its request equals its limit."""
    spec = next(pod_specs([d for d in docs if d["kind"] == "DaemonSet"]))
    daemon = next(c for c in spec["containers"] if c["command"][:2] == ["ramstage", "daemon"])
    resources = daemon["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    problems = []
    if limit < store_size_bytes + DAEMON_OVERHEAD_BYTES:
        problems.append(f"memory limit {limit} < store.size {store_size_bytes} + daemon")
    if resources["requests"]["memory"] != resources["limits"]["memory"]:
        problems.append("memory request differs from the limit")
    return problems


# ---- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_valid_for_kubernetes_1_30(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] != "Kustomization":
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_the_schemas_are_checked_offline_and_do_catch_mistakes():
    assert "1.30.0" in kubernetes_validate.utils.all_versions()  # files in the package
    daemonset = copy.deepcopy(find("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["mountPropagation"] = "Bidirectional"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, "1.30.0", strict=True)


def test_the_kustomization_lists_every_manifest_of_the_agent():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert {image["name"] for image in kustomization["images"]} == {
        c["image"].split(":")[0] for c in containers(find("DaemonSet")["spec"]["template"]["spec"])
    }


def test_propagation_and_privilege():
    docs = documents()
    assert propagation_problems(docs) == []
    broken = copy.deepcopy(docs)
    for spec in pod_specs(broken):
        for container in containers(spec):
            container.pop("securityContext", None)
            for mount in container.get("volumeMounts", []):
                mount.pop("readOnly", None)
    problems = propagation_problems(broken)
    assert "ramstage: Bidirectional without privileged" in problems
    assert "server: HostToContainer mount not read-only" in problems


def test_the_commands_and_probes_exist_in_the_image_cli():
    docs = documents()
    assert command_problems(docs) == []
    broken = copy.deepcopy(docs)
    spec = next(pod_specs([d for d in broken if d["kind"] == "DaemonSet"]))
    spec["containers"][0]["readinessProbe"]["exec"]["command"] = ["ramstage", "ready"]
    assert command_problems(broken) == ["ramstage: no such command: ['ramstage', 'ready']"]


def test_the_memory_limit_covers_the_store():
    config, docs = agent_config(), documents()
    assert memory_problems(docs, config.store.size_bytes) == []
    # 16G store + 512Mi: the limit is exactly that; a larger store does not fit.
    assert memory_problems(docs, config.store.size_bytes + 1)
    text = find("ConfigMap")["data"]["ramstage.yaml"]
    assert not re.search(r"size:\s*\d+%", text), "a percentage of RAM depends on the node"


def test_the_config_is_valid_and_watched_and_its_paths_are_where_the_pods_mount_them():
    config = agent_config()
    assert config.watch.config
    spec = find("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for c in spec["containers"] for m in c["volumeMounts"]}
    assert volumes["config"]["configMap"]["name"] == find("ConfigMap")["metadata"]["name"]
    assert "subPath" not in mounts["/etc/ramstage"]  # kubelet never updates subPath files
    run = mounts["/run/ramstage"]
    assert volumes[run["name"]]["hostPath"]["path"] == "/run/ramstage"
    for path in (config.store.path, config.links_dir, config.socket):
        assert path.is_relative_to("/run/ramstage")
    for model in config.models:
        mount = next(m for p, m in mounts.items() if model.resolve().is_relative_to(p))
        assert (
            mount["readOnly"] and volumes[mount["name"]]["hostPath"]["path"] == mount["mountPath"]
        )


def test_the_consumer_mounts_the_sources_where_the_node_has_them_and_waits_on_the_label():
    config = agent_config()
    spec = find("Deployment", "lama-inference")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    server = spec["containers"][0]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    lama = config.model("lama")
    assert lama is not None
    mount = next(m for p, m in mounts.items() if lama.resolve().is_relative_to(p))
    assert volumes[mount["name"]]["hostPath"]["path"] == mount["mountPath"]
    assert mounts["/run/ramstage"]["mountPropagation"] == "HostToContainer"
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expression = terms["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert (expression["key"], expression["values"]) == (label_key("lama"), ["staged"])
    assert spec["initContainers"][0]["command"][:2] == ["ramstage", "wait"]


def test_the_containerfile_installs_the_package_and_the_kubernetes_client():
    text = CONTAINERFILE.read_text()
    assert re.search(r"^ARG BASE=debian:12", text, re.M) and "FROM ${BASE}" in text
    assert "ramstage_" in text and ".deb" in text
    assert "python3-kubernetes" in text


def test_the_configmap_fits_the_config_schema_that_editors_and_tooling_use():
    data = yaml.safe_load(find("ConfigMap")["data"]["ramstage.yaml"])
    jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
