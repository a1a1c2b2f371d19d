"""The fault matrix: a running daemon meets a disconnected or hung source mount, a full store,
the store unmounted, a read-only links directory and the inotify limits. In each case the
control socket answers within 1 s, pressure relief still works for the other models, every
link stays valid, status names the cause, the source is untouched, and the daemon recovers on
its own once the fault clears."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, wait_for, write_random
from fuseserver import FuseServer
from hubcache import HubCache

from ramstage.links import read as read_link
from ramstage.system import System

M = 1 << 20
pytestmark = pytest.mark.root  # mounts: FUSE, tmpfs, bind mounts

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class FuseMount:
    """A FUSE mount over `path` whose server never answers: every look below it waits (a hung
    mount, as when the server is stopped) until disconnect(), after which every look fails with
    ENOTCONN, as when the server has died (fuse(4): the connection is aborted when /dev/fuse is
    closed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Close-on-exec: a daemon started later must not keep the connection alive.
        self.fd: int | None = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0".encode()
        if _libc.mount(b"ramstage-test", bytes(path), b"fuse.ramstage-test", 0, options) != 0:
            raise OSError(ctypes.get_errno(), "mount fuse", str(path))
        self.mounted = True

    def disconnect(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def unmount(self) -> None:
        """Disconnects first: no look may hang on it (not even umount's)."""
        self.disconnect()
        if self.mounted:
            subprocess.run(["umount", "--lazy", str(self.path)], check=True)
            self.mounted = False


@pytest.fixture
def fuse_mounts() -> Iterator[list[FuseMount]]:
    mounts: list[FuseMount] = []
    yield mounts
    for mount in mounts:
        mount.unmount()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timed(daemon: Daemon, cmd: str, **args: Any) -> Any:
    """A request, which must be answered within 1 s."""
    started = time.monotonic()
    result = daemon.request(cmd, **args)
    took = time.monotonic() - started
    assert took < 1.0, f"{cmd} took {took:.2f}s\n{daemon.log()}"
    return result


def models(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in timed(daemon, "status")["models"]}


def links_valid(daemon: Daemon, unreachable: set[str] = frozenset()) -> None:
    """Every link there is leads to a file, or a directory (an `hf:` snapshot), that can be read;
    none leads below a broken mount."""
    for link in daemon.links.iterdir():
        target = read_link(link)
        assert target is not None, link
        assert not any(target.startswith(str(u)) for u in unreachable), (link, target)
        assert os.path.isfile(link) or os.listdir(link), (link, target)


def set_floor(daemon: Daemon, floor: str, resume: str) -> None:
    daemon.config["memory"].update(min_available=floor, resume_available=resume)
    daemon.write_config()
    daemon.cli("reload", check=True)


def test_a_disconnected_source_mount_does_not_stop_pressure_relief_for_the_others(
    tmp_path, make_daemon, fuse_mounts
):
    good = [write_random(tmp_path / "src" / f"good{i}.bin", 4 * M, seed=i) for i in range(2)]
    bad = write_random(tmp_path / "remote" / "share" / "bad.bin", 4 * M, seed=9)
    sums = {path: sha256(path) for path in [*good, bad]}
    daemon = make_daemon(
        [
            {"name": "bad", "source": str(bad), "priority": 0},
            {"name": "good0", "source": str(good[0]), "priority": 1},
            {"name": "good1", "source": str(good[1]), "priority": 2},
        ],
        memory={"cooldown": "1s"},
        watch={"settle": "300ms", "rescan": "1s"},
    ).start()
    for name in ("bad", "good0", "good1"):
        daemon.wait_state(name, "staged")

    mount = FuseMount(bad.parent)  # the share's server is gone: ENOTCONN from now on
    fuse_mounts.append(mount)
    mount.disconnect()
    # A floor above all the memory there is: every model must go back to its source.
    set_floor(daemon, "100000G", "100001G")
    wait_for(
        lambda: all(m["state"] != "staged" for m in models(daemon).values()),
        context=daemon.log,
    )
    seen = models(daemon)
    for name, source in (("good0", good[0]), ("good1", good[1])):
        assert seen[name]["state"] == "fallback" and seen[name]["reason"] == "pressure"
        assert read_link(daemon.links / name) == str(source)
    assert seen["bad"]["state"] == "missing"
    assert "Transport endpoint is not connected" in seen["bad"]["reason"]
    assert not (daemon.links / "bad").exists()
    links_valid(daemon, {bad.parent})
    assert wait_for(lambda: not any(daemon.store.glob("*/*/*")), context=daemon.log)  # RAM freed
    assert "internal error" not in daemon.log()

    mount.unmount()
    set_floor(daemon, "512M", "1G")
    for name in ("bad", "good0", "good1"):
        daemon.wait_state(name, "staged")
    links_valid(daemon)
    assert {path: sha256(path) for path in sums} == sums


def test_a_hung_source_mount_blocks_neither_the_loop_nor_a_start(
    tmp_path, make_daemon, fuse_mounts
):
    good = write_random(tmp_path / "src" / "good.bin", 4 * M, seed=1)
    hung = write_random(tmp_path / "remote" / "share" / "hung.bin", 4 * M, seed=2)
    sums = {good: sha256(good), hung: sha256(hung)}
    daemon = make_daemon(
        [
            {"name": "hung", "source": str(hung), "priority": 0},
            {"name": "good", "source": str(good), "priority": 1},
        ],
        watch={"settle": "300ms", "rescan": "1s"},
    ).start()
    daemon.wait_state("hung", "staged")
    daemon.wait_state("good", "staged")

    mount = FuseMount(hung.parent)  # a server that never answers: every stat waits
    fuse_mounts.append(mount)
    timed(daemon, "evict", names=["good"])
    wait_for(lambda: models(daemon)["good"]["state"] == "fallback", context=daemon.log)
    # Rescans (every 1 s) and source events look at the hung source; admin requests still
    # answer within 1 s, every time.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        models(daemon)
    assert daemon.request("stage", names=["good"]) == {"staged": ["good"]}  # waits for the copy
    assert models(daemon)["hung"]["state"] == "staged"  # its verified copy is still served
    links_valid(daemon)

    # A start while the source hangs opens the socket and places every link.
    assert daemon.stop() == 0
    daemon.start()
    seen = models(daemon)
    assert seen["hung"]["state"] == "missing"
    assert "(a hung mount?)" in seen["hung"]["reason"]
    timed(daemon, "evict", names=["good"])
    assert daemon.request("stage", names=["good"]) == {"staged": ["good"]}
    links_valid(daemon, {hung.parent})

    mount.unmount()
    daemon.wait_state("hung", "staged")
    links_valid(daemon)
    assert {path: sha256(path) for path in sums} == sums
    assert daemon.stop() == 0


def test_a_hung_ref_of_an_hf_model_blocks_neither_the_loop_nor_a_start(
    tmp_path, make_daemon, fuse_mounts
):
    """An `hf:` model's revision is read from refs/REVISION whenever its source is looked at:
    with a deadline, like any look at a source."""
    hub = HubCache(tmp_path / "hub")
    commit = hub.revision("v1")
    good = write_random(tmp_path / "src" / "good.bin", 4 * M, seed=1)
    blobs = {path: sha256(path) for path in (hub.repo / "blobs").iterdir()}
    daemon = make_daemon(
        [
            {"name": "hub", "hf": "org/name", "hf_cache": str(hub.cache), "validate": "none"},
            {"name": "good", "source": str(good), "priority": 1},
        ],
        watch={"settle": "300ms", "rescan": "1s"},
        memory={"cooldown": "1s"},  # the retry backoff's first wait
    ).start()
    daemon.wait_state("hub", "staged")
    daemon.wait_state("good", "staged")
    timed(daemon, "evict", names=["hub"])
    assert read_link(daemon.links / "hub") == str(hub.snapshot(commit))

    refs = hub.repo / "refs"
    mount = FuseMount(refs)  # a server that never answers: reading refs/main waits
    fuse_mounts.append(mount)
    deadline = time.monotonic() + 3  # rescans (every 1 s) resolve the revision again
    while time.monotonic() < deadline:
        models(daemon)
    failed = daemon.cli("stage", "hub")
    assert failed.returncode == 1 and f"{refs} " in failed.stderr, failed
    hung = models(daemon)["hub"]
    assert hung["state"] == "fallback" and "(a hung mount?)" in hung["reason"], hung
    assert "source unreachable:" in hung["reason"] and f"{refs} " in hung["reason"], hung
    assert hung["source"] == str(hub.snapshot(commit))  # the snapshot resolved before
    timed(daemon, "evict", names=["good"])
    assert daemon.request("stage", names=["good"]) == {"staged": ["good"]}  # others stage
    links_valid(daemon)
    assert models(daemon)["hub"]["retry"]["failures"] >= 1, models(daemon)["hub"]

    # The refused stage is tried again on its own once the ref answers.
    mount.unmount()
    daemon.wait_state("hub", "staged")
    mount = FuseMount(refs)
    fuse_mounts.append(mount)

    # A start while the ref hangs opens the socket and places every link.
    assert daemon.stop() == 0
    daemon.start()
    seen = models(daemon)
    assert seen["hub"]["state"] == "missing" and not (daemon.links / "hub").exists()
    reason = seen["hub"]["reason"]
    assert "source unreachable:" in reason and f"{refs} gave no answer" in reason, reason
    assert seen["good"]["state"] == "staged"
    timed(daemon, "evict", names=["good"])
    assert daemon.request("stage", names=["good"]) == {"staged": ["good"]}
    links_valid(daemon)

    mount.unmount()
    staged = daemon.wait_state("hub", "staged")  # on its own, once the ref answers
    assert staged["source"] == str(hub.snapshot(commit)) and staged["reason"] is None
    links_valid(daemon)
    assert {path: sha256(path) for path in blobs} == blobs
    assert "internal error" not in daemon.log()
    assert daemon.stop() == 0


def make_read_only(links: Path, how: str) -> None:
    if how == "immutable":
        subprocess.run(["chattr", "+i", str(links)], check=True)
    else:
        subprocess.run(["mount", "--bind", str(links), str(links)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(links)], check=True)


def make_writable(links: Path, how: str) -> None:
    if how == "immutable":
        subprocess.run(["chattr", "-i", str(links)], check=True)
    else:
        subprocess.run(["umount", str(links)], check=True)


@pytest.mark.parametrize("how", ["immutable", "read-only bind mount"])
def test_a_read_only_links_directory_is_said_and_leaks_nothing(tmp_path, make_daemon, how):
    source = write_random(tmp_path / "src" / "a.bin", 4 * M, seed=1)
    other = write_random(tmp_path / "src" / "b.bin", 4 * M, seed=2)
    daemon = make_daemon(
        [{"name": "a", "source": str(source)}, {"name": "b", "source": str(other)}],
        watch={"settle": "300ms", "rescan": "1s"},
    ).start()
    first = daemon.wait_state("a", "staged")
    daemon.wait_state("b", "staged")
    generations = daemon.store / "a"

    make_read_only(daemon.links, how)
    try:
        write_random(source, 4 * M, seed=3)  # an update, copied but not linkable
        seen = wait_for(
            lambda: (
                "cannot change the link" in (models(daemon)["a"]["reason"] or "")
                and models(daemon)["a"]
            ),
            context=daemon.log,
        )
        assert seen["state"] == "staged" and seen["generation"] == first["generation"]
        assert read_link(daemon.links / "a") == first["target"]
        links_valid(daemon)
        # The unlinked copy is not kept: one generation, the one served.
        assert wait_for(lambda: len([p for p in generations.iterdir() if p.is_dir()]) == 1)
        evict = daemon.cli("evict", "b")
        assert evict.returncode == 1
        assert "cannot change the link" in evict.stderr and "internal" not in evict.stderr
        assert models(daemon)["b"]["state"] == "staged"
    finally:
        make_writable(daemon.links, how)

    updated = wait_for(
        lambda: (
            (m := models(daemon)["a"])["generation"] != first["generation"]
            and m["reason"] is None
            and m
        ),
        context=daemon.log,
    )
    assert updated["digest"] == f"sha256:{sha256(source)}"
    daemon.cli("evict", "b", check=True)
    assert read_link(daemon.links / "b") == str(other)
    assert "internal error" not in daemon.log()


def test_a_store_filled_by_another_process_is_not_too_large_and_room_is_used_again(
    tmp_path, make_daemon
):
    a = write_random(tmp_path / "src" / "a.bin", 4 * M, seed=1)
    b = tmp_path / "src" / "b.bin"
    daemon = make_daemon(
        [{"name": "a", "source": str(a), "priority": 1}, {"name": "b", "source": str(b)}],
        mount=True,
        store={"size": "16M"},
    ).start()
    first = daemon.wait_state("a", "staged")

    filler = write_random(daemon.store / "filler.bin", 10 * M, seed=2)  # another process's
    write_random(a, 4 * M, seed=3)  # an update that fits the store, but not now
    write_random(b, 4 * M, seed=4)  # a new model likewise
    seen = wait_for(
        lambda: (
            (m := models(daemon))["a"]["reason"] == "store_full"
            and m["b"]["reason"] == "store_full"
            and m
        ),
        context=daemon.log,
    )
    assert seen["a"]["state"] == "staged" and seen["a"]["generation"] == first["generation"]
    assert seen["b"]["state"] == "fallback"
    assert read_link(daemon.links / "b") == str(b)
    links_valid(daemon)
    assert "too_large" not in daemon.log()

    filler.unlink()  # room again: both are staged on their own, with no rescan
    staged = wait_for(
        lambda: (
            all(m["reason"] is None and m["state"] == "staged" for m in models(daemon).values())
            and models(daemon)
        ),
        context=daemon.log,
    )
    for name, source in (("a", a), ("b", b)):
        assert staged[name]["digest"] == f"sha256:{sha256(source)}"
    links_valid(daemon)
    assert "internal error" not in daemon.log()


def under_inotify_limits(daemon: Daemon, *, watches: int = 100, instances: int = 128) -> None:
    """Runs the daemon in a user namespace of its own, whose inotify limits (user_namespaces(7):
    /proc/sys/user/max_inotify_*) are lowered there only: the machine's stay as they are."""
    daemon.wrap = [
        "unshare",
        "--user",
        "--map-root-user",
        "sh",
        "-c",
        f"echo {watches} > /proc/sys/user/max_inotify_watches"
        f' && echo {instances} > /proc/sys/user/max_inotify_instances && exec "$@"',
        "sh",
    ]


def set_inotify_limit(daemon: Daemon, name: str, value: int) -> None:
    assert daemon.process is not None
    # The daemon is the shell's exec: its PID is the namespace's.
    subprocess.run(
        ["nsenter", "--user", "--target", str(daemon.process.pid), "sh", "-c",
         f"echo {value} > /proc/sys/user/max_inotify_{name}"],
        check=True,
    )  # fmt: skip


def watch_status(daemon: Daemon) -> dict[str, Any]:
    return timed(daemon, "status")["watch"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("limit", ["watches", "instances"])
def test_inotify_limits_at_start_degrade_watching_and_it_recovers(tmp_path, make_daemon, limit):
    source = write_random(tmp_path / "src" / "m.bin", 1 * M, seed=1)
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}], watch={"settle": "300ms", "rescan": "1s"}
    )
    under_inotify_limits(daemon, **{limit: 0})
    daemon.start()
    first = daemon.wait_state("m", "staged")
    problems = watch_status(daemon)
    assert problems["degraded"] is True
    expected = "No space left on device" if limit == "watches" else "Too many open files"
    assert any(expected in p for p in problems["problems"]), problems
    write_random(source, 1 * M, seed=2)  # seen by the periodic rescan
    wait_for(lambda: models(daemon)["m"]["generation"] != first["generation"], context=daemon.log)

    set_inotify_limit(daemon, limit, 100)
    wait_for(lambda: watch_status(daemon) == {"degraded": False, "problems": []})
    assert "unexpected error" not in daemon.log() and "internal error" not in daemon.log()


