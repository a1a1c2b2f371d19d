"""`ramstage label-node`: the facts a scheduler needs, as labels on this machine's Kubernetes Node.

`ramstage.io/<model>` is `staged` (its link serves a verified copy in RAM), `fallback` (its link
serves the source: pending, staging or fallback) or `missing` (no link). The labeler runs
beside the daemon (a second container of its pod), asks it for `status` every few seconds
and sends the Node a JSON merge patch (RFC 7386) with only what changed: a label to set, or
null to remove one of its prefix that no configured model has any more. When it stops, and
while the daemon does not answer, it removes all of them: no label promises nothing.

The `kubernetes` client is imported only by `connect()`, so that it stays an optional extra
(`ramstage[kubernetes]`); the daemon never imports this module.
"""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ramstage.errors import NotRunning, UsageError
from ramstage.protocol import request
from ramstage.service import setup_logging
from ramstage.system import System

log = logging.getLogger(__name__)
PREFIX = "ramstage.io/"
MERGE_PATCH = "application/merge-patch+json"
# A label name (the part after the prefix): 63 characters at most, alphanumerics, `-`, `_`
# and `.`, beginning and ending with an alphanumeric (k8s.io/apimachinery validation).
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
VALUES = {"staged": "staged", "missing": "missing"}  # every other state serves the source


def label_key(model: str) -> str:
    """A model name is a label name unless it is 64 characters long or ends in `.`, `-` or
    `_`; such a name is cut to 53 characters, stripped of those at its end, and given `-` and
    8 hex digits of its SHA-256, so that two names never share a key by being cut alike."""
    if LABEL_NAME.match(model):
        return PREFIX + model
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{PREFIX}{model[:53].rstrip('._-')}-{digest}"


def wanted(status: Mapping[str, Any] | None) -> dict[str, str]:
    """The labels a `status` answer calls for; none without a daemon (None)."""
    if status is None:
        return {}
    return {label_key(m["name"]): VALUES.get(m["state"], "fallback") for m in status["models"]}


def ours(labels: Mapping[str, str] | None) -> dict[str, str]:
    return {key: value for key, value in (labels or {}).items() if key.startswith(PREFIX)}


def merge_patch(current: Mapping[str, str], labels: Mapping[str, str]) -> dict[str, Any] | None:
    """The Node merge patch that turns our labels `current` into `labels`; None if nothing."""
    changes: dict[str, str | None] = {
        key: value for key, value in labels.items() if current.get(key) != value
    }
    changes.update({key: None for key in current if key not in labels})
    return {"metadata": {"labels": changes}} if changes else None


class Nodes(Protocol):
    def labels(self, node: str) -> dict[str, str]: ...

    def patch(self, node: str, body: dict[str, Any]) -> None: ...


class KubernetesNodes:
    """Nodes through the official client: GET and merge-PATCH /api/v1/nodes/NAME."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        # Every client version lets default headers override its own, while only newer ones
        # take `_content_type`: Debian 12's (22.6) would send a dict as a strategic merge
        # patch. This client sends nothing but GETs and these patches.
        api_client.set_default_header("Content-Type", MERGE_PATCH)
        self.api = client.CoreV1Api(api_client)

    def labels(self, node: str) -> dict[str, str]:
        metadata = self.api.read_node(node).metadata
        return dict(metadata.labels or {}) if metadata else {}

    def patch(self, node: str, body: dict[str, Any]) -> None:
        self.api.patch_node(node, body)


def connect() -> KubernetesNodes:
    """In a pod, its ServiceAccount; elsewhere, the kubeconfig (for trying it by hand)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return KubernetesNodes(client.ApiClient())


class Labeler:
    """Keeps one Node's `ramstage.io/` labels equal to what the daemon's status says."""

    def __init__(self, nodes: Nodes, node: str, socket: Path) -> None:
        self.nodes, self.node, self.socket = nodes, node, socket
        self.applied: dict[str, str] | None = None  # None: read them from the Node first

    def status(self) -> dict[str, Any] | None:
        try:
            return request(self.socket, "status")  # type: ignore[no-any-return]
        except NotRunning:
            return None

    def sync(self, labels: Mapping[str, str]) -> None:
        if self.applied is None:
            self.applied = ours(self.nodes.labels(self.node))
        body = merge_patch(self.applied, labels)
        if body is None:
            return
        self.applied = None  # unknown until the patch is known to have landed
        self.nodes.patch(self.node, body)
        self.applied = dict(labels)
        log.info("node %s: %s", self.node, body["metadata"]["labels"])

    def run(self, stop: threading.Event, interval_seconds: float) -> None:
        """Until `stop` is set; then removes the labels. An error (API server away, daemon
        busy) is logged and tried again at the next turn."""
        while True:
            try:
                self.sync(wanted(self.status()))
            except Exception as error:  # the API server away, the daemon busy: next turn
                log.warning("node %s: labels not updated: %s", self.node, error)
            if stop.wait(interval_seconds):
                break
        self.sync({})


def serve(node: str | None, socket: Path, interval_seconds: float, *, debug: bool) -> None:
    """`ramstage label-node`: until SIGTERM or SIGINT, then the labels are removed."""
    system = System()
    setup_logging(system, debug)
    node = node or system.environ.get("NODE_NAME")
    if not node:
        raise UsageError("name the node: --node NAME, or NODE_NAME from the downward API")
    try:
        nodes = connect()
    except ImportError:
        raise UsageError(
            "label-node needs the kubernetes client: pip install 'ramstage[kubernetes]'"
        ) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    Labeler(nodes, node, socket).run(stop, interval_seconds)
