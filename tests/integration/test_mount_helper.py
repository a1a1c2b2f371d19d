"""`ramstage mount` / `ramstage unmount`: the unit's helpers that own the tmpfs from PID 1's
mount namespace, so that a daemon in a sandbox of its own only adopts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import wait_for, write_random

from ramstage.system import System

pytestmark = pytest.mark.root


def store_mount(daemon):  # type: ignore[no-untyped-def]
    return next((m for m in System().mounts() if m.mountpoint == daemon.store), None)


def test_a_sandboxed_daemon_adopts_the_mount_and_unmount_removes_it_after_a_clean_stop(
    tmp_path, make_daemon
):
    source = write_random(tmp_path / "src" / "m.ckpt", 2 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=True)
    assert "tmpfs" in daemon.cli("mount", check=True).stdout
    entry = store_mount(daemon)
    assert entry is not None and entry.fstype == "tmpfs" and entry.source == "ramstage"

    # A private mount namespace, as systemd gives a unit with ProtectSystem= or PrivateTmp=.
    process = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            sys.executable,
            "-m",
            "ramstage",
            "daemon",
            "--config",
            str(daemon.config_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: daemon.cli("status").returncode == 0)
        target = daemon.wait_state("m", "staged")["target"]
        assert os.path.exists(target)  # the daemon's staged copy is visible out here
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert os.path.realpath(daemon.links / "m") == target  # kept for the next daemon
    assert store_mount(daemon) is not None

    assert "unmounted" in daemon.cli("unmount", check=True).stdout
    assert os.path.realpath(daemon.links / "m") == str(source)
    assert store_mount(daemon) is None


@pytest.mark.parametrize("result", ["signal", "watchdog", "exit-code"])
def test_the_stop_path_keeps_the_store_after_a_crash_and_a_restart_adopts_it(
    tmp_path, make_daemon, result
):
    source = write_random(tmp_path / "src" / "m.ckpt", 2 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=True).start()
    daemon.wait_state("m", "staged")
    daemon.stop(signal.SIGKILL)
    target = os.path.realpath(daemon.links / "m")
    assert target.startswith(str(daemon.store))

    # As systemd runs ExecStopPost after a crash: $SERVICE_RESULT says how the daemon ended.
    kept = unmount_as_stop_post(daemon, result)
    assert kept.returncode == 0, kept.stderr
    assert f"kept, the daemon ended with {result}" in kept.stdout
    assert os.path.exists(target)

    inode = os.stat(target).st_ino
    daemon.start(wait=False)
    wait_for(lambda: daemon.cli("status").returncode == 0)
    daemon.wait_state("m", "staged")
    assert os.stat(os.path.realpath(daemon.links / "m")).st_ino == inode
    assert daemon.stop() == 0
    assert store_mount(daemon) is not None  # a stop keeps it for the next start

    freed = unmount_as_stop_post(daemon, "success")  # no systemd job here: a plain stop
    assert "unmounted" in freed.stdout, freed.stderr
    assert store_mount(daemon) is None
    assert os.readlink(daemon.links / "m") == str(source)


def unmount_as_stop_post(daemon, result):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "ramstage", "unmount", "--config", str(daemon.config_path)]
        + ["--unless-restarting", "ramstage-test-nonexistent.service"],
        env={**os.environ, "SERVICE_RESULT": result},
        capture_output=True,
        text=True,
        check=False,
    )
