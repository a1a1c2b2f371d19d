"""Several models copied at once on the shared copy workers (`staging.workers`): the copies are
byte-identical, admission counts every copy in flight (a store sized for two of three models
never holds more than two), and pressure, an operator's evict and stop work with copies in
flight, leaving no partial copy behind and every link valid.

The sources are FUSE files (fuseserver.py) whose reads are held mid-copy: copies stay in flight
for as long as the test needs to look at them, on a machine of any speed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import Daemon, wait_for, write_random
from fuseserver import FILE, FuseServer

from ramstage.links import read as read_link
from ramstage.system import System

M = 1 << 20
pytestmark = pytest.mark.root  # FUSE and tmpfs mounts

Share = Callable[[str, int], tuple[Path, FuseServer]]


@pytest.fixture
def held_share(tmp_path: Path) -> Iterator[Share]:
    """held_share(name, size) -> (its path, its server): a FUSE source of random bytes whose
    reads after the first 6 MiB wait until server.release_reads() (the kernel's readahead takes
    some of those; every copy still gets whole chunks of its own)."""
    servers: list[FuseServer] = []

    def share(name: str, size: int) -> tuple[Path, FuseServer]:
        directory = tmp_path / f"share-{name}"
        directory.mkdir()
        server = FuseServer(directory, f"{name}.bin", os.urandom(size))
        servers.append(server)
        server.hold_reads(after=48)
        return directory / f"{name}.bin", server

    yield share
    for server in servers:
        server.close()


def models(daemon: Daemon) -> list[dict[str, Any]]:
    return daemon.request("status")["models"]  # type: ignore[no-any-return]


def states(daemon: Daemon) -> dict[str, str]:
    return {m["name"]: m["state"] for m in models(daemon)}


def partials(daemon: Daemon) -> list[Path]:
    return list(daemon.store.glob("*/.partial-*"))


def links_valid(daemon: Daemon) -> None:
    for link in daemon.links.iterdir():
        assert read_link(link) is not None and os.path.isfile(link), link


def test_three_models_copy_at_once_and_are_byte_identical(tmp_path, make_daemon, held_share):
    shared = [held_share(name, 8 * M) for name in ("a", "b", "c")]
    daemon = make_daemon(
        [{"name": name, "source": str(path)} for name, (path, _) in zip("abc", shared)],
        staging={"workers": 3},
    ).start()
    # All three in flight at once, each held mid-copy by its source.
    wait_for(lambda: all(server.held for _, server in shared), context=daemon.log)
    assert states(daemon) == {"a": "staging", "b": "staging", "c": "staging"}

    # Progress of each model on its own (status is published once a loop turn).
    def progress() -> dict[str, Any] | None:
        copying = {m["name"]: m["copy"] for m in models(daemon)}
        return copying if all(c and c["done_bytes"] for c in copying.values()) else None

    copying = wait_for(progress, context=daemon.log)
    for name in "abc":
        assert copying[name]["total_bytes"] == 8 * M
        assert 0 < copying[name]["done_bytes"] < 8 * M
    for _, server in shared:
        server.release_reads()
    for name, (_, server) in zip("abc", shared):
        daemon.wait_state(name, "staged")
        assert (daemon.links / name).read_bytes() == server.files[FILE]
        assert read_link(daemon.links / name).startswith(str(daemon.store))  # type: ignore[union-attr]
    assert not partials(daemon)


def test_a_store_for_two_of_three_models_never_holds_more_with_copies_in_flight(
    tmp_path, make_daemon, held_share
):
    shared = [held_share(name, 10 * M) for name in ("a", "b", "c")]
    daemon = make_daemon(
        [
            {"name": name, "source": str(path), "priority": priority}
            for name, (path, _), priority in zip("abc", shared, (3, 2, 1))
        ],
        mount=True,
        store={"size": "24M"},  # two models of 10 MiB, not three
        staging={"workers": 3},
    ).start()
    wait_for(lambda: shared[0][1].held and shared[1][1].held, context=daemon.log)
    # a and b were admitted at once; c, which fits only if they do not finish, waits for them.
    for _ in range(5):  # well within the 10 s a held copy may go without reading
        assert states(daemon) == {"a": "staging", "b": "staging", "c": "pending"}
        assert daemon.request("status")["store"]["used_bytes"] <= 24 * M
        time.sleep(0.2)
    assert not shared[2][1].reads  # c's source was never read
    for _, server in shared:
        server.release_reads()
    daemon.wait_state("a", "staged")
    daemon.wait_state("b", "staged")
    c = daemon.wait_state("c", "fallback")
    assert c["reason"] == "too_large"  # the store has no room for it beside a and b
    assert read_link(daemon.links / "c") == str(shared[2][0])
    for name, (_, server) in zip("ab", shared):
        assert (daemon.links / name).read_bytes() == server.files[FILE]
    assert not partials(daemon)
    links_valid(daemon)


def test_pressure_and_evict_with_two_copies_in_flight_leave_no_partial_bytes(
    tmp_path, make_daemon, held_share
):
    resident = write_random(tmp_path / "src" / "resident.bin", 4 * M, seed=1)
    (a, a_server), (b, b_server) = held_share("a", 8 * M), held_share("b", 8 * M)
    configs: list[dict[str, Any]] = [
        {"name": "resident", "source": str(resident), "priority": 9},
        {"name": "a", "source": str(a)},
        {"name": "b", "source": str(b)},
    ]
    daemon = make_daemon(configs, mount=True, store={"size": "64M"}, memory={"cooldown": "1s"})
    daemon.start()
    daemon.wait_state("resident", "staged")
    wait_for(lambda: a_server.held and b_server.held, context=daemon.log)
    assert states(daemon) == {"resident": "staged", "a": "staging", "b": "staging"}
    assert len(partials(daemon)) == 2

    # Requests on the socket, not the CLI: all of it well within the 10 s a held copy may go
    # without reading before it is given up on.
    daemon.request("evict", names=["b"])  # mid-copy
    # Then memory runs short: a's copy goes, and the resident model with it.
    floor = str(System().available_bytes() + (64 << 30))
    daemon.config["memory"].update(min_available=floor, resume_available=floor)
    daemon.write_config()
    daemon.request("reload")
    daemon.wait_state("a", "fallback")
    daemon.wait_state("resident", "fallback")
    found = {m["name"]: m for m in models(daemon)}
    assert (found["a"]["reason"], found["b"]["reason"]) == ("pressure", "evicted")
    assert found["resident"]["reason"] == "pressure"
    for name, source in (("resident", resident), ("a", a), ("b", b)):
        assert read_link(daemon.links / name) == str(source)
    assert "a: copy cancelled for memory pressure (floor)" in daemon.log()
    a_server.release_reads()  # the copies' threads see they were called off at the next chunk
    b_server.release_reads()
    wait_for(lambda: not partials(daemon), context=daemon.log)
    assert daemon.status()["store"]["used_bytes"] == 0
    links_valid(daemon)
    assert "internal error" not in daemon.log()
