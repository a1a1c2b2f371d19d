"""Admission: a copy is made only if it fits the store and keeps MemAvailable above the floor;
one that does not leaves the link where it was."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import wait_for, write_random

from ramstage.converters import parse_size
from ramstage.system import System

M = 1 << 20


@pytest.mark.root
def test_a_model_larger_than_the_store_falls_back_as_too_large(tmp_path, make_daemon):
    fits = write_random(tmp_path / "fits.ckpt", 10 * M, seed=1)
    too_big = write_random(tmp_path / "big.ckpt", 24 * M, seed=2)
    daemon = make_daemon(
        [
            {"name": "fits", "source": str(fits), "priority": 1},
            {"name": "big", "source": str(too_big)},
        ],
        mount=True,
        store={"size": "16M"},
    ).start()
    daemon.wait_state("fits", "staged")
    big = daemon.wait_state("big", "fallback")
    assert big["reason"] == "too_large"
    figures = big["reason_figures"]
    assert figures["need_bytes"] == too_big.stat().st_size
    assert 0 < figures["store_free_bytes"] < figures["need_bytes"]
    assert os.readlink(daemon.links / "big") == str(too_big)
    assert not list(daemon.store.glob("big/*"))
    # The journal's line and the table both speak in human units.
    assert re.search(
        r"big: not staged \(too_large\): needs \S+ MiB, store has \S+ \w+ free", daemon.log()
    )
    status = daemon.status()
    assert status["store"]["mounted"] is True
    mount = next(m for m in System().mounts() if m.mountpoint == daemon.store)
    assert status["store"]["swappable"] is ("noswap" not in mount.options)
    assert isinstance(status["memory"]["psi_avg10"], float)
    table = daemon.cli("status", check=True).stdout
    assert re.search(r"too_large: needs \S+ MiB, store has \S+ \w+ free", table)
    assert "PSI some " in table and "avg10" in table
    assert ("can swap" if status["store"]["swappable"] else "never swapped") in table
    result = daemon.cli("stage", "big")
    assert result.returncode == 1 and "big: not staged (too_large: needs" in result.stderr


@pytest.mark.parametrize("floor", ["100%", "far above"])
def test_a_copy_that_would_take_memavailable_under_the_floor_is_not_made(
    tmp_path, make_daemon, floor
):
    source = write_random(tmp_path / "src" / "m.ckpt", 1 * M)
    if floor == "far above":
        floor = str(System().available_bytes() + (64 << 30))  # more than this machine has
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}],
        memory={"min_available": floor, "resume_available": floor},
    ).start()
    model = daemon.wait_state("m", "fallback")
    assert model["reason"] == "pressure"
    assert os.readlink(daemon.links / "m") == str(source)
    assert not list(daemon.store.glob("m/*"))
    memory = daemon.status()["memory"]
    assert memory["pressure"] is True
    total = System().meminfo_bytes("MemTotal")
    assert memory["min_available_bytes"] == parse_size(floor, total_bytes=total)
    assert memory["available_bytes"] < memory["min_available_bytes"]
    assert "not staged (pressure)" in daemon.log()
    assert "UNDER PRESSURE" in daemon.cli("status", check=True).stdout
    result = daemon.cli("stage", "m")
    assert result.returncode == 1
    assert "pressure" in result.stderr


@pytest.mark.root
def test_an_update_that_cannot_fit_beside_the_current_copy_keeps_it(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 6 << 20, seed=1)
    content = source.read_bytes()
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}], mount=True, store={"size": "16M"}
    ).start()
    daemon.wait_state("m", "staged")
    bigger = tmp_path / ".next"
    write_random(bigger, 12 << 20, seed=2)
    bigger.replace(source)
    model = wait_for(
        lambda: (m := daemon.model("m"))["reason"] == "too_large" and m, context=daemon.log
    )
    assert model["state"] == "staged"
    assert (daemon.links / "m").read_bytes() == content
    assert Path(os.path.realpath(daemon.links / "m")).is_relative_to(daemon.store)
