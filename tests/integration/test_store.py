"""The store as the rest of the machine sees it: a real tmpfs, adopted, refused, cleaned."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import sha256_file, write_random

from ramstage.system import System


def findmnt(path: Path) -> dict[str, Any] | None:
    result = subprocess.run(
        [
            "findmnt",
            "-J",
            "-b",
            "-o",
            "TARGET,SOURCE,FSTYPE,OPTIONS,SIZE,ID",
            "--mountpoint",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    found = json.loads(result.stdout)["filesystems"]
    assert len(found) == 1, found  # never a second mount stacked on the first
    return found[0]  # type: ignore[no-any-return]


def kernel_has_noswap() -> bool:
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return (major, minor) >= (6, 4)


def start_with_a_64m_tmpfs(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}], mount=True, store={"size": "64M"}
    ).start()
    daemon.wait_state("m", "staged")
    return daemon


@pytest.mark.root
def test_the_store_is_a_bounded_tmpfs_in_the_host_mount_namespace(tmp_path, make_daemon):
    daemon = start_with_a_64m_tmpfs(tmp_path, make_daemon)
    mount = findmnt(daemon.store)
    assert mount is not None
    assert mount["fstype"] == "tmpfs"
    assert mount["source"] == "ramstage"
    assert mount["size"] == 64 << 20
    options = set(mount["options"].split(","))
    assert {"nosuid", "nodev", "noexec", "mode=755"} <= options
    if kernel_has_noswap():
        assert "noswap" in options
        assert daemon.request("status")["store"]["swappable"] is False
    # Mounted where PID 1 (and so every service) sees it, not in a private namespace.
    mountinfo = Path("/proc/1/mountinfo").read_text().splitlines()
    assert any(line.split()[4] == str(daemon.store) and " - tmpfs " in line for line in mountinfo)
    # Huge pages (store.huge's default) on a VM whose balloon reports free pages to the host
    # are warned of at start, as this machine's own sysfs tells.
    warned = "balloon hands free memory back" in daemon.log()
    assert warned is System().reports_free_pages(), daemon.log()


@pytest.mark.root
def test_a_running_ramstage_tmpfs_is_adopted_not_remounted(tmp_path, make_daemon):
    daemon = start_with_a_64m_tmpfs(tmp_path, make_daemon)
    first = findmnt(daemon.store)
    assert first is not None
    daemon.stop(signal.SIGKILL)

    assert "huge=within_size" in first["options"].split(",")  # store.huge's default
    daemon.config["store"]["size"] = "128M"  # a new size is applied by remount, in place
    daemon.config["store"]["huge"] = "never"  # and so is store.huge
    daemon.write_config()
    daemon.start()
    daemon.wait_state("m", "staged")
    second = findmnt(daemon.store)
    assert second is not None
    assert second["id"] == first["id"]
    assert second["size"] == 128 << 20
    assert not any(option.startswith("huge=") for option in second["options"].split(","))
    assert "adopted the tmpfs already mounted" in daemon.log()


@pytest.mark.root
def test_someone_elses_mount_at_the_store_path_is_refused(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=True)
    daemon.store.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "scratch", str(daemon.store)], check=True
    )
    try:
        (daemon.store / "theirs.txt").write_text("keep me")
        daemon.start(wait=False)
        assert daemon.process is not None
        assert daemon.process.wait(30) != 0
        assert "something else is mounted there (tmpfs from scratch)" in daemon.log()
        mount = findmnt(daemon.store)
        assert mount is not None and mount["source"] == "scratch"
        assert (daemon.store / "theirs.txt").read_text() == "keep me"
        assert not (daemon.links / "m").exists()
    finally:
        subprocess.run(["umount", str(daemon.store)], check=True)


def test_a_directory_that_is_not_a_store_is_refused_and_left_alone(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=False)
    (daemon.store / "m").mkdir(parents=True)
    (daemon.store / "m" / "precious.bin").write_bytes(b"not ramstage's")
    (daemon.store / "notes.txt").write_text("mine")
    daemon.start(wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(30) != 0
    assert "is not empty and is not a ramstage store" in daemon.log()
    assert (daemon.store / "m" / "precious.bin").read_bytes() == b"not ramstage's"
    assert (daemon.store / "notes.txt").read_text() == "mine"


def test_partial_and_unknown_entries_in_the_store_are_removed_at_start(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=False)
    daemon.store.mkdir(parents=True)
    (daemon.store / ".ramstage-store").touch()
    debris = [
        daemon.store / "gone-model" / "0123456789abcdef" / "x.bin",  # a model not configured
        daemon.store / "m" / ".partial-abc" / "m.ckpt",  # a copy cut short
        daemon.store / "m" / "fedcba9876543210" / "m.ckpt",  # a generation with no manifest
        daemon.store / "m" / "0011223344556677.json",  # a manifest with no generation
    ]
    for path in debris:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"debris")
    (daemon.store / "stray.txt").write_text("x")
    daemon.start()
    model = daemon.wait_state("m", "staged")
    left = sorted(str(p.relative_to(daemon.store)) for p in daemon.store.rglob("*"))
    generation = model["generation"]
    assert left == [
        ".ramstage-store",
        "m",
        f"m/{generation}",
        f"m/{generation}.json",
        f"m/{generation}/m.ckpt",
    ]


@pytest.mark.root
@pytest.mark.parametrize("mount", [True, False], ids=["tmpfs", "directory"])
def test_sigterm_keeps_links_and_store_and_unmount_frees_them(tmp_path, make_daemon, mount):
    file_source = write_random(tmp_path / "ssd" / "a.ckpt", 8 << 20)
    dir_source = write_random(tmp_path / "ssd" / "b" / "shard.bin", 1 << 20).parent
    daemon = make_daemon(
        [{"name": "a", "source": str(file_source)}, {"name": "b", "source": str(dir_source)}],
        mount=mount,
    ).start()
    staged = {name: daemon.wait_state(name, "staged")["target"] for name in ("a", "b")}
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    for name, target in staged.items():
        assert os.path.realpath(daemon.links / name) == target  # still on the copy in RAM
    assert sha256_file(daemon.links / "a") == sha256_file(file_source)
    assert "stopping: copies in RAM and their links stay for the next start" in daemon.log()

    freed = daemon.cli("unmount", check=True).stdout
    assert "every link on its source" in freed
    assert os.readlink(daemon.links / "a") == str(file_source)
    assert os.readlink(daemon.links / "b") == str(dir_source)
    assert sha256_file(daemon.links / "a") == sha256_file(file_source)
    if mount:
        assert findmnt(daemon.store) is None
    else:
        assert [p for p in daemon.store.rglob("*") if p.is_file()] == [
            daemon.store / ".ramstage-store"
        ]


def mounted_at(path: Path) -> bool:
    return any(entry.mountpoint == path for entry in System().mounts())


@pytest.mark.root
@pytest.mark.parametrize(
    "name",
    ["with space", "with\ttab", "with\nnewline", "with\\backslash", "ünïcödé-模型", "a \\040 b"],
    ids=["space", "tab", "newline", "backslash", "non-ascii", "escape-lookalike"],
)
def test_a_store_path_with_any_name_mounts_serves_and_unmounts(tmp_path, make_daemon, name):
    """mountinfo writes space, tab, newline and backslash as octal escapes and everything else
    as raw bytes: the daemon must find its own mount again, whatever the name."""
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    store = tmp_path / name / "store"
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}], mount=True, store={"path": str(store)}
    )
    try:
        daemon.start()
        model = daemon.wait_state("m", "staged")
        assert model["target"].startswith(str(store) + "/")
        assert sha256_file(daemon.links / "m") == sha256_file(source)
        assert daemon.request("status")["store"]["mounted"] is True
        # The kernel's own record, as PID 1 sees it, names this very directory.
        raw = Path("/proc/1/mountinfo").read_bytes().splitlines()
        escaped = os.fsencode(store)
        for char in b"\\ \t\n":
            escaped = escaped.replace(bytes([char]), b"\\%03o" % char)
        assert any(line.split()[4] == escaped for line in raw)
        assert mounted_at(store)
        assert daemon.stop() == 0
        assert mounted_at(store)  # kept for the next start
        assert "unmounted" in daemon.cli("unmount", check=True).stdout
        assert not mounted_at(store)
    finally:
        subprocess.run(["umount", "--lazy", str(store)], capture_output=True, check=False)


@pytest.mark.root
def test_mounting_over_a_directory_that_is_not_empty_is_refused(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=True)
    daemon.store.mkdir()
    (daemon.store / "notes.txt").write_text("keep me")
    daemon.start(wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(30) != 0
    assert "is a directory that is not empty: a tmpfs mounted over it would hide" in daemon.log()
    assert not mounted_at(daemon.store)
    assert (daemon.store / "notes.txt").read_text() == "keep me"