def test_the_inotify_watch_limit_reached_at_run_time_is_said_and_recovers(tmp_path, make_daemon):
    first = write_random(tmp_path / "one" / "src" / "a.bin", 1 * M, seed=1)
    daemon = make_daemon(
        [{"name": "a", "source": str(first)}], watch={"settle": "300ms", "rescan": "1s"}
    )
    under_inotify_limits(daemon, watches=100)
    daemon.start()
    daemon.wait_state("a", "staged")
    assert watch_status(daemon)["degraded"] is False
    set_inotify_limit(daemon, "watches", 2)  # the two directories above a.bin: no more

    second = write_random(tmp_path / "two" / "src" / "b.bin", 1 * M, seed=2)
    daemon.config["models"].append({"name": "b", "source": str(second)})
    daemon.write_config()
    daemon.cli("reload", check=True)
    staged = daemon.wait_state("b", "staged")
    problems = watch_status(daemon)
    assert problems["degraded"] is True
    assert any(str(second.parent) in p and "No space left" in p for p in problems["problems"])
    write_random(second, 1 * M, seed=3)  # unwatched: the periodic rescan sees it
    wait_for(lambda: models(daemon)["b"]["generation"] != staged["generation"], context=daemon.log)

    set_inotify_limit(daemon, "watches", 100)
    wait_for(lambda: watch_status(daemon) == {"degraded": False, "problems": []})
    assert "internal error" not in daemon.log()


