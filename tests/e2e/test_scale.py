"""The packaged daemon at scale, on Debian's own libraries: 500 directory models, one inotify
instance for all of them, and a forced inotify queue overflow that still converges."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import Machine

pytestmark = [pytest.mark.root, pytest.mark.e2e]

MODELS = 500
SCALE = "/srv/scale"
QUEUE_LIMIT = Path("/proc/sys/fs/inotify/max_queued_events")  # not namespaced: the host's


def statuses(machine: Machine) -> dict[str, dict[str, object]]:
    result = machine.run("ramstage", "status", "--json", check=False)
    assert result.returncode in (0, 1), result.stderr  # 1: running, a model in trouble
    return {m["name"]: m for m in json.loads(result.stdout)["models"]}


def main_pid(machine: Machine) -> str:
    return machine.run("systemctl", "show", "-P", "MainPID", "ramstage").stdout.strip()


def test_500_directory_models_are_staged_with_one_inotify_instance(machine: Machine) -> None:
    machine.run("apt-get", "update", "-qq")
    deb = next(machine.root.glob("root/ramstage_*_all.deb"))
    machine.run("apt-get", "install", "-y", "-qq", f"/root/{deb.name}")
    scale = machine.root / SCALE.lstrip("/")
    for index in range(MODELS):
        (scale / f"d{index}").mkdir(parents=True)
        (scale / f"d{index}" / "weights.bin").write_bytes(os.urandom(1024) + bytes([index % 256]))
    config = {
        "store": {"size": "256M"},
        "ready": "staged",
        "memory": {"min_available": "128M", "resume_available": "256M"},
        "watch": {"settle": "200ms"},
        "models": [{"name": f"m{i}", "source": f"{SCALE}/d{i}"} for i in range(MODELS)],
    }
    (machine.root / "etc/ramstage/ramstage.yaml").write_text(yaml.safe_dump(config))
    machine.run("systemctl", "restart", "ramstage", timeout=300)

    found = statuses(machine)
    assert len(found) == MODELS and {m["state"] for m in found.values()} == {"staged"}
    fds = machine.sh(f"ls -l /proc/{main_pid(machine)}/fd | grep -c 'anon_inode:inotify'")
    assert fds.strip() == "1"


def test_a_forced_inotify_overflow_converges(machine: Machine) -> None:
    original = QUEUE_LIMIT.read_text()
    QUEUE_LIMIT.write_text("16\n")  # for inotify instances made from now on
    try:
        machine.run("systemctl", "restart", "ramstage", timeout=300)
    finally:
        QUEUE_LIMIT.write_text(original)
    scale = machine.root / SCALE.lstrip("/")
    pid = main_pid(machine)
    # Far more events than the queue holds, made while the daemon is stopped so that none is
    # read before the queue overflows...
    machine.run("kill", "-STOP", pid)
    try:
        subprocess.run(
            ["touch", *(str(scale / "d7" / f"noise-{i}") for i in range(200))], check=True
        )
        new = scale / "d9" / ".next"
        new.write_bytes(b"the new version")  # ...then the change that matters, last
        new.rename(scale / "d9" / "weights.bin")
    finally:
        machine.run("kill", "-CONT", pid)
    machine.wait_for(
        lambda: statuses(machine)["m9"]["size_bytes"] == len(b"the new version"),
        "m9 to be staged again after the overflow",
    )
    assert "inotify queue overflow" in machine.journal()
    # m7's directory got 200 new files: it is staged again too.
    machine.wait_for(lambda: statuses(machine)["m7"]["state"] == "staged", "m7 staged again")
    assert main_pid(machine) == pid, "the daemon was restarted:\n" + machine.journal()[-4000:]
