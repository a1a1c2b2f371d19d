"""Stops, restarts and a second daemon: a restart copies nothing and never points a link at the
SSD, a stop with nothing after it frees the RAM, one daemon per store and socket, and what an
operator did is kept across restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LinkReader, sha256_file, wait_for, write_random

from ramstage import links
from ramstage.system import System

RESTARTS = 20


def mounted(store: Path) -> bool:
    return any(m.mountpoint == store for m in System().mounts())


@pytest.fixture
def ssd(tmp_path: Path) -> Iterator[Path]:
    """A source file system mounted strictatime: every read(2) of a file moves its atime, so
    the atime tells whether anyone read the source (no FUSE or strace needed)."""
    path = tmp_path / "ssd"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "strictatime", "ssd", str(path)], check=True)
    yield path
    subprocess.run(["umount", "--lazy", str(path)], check=False)


@pytest.mark.root
def test_restarts_copy_nothing_and_never_point_at_the_source(ssd, make_daemon):
    source = write_random(ssd / "m.ckpt", 32 << 20)
    shards = write_random(ssd / "shards" / "a.bin", 4 << 20).parent
    write_random(shards / "b.bin", 4 << 20, seed=1)
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}, {"name": "s", "source": str(shards)}], mount=True
    ).start()
    first = {name: daemon.wait_state(name, "staged") for name in ("m", "s")}
    read_through = {
        daemon.links / "m": source,
        daemon.links / "s" / "a.bin": shards / "a.bin",
        daemon.links / "s" / "b.bin": shards / "b.bin",
    }
    reader = LinkReader({link: {sha256_file(src)} for link, src in read_through.items()})
    atimes = {path: path.stat().st_atime_ns for path in read_through.values()}
    sources = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in read_through.values()}
    copies = {path: (os.stat(path).st_dev, os.stat(path).st_ino) for path in read_through}
    reader.start()
    try:
        for _ in range(RESTARTS):
            assert daemon.stop(signal.SIGTERM) == 0
            daemon.start()
            for name in ("m", "s"):
                model = daemon.model(name)  # adopted before the socket opens
                assert model["state"] == "staged", model
                assert model["generation"] == first[name]["generation"]
    finally:
        reader.stop()
    assert reader.failures == []
    assert reader.reads > 100
    # Every read, all along, was of the first copy's files: no copy made after it, none read
    # from the source.
    for path, inode in copies.items():
        assert reader.inodes[path] == {inode}, path
    assert not sources & set().union(*reader.inodes.values())
    log = daemon.log()
    assert log.count("staging ") == 2  # the first copy of each model, and no other
    assert log.count("m: adopted generation") == RESTARTS
    assert {path: path.stat().st_atime_ns for path in atimes} == atimes  # nobody read the SSD

    # A stop with nothing after it (the unit's ExecStopPost) frees the store.
    assert daemon.stop(signal.SIGTERM) == 0
    assert mounted(daemon.store)
    daemon.cli("unmount", check=True)
    assert not mounted(daemon.store)
    assert links.read(daemon.links / "m") == str(source)
    assert links.read(daemon.links / "s") == str(shards)


def run_second(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ramstage", "daemon", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def what_a_daemon_owns(daemon) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "links": {p.name: links.read(p) for p in daemon.links.iterdir()},
        "socket": os.stat(daemon.socket).st_ino,
        "store": sorted((str(p), p.lstat().st_ino) for p in daemon.store.rglob("*")),
        "mounted": mounted(daemon.store),
    }


@pytest.mark.root
@pytest.mark.parametrize("shared", ["config", "store", "socket"])
def test_a_second_daemon_refuses_to_start_and_touches_nothing(tmp_path, make_daemon, shared):
    source = write_random(tmp_path / "m.ckpt", 4 << 20)
    first = make_daemon([{"name": "m", "source": str(source)}], mount=True).start()
    first.wait_state("m", "staged")
    before = what_a_daemon_owns(first)
    config = first.config_path
    if shared != "config":
        # Everything else its own, the store or the socket the first daemon's.
        second = make_daemon([{"name": "m", "source": str(source)}], mount=True)
        key = {"store": "socket", "socket": "store"}[shared]
        second.config[key] = first.config[key]
        second.write_config()
        config = second.config_path

    result = run_second(config)
    assert result.returncode == 1
    assert f"a ramstage daemon (PID {first.process.pid}) already runs" in result.stderr
    assert "Traceback" not in result.stderr
    assert what_a_daemon_owns(first) == before
    assert first.model("m")["state"] == "staged"
    assert sha256_file(first.links / "m") == sha256_file(source)
    # ... and the running daemon's store cannot be freed from under it either.
    freed = first.cli("unmount")
    assert freed.returncode == 1 and f"PID {first.process.pid}" in freed.stderr
    assert what_a_daemon_owns(first) == before


def test_a_socket_that_answers_is_never_taken_over(tmp_path, make_daemon):
    """A live daemon without the lock files (an older version) keeps its socket."""
    source = write_random(tmp_path / "m.ckpt", 4096)
    first = make_daemon([{"name": "m", "source": str(source)}]).start()
    second = make_daemon([{"name": "m", "source": str(source)}])
    second.config["socket"] = str(tmp_path / "shared.sock")
    second.write_config()
    listener = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
            "print('up', flush=True); time.sleep(60)",
            str(tmp_path / "shared.sock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "up\n"
        result = run_second(second.config_path)
        assert result.returncode == 1
        assert "another process listens on" in result.stderr
        assert (tmp_path / "shared.sock").is_socket()
    finally:
        listener.kill()
        listener.wait()
    assert first.answers()


def test_an_operators_evict_is_kept_across_restarts_until_stage(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    daemon.cli("evict", "m", check=True)
    for stop in (signal.SIGTERM, signal.SIGKILL, "unmount"):
        daemon.stop(signal.SIGKILL if stop == signal.SIGKILL else signal.SIGTERM)
        if stop == "unmount":
            daemon.cli("unmount", check=True)
        daemon.start()
        model = daemon.model("m")
        assert (model["state"], model["reason"]) == ("fallback", "evicted"), stop
        assert links.read(daemon.links / "m") == str(source)
    assert "m: stays on its source, evicted by the operator" in daemon.log()
    daemon.cli("stage", "m", check=True)
    daemon.stop()
    daemon.start()
    assert daemon.wait_state("m", "staged")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_model_removed_from_the_config_while_down_loses_its_link(tmp_path, make_daemon, stop):
    a, b = write_random(tmp_path / "a.ckpt", 1 << 20), write_random(tmp_path / "b.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "a", "source": str(a)}, {"name": "b", "source": str(b)}]).start()
    daemon.wait_state("a", "staged")
    daemon.wait_state("b", "staged")
    daemon.stop(stop)
    daemon.config["models"] = daemon.config["models"][:1]
    daemon.write_config()

    daemon.start()
    assert not (daemon.links / "b").is_symlink()
    assert not (daemon.store / "b").exists()
    assert daemon.model("a")["state"] == "staged"
    assert sha256_file(daemon.links / "a") == sha256_file(a)


def test_a_reload_to_another_source_serves_the_old_copy_until_the_new_one_is_staged(
    tmp_path, make_daemon
):
    old = write_random(tmp_path / "old.ckpt", 8 << 20)
    new = write_random(tmp_path / "new.ckpt", 256 << 20, seed=3)
    daemon = make_daemon([{"name": "m", "source": str(old)}]).start()
    before = daemon.wait_state("m", "staged")
    reader = LinkReader({daemon.links / "m": {sha256_file(old), sha256_file(new)}})
    reader.start()
    try:
        daemon.config["models"][0]["source"] = str(new)
        daemon.write_config()
        daemon.cli("reload", check=True)
        during = daemon.model("m")
        assert (during["state"], during["reason"]) == ("staged", "source_changed")
        assert links.read(daemon.links / "m") == before["target"]
        after = wait_for(
            lambda: (
                (m := daemon.model("m"))["generation"] != before["generation"]
                and m["reason"] is None
                and m
            ),
            timeout=120,
        )
    finally:
        reader.stop()
    assert reader.failures == []
    assert links.read(daemon.links / "m") == after["target"]
    assert sha256_file(daemon.links / "m") == sha256_file(new)
    # Never on the SSD meanwhile: the old copy, then the new one.
    sources = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in (old, new)}
    assert not sources & reader.inodes[daemon.links / "m"]