def test_the_store_unmounted_under_the_daemon_is_mounted_again_and_restaged(tmp_path, make_daemon):
    sources = [write_random(tmp_path / "src" / f"m{i}.bin", 4 * M, seed=i) for i in range(2)]
    sums = {path: sha256(path) for path in sources}
    daemon = make_daemon(
        [{"name": f"m{i}", "source": str(path)} for i, path in enumerate(sources)], mount=True
    ).start()
    before = {name: daemon.wait_state(name, "staged")["generation"] for name in ("m0", "m1")}

    System().run_in_init_namespace(["umount", "--lazy", str(daemon.store)])
    wait_for(lambda: "was unmounted; every model is served from its source" in daemon.log())
    status = wait_for(
        lambda: (
            (taken := timed(daemon, "status"))["store"]["mounted"]
            and all(m["state"] == "staged" and m["reason"] is None for m in taken["models"])
            and taken
        ),
        context=daemon.log,
    )
    assert any(m.mountpoint == daemon.store and m.fstype == "tmpfs" for m in System().mounts())
    for model in status["models"]:
        assert model["generation"] == before[model["name"]]  # the same content, copied again
        assert Path(model["target"]).is_relative_to(daemon.store)
    links_valid(daemon)
    # Nothing was written to the file system below the store path.
    below = tmp_path / "below"
    below.mkdir()
    subprocess.run(["mount", "--bind", str(daemon.root), str(below)], check=True)
    try:
        assert list((below / "store").iterdir()) == []
    finally:
        subprocess.run(["umount", str(below)], check=True)
    assert {path: sha256(path) for path in sums} == sums
    assert "internal error" not in daemon.log()


