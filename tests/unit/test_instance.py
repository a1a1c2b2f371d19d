"""Between daemons: the lock, the evictions kept, and how the stop path tells a restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ramstage.config import Config, parse_config
from ramstage.errors import RamstageError
from ramstage.instance import Evictions, keep_for_restart, only_one
from ramstage.system import System


def config(root: Path, **overrides: Any) -> Config:
    data = {
        "store": {"path": str(root / "store"), "mount": False},
        "links_dir": str(root / "models"),
        "socket": str(root / "control.sock"),
        **overrides,
    }
    return parse_config(data)


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    # flock(2) locks belong to the open file, so a second open in this process conflicts just
    # as another process would.
    with (
        only_one(config(tmp_path), "start"),
        pytest.raises(RamstageError) as refused,
        only_one(config(tmp_path), "start"),
    ):
        pass
    message = refused.value.message
    assert f"cannot start: a ramstage daemon (PID {os.getpid()}) already runs" in message
    assert "systemctl stop ramstage" in message
    with only_one(config(tmp_path), "start"):  # released with the block
        pass


@pytest.mark.parametrize("shared", ["store", "socket"])
def test_sharing_the_store_or_the_socket_is_enough_to_conflict(tmp_path, shared):
    first = config(tmp_path)
    same = {
        "store": {"store": {"path": str(tmp_path / "store"), "mount": False}},
        "socket": {"socket": str(tmp_path / "control.sock")},
    }[shared]
    second = config(tmp_path / "other", **same)
    with only_one(first, "start"), pytest.raises(RamstageError), only_one(second, "start"):
        pass


def test_evictions_are_saved_and_a_damaged_file_is_ignored(tmp_path):
    evictions = Evictions(config(tmp_path))
    assert evictions.load() == set()
    evictions.keep({"b", "a"})
    assert Evictions(config(tmp_path)).load() == {"a", "b"}
    (tmp_path / ".store.held.json").write_text("{not json")
    assert Evictions(config(tmp_path)).load() == set()


class Systemd(System):
    """systemd is not PID 1 on the test machine: the job the unit has is given."""

    def __init__(self, job: str | None, result: str | None) -> None:
        super().__init__(environ={"SERVICE_RESULT": result} if result else {})
        self.job = job

    def queued_job(self, unit: str) -> str | None:
        return self.job


@pytest.mark.parametrize(
    ("job", "result", "kept"),
    [
        ("restart", "success", True),  # systemctl restart, a package upgrade
        ("start", "success", True),
        ("try-restart", "success", True),
        ("stop", "success", False),  # systemctl stop, apt remove
        (None, "success", False),  # the daemon stopped on its own: nothing starts it again
        (None, None, False),  # run by hand, outside systemd
        (None, "signal", True),  # it crashed: Restart= brings it back to adopt the store
        ("stop", "watchdog", False),  # stopped after a crash, on purpose
    ],
)
def test_the_stop_path_keeps_the_store_only_for_a_restart_or_after_a_crash(job, result, kept):
    assert bool(keep_for_restart(Systemd(job, result), "ramstage.service")) is kept
