"""The core in-process, against a fake System: a clock that moves only when told to and a
MemAvailable the test sets. The store is a plain directory and the copies are real, so what is
asserted is what `status` and the links would show; nothing waits on a wall clock."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import write_random

from ramstage import lifecycle
from ramstage.config import parse_config
from ramstage.core import LOOK_AGAIN_SECONDS
from ramstage.daemon import Daemon
from ramstage.generations import SWAP_GRACE_SECONDS
from ramstage.model import Event, JobDone, Note, Pressure, Serving
from ramstage.service import Notifier
from ramstage.status import Snapshot, snapshot
from ramstage.system import System

G = 1 << 30


class FakeSystem(System):
    def __init__(self) -> None:
        super().__init__(environ={})
        self.now = 1000.0
        self.readings = [8 * G]  # MemAvailable, one reading at a time; the last one repeats

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def available_bytes(self) -> int:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


class Core:
    """A daemon's core built by its composition root, driven by hand, one step at a time."""

    def __init__(self, root: Path, models: list[dict[str, Any]], workers: int = 1) -> None:
        self.system = FakeSystem()
        data = {
            "store": {"path": str(root / "store"), "mount": False},
            "links_dir": str(root / "models"),
            "socket": str(root / "control.sock"),
            "memory": {"min_available": "1G", "resume_available": "2G", "cooldown": "2s"},
            "watch": {"settle": "1s"},
            # One copy at a time unless asked, so the tests choose the order copies finish in.
            "staging": {"workers": workers},
            "models": models,
        }
        daemon = Daemon(
            root / "ramstage.yaml", parse_config(data), self.system, Notifier(self.system)
        )
        self.events: queue.SimpleQueue[Event] = daemon.events
        self.core = daemon.core
        self.core.store.open()
        self.core.place_all(set())

    def copy_next(self) -> JobDone:
        """Starts the next copy and waits for the worker to report back (events, not sleep)."""
        self.core.schedule(stopping=False)
        while not isinstance(event := self.events.get(timeout=30), JobDone):
            pass
        return event

    def finish(self, done: JobDone) -> None:
        self.core.job_done(done.name, done.job)

    def entry(self, name: str) -> dict[str, Any]:
        core = self.core
        taken = snapshot(
            core.models.values(),
            core.generations,
            core.relief.last_pressure_at,
            previous=Snapshot(),
            now=time.monotonic(),
            wall=time.time(),
        )
        return next(m for m in taken.models if m["name"] == name)

    def close(self) -> None:
        self.core.actuator.stop(self.core.models.values())


@pytest.fixture
def make_core(tmp_path: Path) -> Iterator[Any]:
    made: list[Core] = []

    def make(models: list[dict[str, Any]], workers: int = 1) -> Core:
        made.append(Core(tmp_path, models, workers))
        return made[-1]

    yield make
    for core in made:
        core.close()


def test_a_model_in_ram_stays_staged_while_its_update_and_another_model_wait_and_copy(
    tmp_path, make_core
):
    a = write_random(tmp_path / "src" / "a.ckpt", 4 << 20, seed=1)
    b = write_random(tmp_path / "src" / "b.ckpt", 1 << 20, seed=2)
    core = make_core(
        [{"name": "a", "source": str(a)}, {"name": "b", "source": str(b), "priority": 5}]
    )
    assert core.entry("b")["state"] == "pending"
    core.finish(core.copy_next())  # b first: the higher priority
    assert core.entry("b")["state"] == "staged"
    core.core.schedule(stopping=False)  # a copies now
    assert core.entry("a")["state"] == "staging"
    write_random(b, 1 << 20, seed=3)  # a new version of b, while a's copy runs
    core.core.updates.on_event("b")
    core.system.now += 1.0  # watch.settle
    core.core.updates.settle()
    b_entry = core.entry("b")
    # b's update waits for a's copy: b still serves RAM; its own copy has not started.
    assert (b_entry["state"], b_entry["reason"], b_entry["progress"]) == (
        "staged",
        "source_changed",
        0.0,
    )
    assert os.path.realpath(core.core.config.links_dir / "b").startswith(str(core.core.store.path))
    while not isinstance(event := core.events.get(timeout=30), JobDone):
        pass
    core.finish(event)
    assert core.entry("a")["state"] == "staged"
    done = core.copy_next()  # b's update
    assert core.entry("b")["state"] == "staged"
    core.finish(done)
    assert (core.entry("b")["reason"], core.entry("b")["generation"]) != ("source_changed", None)
    assert (core.core.config.links_dir / "b").read_bytes() == b.read_bytes()


def test_a_source_event_waits_for_the_settle_time_on_the_clock(tmp_path, make_core):
    source = write_random(tmp_path / "src" / "m.ckpt", 1 << 20)
    core = make_core([{"name": "m", "source": str(source)}])
    core.finish(core.copy_next())
    model = core.core.models["m"]
    write_random(source, 1 << 20, seed=9)
    core.core.updates.on_event("m")
    core.system.now += 0.999
    core.core.updates.settle()
    assert (model.changed_at, model.want) == (1000.0, False)
    assert core.core.updates.next_due() == 1001.0
    core.system.now += 0.001
    core.core.updates.settle()
    assert (model.changed_at, model.want) == (None, True)