@pytest.fixture
def fuse_servers() -> Iterator[list[FuseServer]]:
    servers: list[FuseServer] = []
    yield servers
    for server in servers:
        server.close()


def test_status_does_not_wait_for_a_hung_mount_a_reader_holds_a_file_on(
    tmp_path, make_daemon, fuse_servers
):
    """Who holds what is read from /proc/PID/fd without asking the file's server."""
    source = write_random(tmp_path / "src" / "m.bin", 1 * M, seed=1)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    share = tmp_path / "share"
    share.mkdir()
    server = FuseServer(share, "other.bin", os.urandom(4096))
    fuse_servers.append(server)
    with open(share / "other.bin", "rb"), open(daemon.links / "m", "rb"):
        server.hang()
        try:
            for _ in range(3):
                assert models(daemon)["m"]["users"] == [os.getpid()]
        finally:
            server.answer()  # before the file is closed: close(2) asks the server (FLUSH)


def _faulty_and_good(tmp_path, make_daemon, fuse_servers, name, size, fault):
    """A daemon with two models: `name`, served by a FUSE server that `fault` has set to fail
    (first in line), and `good`, a plain file. The backoff's first wait is 1 s."""
    good = write_random(tmp_path / "src" / "good.bin", 1 * M, seed=1)
    share = tmp_path / "share"
    share.mkdir()
    data = os.urandom(size)
    server = FuseServer(share, f"{name}.bin", data)
    fuse_servers.append(server)
    fault(server)
    daemon = make_daemon(
        [
            {"name": name, "source": str(share / f"{name}.bin"), "priority": 1},
            {"name": "good", "source": str(good)},
        ],
        memory={"cooldown": "1s"},
    ).start()
    return daemon, server, share, data, good


