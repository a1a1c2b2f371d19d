"""The metrics made from a status answer: Prometheus naming, one state per model, and the
shipped dashboard and alerting rules use only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ramstage.config import parse_config
from ramstage.errors import ConfigError
from ramstage.metrics import StatusCollector

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def model(name: str, state: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name, "state": state, "size_bytes": 100, "pinned_bytes": 0, "copies": 1,
        "last_copy_seconds": 0.5, "last_copy_bytes": 100, "evictions": {}, "verify_failures": 0,
        "stale_seconds": 0.0, **more,
    }  # fmt: skip


STATUS = {
    "version": "0.1.0",
    "store": {"size_bytes": 1000, "used_bytes": 100},
    "rings": {"path": "/run/ramstage/rings", "size_bytes": 400, "used_bytes": 30},
    "memory": {
        "available_bytes": 5000,
        "min_available_bytes": 1000,
        "resume_available_bytes": 2000,
        "pressure": True,
        "psi_avg10": 12.5,
        "pinned_bytes": 0,
    },  # fmt: skip
    "models": [
        model("a", "staged"),
        model("b", "fallback", evictions={"pressure": 2, "evicted": 1}, stale_seconds=3.0),
        model("c", "missing", size_bytes=None, last_copy_seconds=None, last_copy_bytes=None),
    ],
}


def exposition() -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: STATUS))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition())
        for s in family.samples
    }


def test_names_follow_the_prometheus_conventions():
    families = list(text_string_to_metric_families(exposition()))
    for family in families:
        assert family.name.startswith("ramstage_")
        assert family.documentation
        if family.type == "counter":
            assert {s.name for s in family.samples} == {family.name + "_total"}
    names = {s.name for f in families for s in f.samples}
    assert "ramstage_model_evictions_total" in names
    assert not [n for n in names if re.search(r"_(kib|mib|percent|ms)\b", n)]  # base units


def test_values_come_from_the_status():
    got = samples()

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("ramstage_model_state", model="b", state="fallback") == 1
    assert value("ramstage_model_state", model="b", state="staged") == 0
    assert value("ramstage_model_serving", model="a", where="ram") == 1
    assert value("ramstage_model_serving", model="b", where="source") == 1
    assert value("ramstage_model_serving", model="c", where="none") == 1
    assert value("ramstage_model_ram_bytes", model="a") == 100
    assert value("ramstage_model_ram_bytes", model="b") == 0  # its copy is gone
    assert value("ramstage_model_evictions_total", model="b", cause="pressure") == 2
    assert value("ramstage_model_stale_seconds", model="b") == 3
    assert value("ramstage_model_last_copy_seconds", model="c") == 0
    assert value("ramstage_memory_pressure") == 1
    assert value("ramstage_memory_psi_some_avg10_ratio") == 0.125
    assert (value("ramstage_rings_size_bytes"), value("ramstage_rings_used_bytes")) == (400, 30)


def test_no_rings_no_rings_metrics(monkeypatch):
    monkeypatch.setitem(STATUS, "rings", None)
    assert not {name for name, _ in samples() if name.startswith("ramstage_rings_")}


def test_the_dashboard_and_the_alerts_use_only_metrics_that_exist():
    exported = {name for name, _ in samples()}
    rules = yaml.safe_load((EXAMPLES / "ramstage-alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((EXAMPLES / "ramstage-dashboard.json").read_text())
    expressions += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for e in expressions for name in re.findall(r"\bramstage_\w+", e)}
    assert len(used) > 10
    assert used <= exported, used - exported


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        (9101, ("127.0.0.1", 9101)),
        (":9101", ("127.0.0.1", 9101)),
        ("127.0.0.1:9101", ("127.0.0.1", 9101)),
        ("0.0.0.0:9101", ("0.0.0.0", 9101)),  # a host only when written
        ("[::1]:9101", ("::1", 9101)),
    ],
)
def test_metrics_listen_is_loopback_unless_a_host_is_given(listen: Any, address: Any):
    assert parse_config({"metrics": {"listen": listen}}).metrics.listen == address


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({"listen": "localhost"}, "metrics.listen: expected PORT or HOST:PORT"),
        ({"listen": 0}, "metrics.listen: expected PORT or HOST:PORT"),
        ({"listen": True}, "metrics.listen: expected PORT or HOST:PORT"),
        ({"textfile": "/var/lib/node/ramstage.txt"}, "metrics.textfile: must end in .prom"),
        ({"interval": "100ms"}, "metrics.interval: expected at least 1s"),
    ],
)
def test_bad_metrics_settings_name_the_key_and_what_is_expected(metrics: Any, problem: str):
    with pytest.raises(ConfigError) as raised:
        parse_config({"metrics": metrics})
    assert raised.value.problems[0].startswith(problem)


def test_metrics_are_off_by_default():
    metrics = parse_config({}).metrics
    assert (metrics.textfile, metrics.listen, metrics.interval_seconds) == (None, None, 15.0)
