"""Prometheus metrics, made with prometheus_client from the `status --json` answer, so the two
always agree: written atomically to a file for node_exporter's textfile collector, which works
under the unit's PrivateNetwork=yes, and, if configured, served over HTTP.

Only prometheus_client 0.16's API (Debian 12's python3-prometheus-client) is used.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler

from ramstage.config import MetricsConfig

log = logging.getLogger("ramstage")
STATES = ("pending", "staging", "staged", "fallback", "missing")
WHERE = {"staged": "ram", "missing": "none"}  # every other state serves the source


def where(state: str) -> str:
    """What the link serves: ram, source or none."""
    return WHERE.get(state, "source")


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=0.0 if value is None else value)


def _store_and_memory(status: dict[str, Any]) -> Iterator[Metric]:
    store, memory = status["store"], status["memory"]
    info = GaugeMetricFamily("ramstage_info", "The daemon's version.", labels=["version"])
    info.add_metric([status["version"]], 1.0)
    yield info
    yield _gauge("ramstage_store_size_bytes", "Size of the store's tmpfs.", store["size_bytes"])
    yield _gauge("ramstage_store_used_bytes", "Bytes used in the store.", store["used_bytes"])
    if rings := status.get("rings"):
        yield _gauge("ramstage_rings_size_bytes", "Size of the rings' tmpfs.", rings["size_bytes"])
        yield _gauge("ramstage_rings_used_bytes", "Bytes in ring files.", rings["used_bytes"])
    yield _gauge(
        "ramstage_memory_available_bytes",
        "MemAvailable, as the daemon read it.",
        memory["available_bytes"],
    )
    yield _gauge(
        "ramstage_memory_min_available_bytes",
        "The floor: below it models are evicted.",
        memory["min_available_bytes"],
    )
    yield _gauge(
        "ramstage_memory_resume_available_bytes",
        "Models are staged again only above this.",
        memory["resume_available_bytes"],
    )
    yield _gauge("ramstage_memory_pressure", "1 under memory pressure.", memory["pressure"])
    avg10 = memory["psi_avg10"]
    yield _gauge(
        "ramstage_memory_psi_some_avg10_ratio",
        "Share of the last 10 s some task stalled on memory.",
        None if avg10 is None else avg10 / 100,
    )
    yield _gauge(
        "ramstage_memory_pinned_bytes",
        "RAM held by unlinked copies that readers keep open.",
        memory["pinned_bytes"],
    )


def _models(models: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["model"]
    state = GaugeMetricFamily(
        "ramstage_model_state", "1 for the model's state.", labels=["model", "state"]
    )
    serving = GaugeMetricFamily(
        "ramstage_model_serving", "1 for what the model's link serves.", labels=["model", "where"]
    )
    gauges = {
        "ram_bytes": GaugeMetricFamily(
            "ramstage_model_ram_bytes", "Bytes of the copy served from RAM.", labels=labels
        ),
        "pinned_bytes": GaugeMetricFamily(
            "ramstage_model_pinned_bytes", "RAM held by its unlinked copies.", labels=labels
        ),
        "last_copy_seconds": GaugeMetricFamily(
            "ramstage_model_last_copy_seconds", "How long the last copy took.", labels=labels
        ),
        "last_copy_bytes": GaugeMetricFamily(
            "ramstage_model_last_copy_bytes", "Bytes of the last copy.", labels=labels
        ),
        "stale_seconds": GaugeMetricFamily(
            "ramstage_model_stale_seconds",
            "How long the newest source version has waited for its copy to be published.",
            labels=labels,
        ),
    }
    copies = CounterMetricFamily("ramstage_model_copies", "Copies published.", labels=labels)
    evictions = CounterMetricFamily(
        "ramstage_model_evictions",
        "Times the model's RAM copy was given up, by cause.",
        labels=["model", "cause"],
    )
    verify_failures = CounterMetricFamily(
        "ramstage_model_verify_failures", "Copies in RAM that no longer matched.", labels=labels
    )
    for model in models:
        name = [model["name"]]
        for value in STATES:
            state.add_metric([*name, value], float(model["state"] == value))
        for value in ("ram", "source", "none"):
            serving.add_metric([*name, value], float(where(model["state"]) == value))
        in_ram = model["size_bytes"] if model["state"] == "staged" else 0
        values = {**model, "ram_bytes": in_ram}
        for key, family in gauges.items():
            family.add_metric(name, float(values[key] or 0))
        copies.add_metric(name, model["copies"])
        for cause, count in sorted(model["evictions"].items()):
            evictions.add_metric([*name, cause], count)
        verify_failures.add_metric(name, model["verify_failures"])
    yield from (state, serving, *gauges.values(), copies, evictions, verify_failures)


class StatusCollector:
    """A prometheus_client collector that asks for a fresh status on every collection."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        yield from _store_and_memory(status)
        yield from _models(status["models"])


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)


class Metrics:
    """The textfile, written on demand, and the optional HTTP endpoint on its own thread
    (started once: a reload changes the textfile and the interval, not the endpoint)."""

    def __init__(self, config: MetricsConfig, status: Callable[[], dict[str, Any]]) -> None:
        self.config = config  # as the daemon started
        self.registry = CollectorRegistry(auto_describe=False)
        # Debian's prometheus_client (0.16) and newer releases type register() differently.
        self.registry.register(StatusCollector(status))  # type: ignore[arg-type, unused-ignore]
        self.server: _Server | None = None
        self.failed: str | None = None  # the last write's error, logged once

    def start(self) -> None:
        if self.config.listen is None:
            return
        host, port = self.config.listen
        try:
            self.server = _Server((host, port), MetricsHandler.factory(self.registry))
        except OSError as error:
            log.error("metrics: cannot listen on %s port %d: %s", host, port, error.strerror)
            return
        threading.Thread(
            target=self.server.serve_forever, name="ramstage-metrics", daemon=True
        ).start()
        log.info("metrics: serving http://%s:%d/metrics", host, port)

    def write(self, textfile: Path) -> None:
        """Replaces the textfile atomically (a temporary file beside it, then rename(2))."""
        try:
            write_to_textfile(str(textfile), self.registry)
        except OSError as error:
            failed = f"cannot write {textfile}: {error.strerror}"
            if failed != self.failed:
                log.warning("metrics: %s", failed)
            self.failed = failed
            return
        if self.failed:
            log.info("metrics: writing %s again", textfile)
        self.failed = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