def test_a_source_read_failing_with_eio_is_said_and_staged_on_its_own_once_it_reads(
    tmp_path, make_daemon, fuse_servers
):
    daemon, server, share, data, _ = _faulty_and_good(
        tmp_path, make_daemon, fuse_servers, "eio", 2 * M, lambda server: server.eio.set()
    )
    failed = daemon.wait_state("eio", "fallback")
    assert "Input/output error" in failed["reason"]
    # Tried again after a backoff of its own: a failure is no eviction for pressure.
    assert failed["retry"]["failures"] >= 1 and failed["retry"]["backoff_seconds"] >= 1.0
    assert failed["pressure_evictions"] == 0 and failed["backoff_seconds"] is None
    shown = daemon.cli("status", "eio").stdout
    assert re.search(r"retry: +\d+ failures? in a row; tried again in ", shown), shown
    assert re.search(r"pressure evictions: +0\n", shown), shown
    assert read_link(daemon.links / "eio") == str(share / "eio.bin")
    daemon.wait_state("good", "staged")
    assert not list(daemon.store.glob("eio/*/"))  # its partial copy is gone
    reads = server.reads
    wait_for(lambda: server.reads > reads, timeout=30)  # tried again, and failed again
    again = wait_for(lambda: (m := models(daemon)["eio"])["retry"]["failures"] >= 2 and m)
    assert again["retry"]["backoff_seconds"] == 2 * failed["retry"]["backoff_seconds"]
    assert again["pressure_evictions"] == 0
    server.eio.clear()
    staged = daemon.wait_state("eio", "staged")  # on its own: no source change, no `stage`
    assert staged["retry"] is None and staged["pressure_evictions"] == 0
    assert (daemon.links / "eio").read_bytes() == data
    links_valid(daemon)
    assert "internal error" not in daemon.log()


