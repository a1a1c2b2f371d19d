"""Memory pressure on a running daemon: evictions in policy order, readers keep what they hold,
models come back when memory is calm, an operator's evict wins."""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import wait_for, write_random

from ramstage.system import System

M = 1 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def target(daemon, name: str) -> str:
    return os.readlink(daemon.links / name)


def inject(fifo: Path) -> None:
    # The daemon holds the FIFO open, so opening it to write does not block.
    with open(fifo, "wb") as f:
        f.write(b"pressure\n")


def test_fifo_event_evicts_the_lowest_priority_and_its_reader_keeps_correct_bytes(
    tmp_path, make_daemon
):
    low = write_random(tmp_path / "src" / "low.ckpt", 8 * M, seed=1)
    high = write_random(tmp_path / "src" / "high.ckpt", 4 * M, seed=2)
    fifo = tmp_path / "pressure.fifo"
    os.mkfifo(fifo)
    daemon = make_daemon(
        [
            {"name": "low", "source": str(low), "priority": 0},
            {"name": "high", "source": str(high), "priority": 10},
        ],
        # Only the FIFO should speak here: a system-wide trigger only full stalls could fire,
        # so the eviction counts below are not disturbed by other load on a shared machine.
        memory={"cooldown": "1s", "psi": "full 1900ms 2s"},
    ).start(env={"MEMORY_PRESSURE_WATCH": str(fifo)})
    daemon.wait_state("low", "staged")
    daemon.wait_state("high", "staged")
    expected = sha256(low.read_bytes())

    with open(daemon.links / "low", "rb") as reader:
        mapped = mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ)
        inject(fifo)
        evicted = daemon.wait_state("low", "fallback", timeout=10)
        assert evicted["reason"] == "pressure"
        assert target(daemon, "low") == str(low)
        # MemAvailable is far above the floor: one event costs one model, not all.
        assert daemon.model("high")["state"] == "staged"
        status = daemon.status()
        low_status = next(m for m in status["models"] if m["name"] == "low")
        assert low_status["pinned_bytes"] == 8 * M
        assert os.getpid() in low_status["users"]
        assert status["memory"]["pinned_bytes"] >= 8 * M
        # The cooldown may be over already; either way `pressure` agrees with the readings.
        memory = status["memory"]
        assert memory["seconds_since_pressure"] is not None
        assert memory["pressure"] is (
            memory["seconds_since_pressure"] < memory["cooldown_seconds"]
            or memory["available_bytes"] < memory["min_available_bytes"]
        )
        assert sha256(mapped[:]) == expected
        reader.seek(0)
        assert sha256(reader.read()) == expected
        mapped.close()

    assert "evicted for memory pressure (systemd)" in daemon.log()
    assert "freed 0 B, 8.0 MiB pinned by readers" in daemon.log()
    # Calm again (no event for the cooldown, MemAvailable above resume): staged again.
    staged = daemon.wait_state("low", "staged", timeout=30)
    assert staged["pressure_evictions"] == 1
    assert staged["backoff_seconds"] == 1.0
    assert staged["target"].startswith(str(daemon.store))
    wait_for(lambda: daemon.model("low")["pinned_bytes"] == 0, timeout=30)

    # Evicted again soon after: the wait before it comes back doubles.
    inject(fifo)
    again = daemon.wait_state("low", "fallback", timeout=10)
    assert again["pressure_evictions"] == 2
    assert again["backoff_seconds"] == 2.0
    daemon.wait_state("low", "staged", timeout=30)
    assert daemon.model("high")["state"] == "staged"


def test_operator_evict_wins_over_coming_back(tmp_path, make_daemon):
    low = write_random(tmp_path / "src" / "low.ckpt", 2 * M, seed=3)
    fifo = tmp_path / "pressure.fifo"
    os.mkfifo(fifo)
    daemon = make_daemon([{"name": "low", "source": str(low)}], memory={"cooldown": "500ms"}).start(
        env={"MEMORY_PRESSURE_WATCH": str(fifo)}
    )
    daemon.wait_state("low", "staged")
    inject(fifo)
    daemon.wait_state("low", "fallback", timeout=10)
    daemon.cli("evict", "low", check=True)
    assert daemon.model("low")["reason"] == "evicted"
    # Long past the cooldown and its backoff, it stays where the operator put it.
    time.sleep(3)
    model = daemon.model("low")
    assert (model["state"], model["reason"]) == ("fallback", "evicted")
    daemon.cli("stage", "low", check=True)
    assert daemon.model("low")["state"] == "staged"


