"""The copy workers shared by every copy in flight: never more files at once than workers,
every copy gets one, a copy called off stops waiting, a hung one gives its workers back, and
the copies from one spinning disk read one file at a time between them unless
staging.workers is set."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramstage.access import NO_TRUST
from ramstage.actuator import copy_source
from ramstage.crew import MOST_WORKERS, Crew, default_workers
from ramstage.model import Job
from ramstage.system import System


class Tasks:
    """Tasks that wait to be let go, counting how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: list[str] = []
        self.most = 0
        self.go = threading.Event()

    def task(self, name: str) -> Callable[[], str]:
        def run() -> str:
            with self.lock:
                self.running.append(name)
                self.most = max(self.most, len(self.running))
            self.go.wait(10)
            with self.lock:
                self.running.remove(name)
            return name

        return run


def start(crew: Crew, owner: threading.Event, tasks: list[Callable[[], Any]]) -> list[Any]:
    """[the thread running the copy, its futures once it returns]"""
    results: list[Any] = [None]
    results[0] = threading.Thread(
        target=lambda: results.append(
            crew.run_all(owner, tasks, stop=threading.Event(), tick=lambda: None)
        )
    )
    results[0].start()
    return results


def wait_until(condition: Callable[[], bool]) -> None:
    ready = threading.Event()
    for _ in range(200):
        if condition():
            return
        ready.wait(0.05)
    raise AssertionError("not reached")


def test_copies_share_the_workers_and_each_gets_one():
    crew, tasks = Crew(2), Tasks()
    a, b = threading.Event(), threading.Event()
    first = start(crew, a, [tasks.task(f"a{i}") for i in range(4)])
    wait_until(lambda: sorted(tasks.running) == ["a0", "a1"])
    second = start(crew, b, [tasks.task(f"b{i}") for i in range(2)])
    tasks.go.set()
    for run in (first, second):
        run[0].join(10)
    assert tasks.most == 2
    assert [f.result() for f in first[1]] == ["a0", "a1", "a2", "a3"]
    assert [f.result() for f in second[1]] == ["b0", "b1"]
    assert crew.busy() == 0


def test_a_copy_holding_workers_takes_no_more_while_another_has_none():
    crew, tasks = Crew(2), Tasks()
    a, b = threading.Event(), threading.Event()
    go_a0 = threading.Event()

    def a0() -> str:
        go_a0.wait(10)
        return "a0"

    first = start(crew, a, [a0, tasks.task("a1"), tasks.task("a2")])
    wait_until(lambda: tasks.running == ["a1"])
    start(crew, b, [tasks.task("b0")])
    go_a0.set()  # a's first worker comes free: b, with none, gets it, not a2
    wait_until(lambda: sorted(tasks.running) == ["a1", "b0"])
    tasks.go.set()
    first[0].join(10)
    assert crew.busy() == 0


def test_a_copy_called_off_stops_waiting_and_a_hung_one_gives_its_workers_back():
    crew, tasks = Crew(1), Tasks()
    hung, waiting = threading.Event(), threading.Event()
    start(crew, hung, [tasks.task("hung")])
    wait_until(lambda: tasks.running == ["hung"])
    second = start(crew, waiting, [tasks.task("never")])
    waiting.set()
    second[0].join(10)
    assert second[1] == []  # it started nothing
    hung.set()
    crew.forfeit(hung)  # its thread is still blocked
    third = start(crew, threading.Event(), [lambda: "ran"])
    third[0].join(10)
    assert [f.result() for f in third[1]] == ["ran"]
    tasks.go.set()
    wait_until(lambda: not tasks.running)
    assert crew.busy() == 0  # the hung thread's late return gives nothing back twice


def test_copies_in_one_lane_take_at_most_its_bound_between_them():
    crew, tasks = Crew(4), Tasks()
    disk = 0x801  # the copies from one spinning disk
    runs = [
        threading.Thread(
            target=crew.run_all,
            args=(threading.Event(), [tasks.task(f"{name}{i}") for i in range(2)]),
            kwargs={"stop": threading.Event(), "tick": lambda: None, "lane": disk, "most": 1},
        )
        for name in "ab"
    ]
    for run in runs:
        run.start()
    wait_until(lambda: len(tasks.running) == 1)
    tasks.go.set()
    for run in runs:
        run.join(10)
    assert tasks.most == 1
    assert crew.busy() == 0


def test_default_workers_one_per_core_within_bounds():
    assert [default_workers(n) for n in (0, 1, 2, 1024)] == [1, 1, 2, MOST_WORKERS]


class Recording(Crew):
    def __init__(self) -> None:
        super().__init__(4)
        self.lanes: list[tuple[object, int | None]] = []

    def run_all(self, owner: threading.Event, tasks: Any, **options: Any) -> Any:
        self.lanes.append((options["lane"], options["most"]))
        return super().run_all(owner, tasks, **options)


@dataclass(frozen=True)
class Settings:
    source: Path
    name: str = "m"
    digest: str | None = None
    validate: str = "none"
    trust: Any = NO_TRUST


class SpinningDisk(System):
    def spinning_disk(self, path: Path) -> int | None:
        return 0x801


def test_copies_from_a_spinning_disk_share_its_lane_unless_workers_is_set(tmp_path):
    source = tmp_path / "shards"
    source.mkdir()
    for index in range(3):
        (source / f"{index}.bin").write_bytes(os.urandom(4096))
    crew = Recording()
    for by_device, expected in ((True, (0x801, 1)), (False, (None, None))):
        partial = tmp_path / f"partial-{by_device}"
        partial.mkdir(mode=0o700)
        job = Job(partial, identities=())
        copy_source(Settings(source), source, job, "xxh3", crew, SpinningDisk(), {}, by_device)
        assert crew.lanes[-1] == expected
        assert (job.work.files_done, job.work.files_total) == (3, 3)  # status shows them
        assert (partial / "shards" / "2.bin").read_bytes() == (source / "2.bin").read_bytes()