def test_pressure_evicts_lowest_priority_first_and_looks_again_after_each(tmp_path, make_core):
    models = [
        {
            "name": n,
            "source": str(write_random(tmp_path / "src" / f"{n}.ckpt", 1 << 20, seed=i)),
            "priority": i,
        }
        for i, n in enumerate(["low", "mid", "high"])
    ]
    core = make_core(models)
    for _ in models:
        core.finish(core.copy_next())
    assert {core.entry(m["name"])["state"] for m in models} == {"staged"}
    # Under the floor at the event and after the first eviction; above it after the second.
    core.system.readings = [G // 2, G // 2, 2 * G]
    core.core.relief.relieve(Pressure("floor", G // 2), core.core.models)
    states = {m["name"]: core.entry(m["name"])["state"] for m in models}
    assert states == {"low": "fallback", "mid": "fallback", "high": "staged"}
    low = core.entry("low")
    assert (low["reason"], low["pressure_evictions"], low["backoff_seconds"]) == (
        "pressure",
        1,
        2.0,
    )
    assert os.readlink(core.core.config.links_dir / "low") == models[0]["source"]
    assert not list((core.core.store.path / "low").glob("[!.]*"))
    # Calm again, but within the cooldown: nothing comes back; after it, the higher first.
    core.system.readings = [4 * G]
    core.core.relief.resume(core.core.models)
    assert core.entry("mid")["state"] == "fallback"
    core.system.now += 2.0
    core.core.relief.resume(core.core.models)
    assert (core.entry("mid")["state"], core.entry("low")["state"]) == ("pending", "fallback")


def test_an_outgoing_generation_goes_after_its_grace_period_on_the_clock(tmp_path, make_core):
    source = write_random(tmp_path / "src" / "m.ckpt", 1 << 20)
    core = make_core([{"name": "m", "source": str(source)}])
    core.finish(core.copy_next())
    first = core.core.generations.current("m")
    write_random(source, 1 << 20, seed=5)
    core.core.updates.rescan("test")  # as if settled already
    core.core.updates.settle()
    core.finish(core.copy_next())
    assert first is not None and first.path.exists()
    assert core.core.generations.outgoing("m") == [first]
    core.system.now += SWAP_GRACE_SECONDS - 0.001
    core.core.generations.expire(core.system.now)
    assert first.path.exists()
    core.system.now += 0.001
    core.core.generations.expire(core.system.now)
    assert not first.path.exists()
    assert core.core.generations.outgoing("m") == []
    assert core.core.models["m"].serving is Serving.RAM


def test_evict_and_stage_back_reuses_nothing_stale(tmp_path, make_core):
    source = write_random(tmp_path / "src" / "m.ckpt", 1 << 20)
    core = make_core([{"name": "m", "source": str(source)}])
    core.finish(core.copy_next())
    generation = core.core.generations.current("m")
    assert generation is not None
    model = core.core.models["m"]
    core.core.apply(model, lifecycle.evict_requested(model, source_exists=True))
    assert not generation.path.exists()  # left for the source: deleted at once
    assert core.entry("m")["state"] == "fallback"
    core.core.apply(model, lifecycle.stage_requested(model)[1])
    core.finish(core.copy_next())
    assert core.entry("m")["state"] == "staged"
    assert generation.path.exists()  # the same content: the same generation, copied again


def test_a_model_that_waits_is_not_listed_again_at_every_turn(tmp_path, make_core, monkeypatch):
    """b shares its file with a's copy in flight, so it waits for it. Its source is listed once,
    then again only after LOOK_AGAIN_SECONDS or an action on its record."""
    shared = write_random(tmp_path / "src" / "w.ckpt", 1 << 20, seed=1)
    core = make_core(
        [{"name": "a", "source": str(shared), "priority": 5}, {"name": "b", "source": str(shared)}],
        workers=2,
    )
    listed: list[str] = []
    look = core.core.updates.look
    monkeypatch.setattr(core.core.updates, "look", lambda m: listed.append(m.name) or look(m))
    for _ in range(5):  # turns of the loop while a copies
        core.core.schedule(stopping=False)
    assert (core.entry("a")["state"], core.entry("b")["state"]) == ("staging", "pending")
    assert listed.count("b") == 1
    core.system.now += LOOK_AGAIN_SECONDS
    core.core.schedule(stopping=False)
    assert listed.count("b") == 2
    core.core.apply(core.core.models["b"], [Note(None)])
    core.core.schedule(stopping=False)
    assert listed.count("b") == 3
    while not isinstance(event := core.events.get(timeout=30), JobDone):
        pass
    core.finish(event)
    core.finish(core.copy_next())  # b, once a is in RAM: linked to a's copy of the file
    assert (core.entry("a")["state"], core.entry("b")["state"]) == ("staged", "staged")