# Allocates (and touches) at least `total`, saying when MemAvailable first reads under the
# floor; past `total` only until then (others on the machine may have freed memory meanwhile),
# up to `limit`. Not simply "until under the floor": what an eviction frees would feed it.
HOG = textwrap.dedent(
    """
    import sys
    floor, total, limit = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    chunk = 32 << 20
    def available():
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    held, crossed = [], False
    while len(held) * chunk < (limit if not crossed else total):
        block = bytearray(chunk)
        block[::4096] = b"\\1" * (chunk // 4096)  # touch every page, or nothing is allocated
        held.append(block)
        if not crossed and available() < floor:
            crossed = True
            print("crossed", flush=True)
    print("holding" if crossed else "never crossed", flush=True)
    sys.stdin.readline()
    """
)


def _oom_kills() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


@pytest.mark.root
def test_a_memory_hog_crossing_the_floor_gets_the_lowest_priority_copy_back_then_it_returns(
    tmp_path, make_daemon
):
    low = write_random(tmp_path / "src" / "low.ckpt", 1024 * M, seed=4)
    high = write_random(tmp_path / "src" / "high.ckpt", 128 * M, seed=5)
    daemon = make_daemon(
        [
            {"name": "low", "source": str(low), "priority": 0},
            {"name": "high", "source": str(high), "priority": 10},
        ],
        mount=True,
        memory={"cooldown": "1s"},
    ).start()
    daemon.wait_state("low", "staged", timeout=60)
    daemon.wait_state("high", "staged", timeout=60)
    # The machine is shared (other tests churn hundreds of MiB of tmpfs): the floor is set
    # from the reading now, with margins wider than that noise.
    available = System().available_bytes()
    floor = available - 1536 * M
    resume = available - 256 * M  # above floor + the copy: hysteresis, or it would flap
    daemon.config["memory"].update(min_available=str(floor), resume_available=str(resume))
    daemon.write_config()
    daemon.cli("reload", check=True)
    used_before = daemon.status()["store"]["used_bytes"]
    oom_kills = _oom_kills()

    hog = subprocess.Popen(
        [sys.executable, "-c", HOG, str(floor), str(1792 * M), str(3 << 30)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hog.stdout is not None and hog.stdout.readline() == "crossed\n"
        # The bar: within 2 s the link is on the source and the store has shrunk.
        wait_for(lambda: target(daemon, "low") == str(low), timeout=2.0, interval=0.02)
        wait_for(
            lambda: daemon.status()["store"]["used_bytes"] <= used_before - 1000 * M,
            timeout=2.0,
            interval=0.02,
        )
        # status follows once the loop is done with the event (its snapshot), within the bar.
        model = wait_for(lambda: (m := daemon.model("low"))["state"] != "staged" and m, timeout=2.0)
        assert (model["state"], model["reason"]) == ("fallback", "pressure")
        evictions = [line for line in daemon.log().splitlines() if "evicted for memory" in line]
        assert "low: evicted for memory pressure (floor)" in evictions[0]
        assert hog.stdout.readline() == "holding\n"
    finally:
        assert hog.stdin is not None
        hog.stdin.close()
        hog.wait(30)
    assert hog.returncode == 0  # exited on its own, not killed
    daemon.wait_state("low", "staged", timeout=60)
    assert daemon.process is not None and daemon.process.poll() is None
    assert _oom_kills() == oom_kills


def test_an_update_refused_for_pressure_is_staged_once_memory_is_calm(tmp_path, make_daemon):
    """An update that arrives within a pressure event's cooldown is refused while the older
    version stays in RAM; it used to wait for the next rescan (5 minutes), not for calm."""
    model = write_random(tmp_path / "src" / "m.ckpt", 64 << 10, seed=1)
    low = write_random(tmp_path / "src" / "low.ckpt", 64 << 10, seed=2)
    fifo = tmp_path / "pressure.fifo"
    os.mkfifo(fifo)
    daemon = make_daemon(
        [
            {"name": "m", "source": str(model), "priority": 10},
            {"name": "low", "source": str(low), "priority": 0},  # the one pressure takes
        ],
        memory={"cooldown": "3s", "psi": "full 1900ms 2s"},
    ).start(env={"MEMORY_PRESSURE_WATCH": str(fifo)})
    daemon.wait_state("m", "staged")
    daemon.wait_state("low", "staged")
    inject(fifo)
    daemon.wait_state("low", "fallback", timeout=10)
    write_random(model.with_name("m.new"), 64 << 10, seed=3).rename(model)
    wait_for(lambda: "m: not staged (pressure)" in daemon.log(), timeout=10, context=daemon.log)
    assert daemon.model("m")["state"] == "staged"
    new = f"sha256:{sha256(model.read_bytes())}"
    wait_for(lambda: daemon.model("m")["digest"] == new, timeout=30, context=daemon.log)