def test_a_source_whose_reads_hang_mid_copy_is_given_up_on_and_staged_once_it_answers(
    tmp_path, make_daemon, fuse_servers
):
    # Some of the file is read, then reads never answer.
    daemon, server, share, data, good = _faulty_and_good(
        tmp_path,
        make_daemon,
        fuse_servers,
        "hung",
        4 * M,
        lambda server: server.hold_reads(after=4),
    )
    wait_for(lambda: server.held)
    assert models(daemon)["hung"]["state"] == "staging"  # the copy is blocked; the socket is not
    failed = daemon.wait_state("hung", "fallback")  # given up on after 10 s without progress
    assert "source read hung" in failed["reason"] and "a hung mount?" in failed["reason"], failed
    assert read_link(daemon.links / "hung") == str(share / "hung.bin")
    daemon.wait_state("good", "staged")  # the copy after it was not held up
    assert models(daemon)["good"]["state"] == "staged"
    assert (daemon.links / "good").read_bytes() == good.read_bytes()
    server.release_reads()
    staged = daemon.wait_state("hung", "staged")  # on its own, after its backoff
    assert (daemon.links / "hung").read_bytes() == data
    assert staged["copies"] == 1  # the copy given up on published nothing when it woke
    # Nothing is left of the copy given up on: only the generation served.
    served = {staged["generation"], f"{staged['generation']}.json"}
    wait_for(lambda: {p.name for p in (daemon.store / "hung").iterdir()} == served)
    links_valid(daemon)
    assert "internal error" not in daemon.log()


