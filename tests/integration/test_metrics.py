"""Prometheus metrics of a real daemon, read back with prometheus_client's own parser from the
textfile and from the HTTP endpoint, agree with `status --json`, and count copies, evictions
and verify failures as they happen."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, wait_for, write_random
from prometheus_client.parser import text_string_to_metric_families

MiB = 1 << 20


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def textfile_samples(path: Path) -> dict[Any, float]:
    return parse(path.read_text()) if path.exists() else {}


def check_against_status(samples: dict[Any, float], status: dict[str, Any]) -> None:
    store, memory = status["store"], status["memory"]
    assert value(samples, "ramstage_store_size_bytes") == store["size_bytes"]
    assert value(samples, "ramstage_store_used_bytes") == store["used_bytes"]
    assert value(samples, "ramstage_memory_min_available_bytes") == memory["min_available_bytes"]
    assert value(samples, "ramstage_memory_pressure") == float(memory["pressure"])
    rings = status["rings"] or {"size_bytes": None, "used_bytes": None}  # no samples without
    assert samples.get(("ramstage_rings_size_bytes", ())) == rings["size_bytes"]
    assert samples.get(("ramstage_rings_used_bytes", ())) == rings["used_bytes"]
    available = value(samples, "ramstage_memory_available_bytes")
    assert abs(available - memory["available_bytes"]) < 2 << 30  # read at another moment
    for model in status["models"]:
        name = model["name"]
        assert value(samples, "ramstage_model_state", model=name, state=model["state"]) == 1
        states = [k for k in samples if k[0] == "ramstage_model_state" and ("model", name) in k[1]]
        assert sum(samples[k] for k in states) == 1
        where = {"staged": "ram", "missing": "none"}.get(model["state"], "source")
        assert value(samples, "ramstage_model_serving", model=name, where=where) == 1
        in_ram = model["size_bytes"] if model["state"] == "staged" else 0
        assert value(samples, "ramstage_model_ram_bytes", model=name) == in_ram
        assert value(samples, "ramstage_model_pinned_bytes", model=name) == model["pinned_bytes"]
        assert value(samples, "ramstage_model_copies_total", model=name) == model["copies"]
        assert value(samples, "ramstage_model_last_copy_bytes", model=name) == (
            model["last_copy_bytes"] or 0
        )
        assert value(samples, "ramstage_model_last_copy_seconds", model=name) == pytest.approx(
            model["last_copy_seconds"] or 0
        )
        for cause, count in model["evictions"].items():
            assert (
                value(samples, "ramstage_model_evictions_total", model=name, cause=cause) == count
            )
        assert (
            value(samples, "ramstage_model_verify_failures_total", model=name)
            == (model["verify_failures"])
        )


@pytest.mark.root
def test_metrics_in_the_textfile_and_over_http_agree_with_status(tmp_path, make_daemon):
    a = write_random(tmp_path / "src" / "a.ckpt", 4 * MiB, seed=1)
    b = write_random(tmp_path / "src" / "b.ckpt", 2 * MiB, seed=2)
    textfile = tmp_path / "textfile" / "ramstage.prom"
    textfile.parent.mkdir()
    port = free_port()
    daemon: Daemon = make_daemon(
        [{"name": "a", "source": str(a)}, {"name": "b", "source": str(b)}],
        mount=True,
        store={"size": "64M"},
        metrics={"textfile": str(textfile), "listen": port, "interval": "1s"},
    )
    daemon.start()
    daemon.wait_state("a", "staged")
    daemon.wait_state("b", "staged")

    # b evicted by the operator and staged again: two copies, one eviction.
    daemon.cli("evict", "b", check=True)
    daemon.cli("stage", "b", check=True)
    # a's copy in RAM no longer matches: verify finds it, and a is copied again.
    generation = Path(os.path.realpath(daemon.links / "a"))
    with open(generation, "r+b") as f:
        f.write(b"corrupt")
    assert daemon.cli("verify", "a").returncode == 1
    daemon.wait_state("a", "staged")

    def settled() -> bool:
        samples = textfile_samples(textfile)
        return bool(samples) and value(samples, "ramstage_model_copies_total", model="a") == 2

    wait_for(settled, context=daemon.log)
    status = daemon.status()
    by_name = {m["name"]: m for m in status["models"]}
    assert by_name["b"]["copies"] == 2 and by_name["b"]["evictions"] == {"evicted": 1}
    assert by_name["a"]["verify_failures"] == 1 and by_name["a"]["evictions"] == {"error": 1}
    assert by_name["a"]["last_copy_bytes"] == 4 * MiB and by_name["a"]["last_copy_seconds"] > 0
    assert by_name["a"]["stale_seconds"] == 0
    check_against_status(textfile_samples(textfile), status)
    assert textfile.stat().st_mode & 0o777 == 0o644  # node_exporter reads it
    assert not [p for p in textfile.parent.iterdir() if p != textfile]  # no temporary left

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        served = parse(response.read().decode())
    check_against_status(served, daemon.status())

    # The last write, at stop: the copy stays in RAM behind its link for the next start.
    assert daemon.stop() == 0
    samples = textfile_samples(textfile)
    assert value(samples, "ramstage_model_ram_bytes", model="a") == 4 * MiB
    assert value(samples, "ramstage_model_serving", model="a", where="ram") == 1
    # A stop is no eviction.
    evictions = [k for k in samples if k[0] == "ramstage_model_evictions_total"]
    assert sorted(dict(k[1])["cause"] for k in evictions) == ["error", "evicted"]


@pytest.mark.root
def test_a_new_version_refused_for_its_size_shows_as_stale_until_one_is_staged(
    tmp_path, make_daemon
):
    source = write_random(tmp_path / "src" / "a.ckpt", 4 * MiB, seed=1)
    textfile = tmp_path / "ramstage.prom"
    daemon: Daemon = make_daemon(
        [{"name": "a", "source": str(source)}],
        mount=True,
        store={"size": "16M"},
        watch={"settle": "100ms"},
        metrics={"textfile": str(textfile), "interval": "1s"},
    )
    daemon.start()
    daemon.wait_state("a", "staged")
    assert daemon.model("a")["stale_seconds"] == 0

    # 14 MiB beside the 4 MiB copy does not fit 16 MiB: the old version stays served.
    write_random(source, 14 * MiB, seed=2)
    wait_for(lambda: daemon.model("a")["reason"] == "too_large", context=daemon.log)
    first = daemon.model("a")
    assert first["state"] == "staged" and first["stale_seconds"] > 0
    wait_for(lambda: daemon.model("a")["stale_seconds"] > first["stale_seconds"])

    def stale() -> float:
        return value(textfile_samples(textfile), "ramstage_model_stale_seconds", model="a")

    wait_for(lambda: textfile.exists() and stale() > 0, context=daemon.log)

    # A version that fits is staged, and nothing waits any more.
    write_random(source, 2 * MiB, seed=3)
    wait_for(lambda: daemon.model("a")["copies"] == 2, context=daemon.log)
    assert daemon.model("a")["stale_seconds"] == 0
    wait_for(lambda: stale() == 0, context=daemon.log)