@pytest.mark.parametrize("change", ["truncated", "replaced", "deleted"])
def test_a_source_changed_mid_copy_is_never_served_mixed_and_the_new_version_is_staged(
    tmp_path, make_daemon, fuse_servers, change
):
    """The server's side of a share changes the file while the copy is half-way: reads are held
    there (the copy waits on them), the file changes, then reads go on."""
    good = write_random(tmp_path / "src" / "good.bin", 1 * M, seed=1)
    share = tmp_path / "share"
    share.mkdir()
    old, new = os.urandom(4 * M), os.urandom(3 * M)
    server = FuseServer(share, "m.bin", old)
    fuse_servers.append(server)
    server.hold_reads(after=8)  # 1 MiB of 4 read (by either stream), then the copy waits
    daemon = make_daemon(
        [
            {"name": "m", "source": str(share / "m.bin"), "priority": 1},
            {"name": "good", "source": str(good)},
        ],
        watch={"settle": "300ms", "rescan": "1s"},  # no inotify events come from a share
    ).start()
    wait_for(lambda: server.held)
    assert models(daemon)["m"]["state"] == "staging"
    {"truncated": lambda: server.truncate(2 * M), "replaced": lambda: server.replace(new)}.get(
        change, server.delete
    )()
    server.release_reads()
    if change == "deleted":
        gone = wait_for(lambda: (m := models(daemon)["m"])["state"] == "missing" and m)
        assert gone["reason"] == "source_missing" and not (daemon.links / "m").exists()
        assert daemon.wait_state("good", "staged")  # the copy after it went on
        links_valid(daemon)
        server.replace(new)  # made again: taken up by the next rescan
    staged = daemon.wait_state("m", "staged")
    expected = old[: 2 * M] if change == "truncated" else new
    assert (daemon.links / "m").read_bytes() == expected  # the new version whole, never a mix
    assert staged["size_bytes"] == len(expected) and staged["reason"] is None
    # Nothing is left of the copy that met the change: only the generation served.
    served = {staged["generation"], f"{staged['generation']}.json"}
    wait_for(lambda: {p.name for p in (daemon.store / "m").iterdir()} == served)
    daemon.wait_state("good", "staged")
    links_valid(daemon)
    assert "internal error" not in daemon.log()


def test_a_stop_does_not_wait_for_a_copy_blocked_on_a_hung_read(
    tmp_path, make_daemon, fuse_servers
):
    share = tmp_path / "share"
    share.mkdir()
    server = FuseServer(share, "hung.bin", os.urandom(4 * M))
    fuse_servers.append(server)
    server.hold_reads(after=4)
    daemon = make_daemon([{"name": "hung", "source": str(share / "hung.bin")}]).start()
    wait_for(lambda: server.held)
    assert daemon.process is not None
    pid = daemon.process.pid
    daemon.process.send_signal(signal.SIGTERM)
    # The daemon's own work is done within a few seconds: its main thread has exited. The
    # thread whose read the server took and never answered is the kernel's to end (fuse(4)
    # waits for an answer to a request already sent), when the server answers or dies.
    wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", timeout=5)
    server.release_reads()
    assert daemon.process.wait(10) == 0
    assert "stopping" in daemon.log()
