"""The lifecycle's pure transitions, one table row per row of the lifecycle: a record, the
facts the loop gathered, and the actions expected. No daemon, no clock, no sleeping."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ramstage import lifecycle
from ramstage.access import Untrusted
from ramstage.copier import NoSpace
from ramstage.errors import Cancelled, SourceHung
from ramstage.lifecycle import Budget, Listing
from ramstage.model import (
    Action,
    Answer,
    BackOff,
    Backoff,
    DropCopy,
    Hold,
    Job,
    Log,
    Mark,
    Model,
    Note,
    Phase,
    Reason,
    Remember,
    RetryLater,
    Serve,
    Serving,
    StartCopy,
    Want,
    Why,
    phase,
)

OLD = (("m.ckpt", (1, 10, 100, 5, 5)),)
NEW = (("m.ckpt", (1, 11, 120, 6, 6)),)
SOURCE, NOTHING, RAM = Serving.SOURCE, Serving.NOTHING, Serving.RAM
PRESSURE, TOO_LARGE = Why(Reason.PRESSURE), Why(Reason.TOO_LARGE)
# What `ramstage stage` is told: the reason with the figures it was decided on.
TOO_LARGE_TOLD = "too_large: needs 2.0 GiB, store has 1.0 GiB free"
PRESSURE_TOLD = "pressure: needs 1.0 MiB, 1.0 GiB available, floor 1.0 GiB"
CHANGED, MISSING = Why(Reason.SOURCE_CHANGED), Why(Reason.SOURCE_MISSING)
EVICTED = Why(Reason.EVICTED)
UNTRUSTED = Why(Reason.UNTRUSTED, "/ssd is group-writable")


RESOLVED = Path("/ssd/m.ckpt")  # the source as the loop resolved it


@dataclass(frozen=True)
class Settings:
    name: str = "m"
    priority: int = 0
    digest: str | None = None
    validate: str = "format"


def record(name: str = "m", priority: int = 0, **fields: Any) -> Model:
    model = Model(Settings(name, priority=priority), Path(f"/run/models/{name}"), RESOLVED)
    if fields.pop("job", False):
        model.job = Job(Path("/store/m/.partial"), identities=fields.pop("copying", NEW))
    if fields.pop("waiting", False):
        model.waiters.append(Future())
    for key, value in fields.items():
        setattr(model, key, value)
    return model


def in_ram(**fields: Any) -> Model:
    return record(**{"serving": RAM, "generation": "g1", "want": False, "seen": OLD, **fields})


def budget(
    free: int = 1 << 30,
    available: int = 8 << 30,
    paused: bool = False,
    in_flight: int = 0,
    reserved: int = 0,
) -> Budget:
    return Budget(
        free,
        available,
        1 << 30,
        paused,
        now=100.0,
        cooldown_seconds=2.0,
        in_flight_bytes=in_flight,
        reserved_bytes=reserved,
    )


def without_logs(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Log)]


FIRST_BACKOFF = BackOff(Backoff(1, 100.0, 2.0))


@pytest.mark.parametrize(
    ("model", "decide", "expected"),
    [
        pytest.param(
            record(),
            lambda m: lifecycle.admit(m, Listing(NEW, 1 << 20), budget()),
            [StartCopy(NEW, 1 << 20), Note(None)],
            id="pending-admitted",
        ),
        pytest.param(
            in_ram(want=True, why=CHANGED),
            lambda m: lifecycle.admit(m, Listing(NEW, 1 << 20), budget()),
            [StartCopy(NEW, 1 << 20), Note(CHANGED)],
            id="update-admitted-keeps-serving-ram",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.admit(m, Listing(NEW, 2 << 30), budget()),
            [Serve(SOURCE), Note(TOO_LARGE), Want(False), Answer(TOO_LARGE_TOLD)],
            id="too-large-falls-back",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.admit(m, Listing(NEW, 1 << 20), budget(available=1 << 30)),
            [Serve(SOURCE), Note(PRESSURE), Want(False), Answer(PRESSURE_TOLD), FIRST_BACKOFF],
            id="under-floor-falls-back-and-backs-off",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.admit(m, Listing(NEW, 1 << 20), budget(paused=True)),
            [Serve(SOURCE), Note(PRESSURE), Want(False), Answer("pressure"), FIRST_BACKOFF],
            id="cooldown-refuses-on-its-own",
        ),
        pytest.param(
            record(waiting=True),
            lambda m: lifecycle.admit(m, Listing(NEW, 1 << 20), budget(paused=True)),
            [StartCopy(NEW, 1 << 20), Note(None)],
            id="cooldown-admits-an-operators-stage",
        ),
        pytest.param(
            in_ram(want=True),
            lambda m: lifecycle.admit(m, Listing(NEW, 2 << 30), budget()),
            [Remember(NEW), Note(TOO_LARGE), Want(False), Answer(TOO_LARGE_TOLD)],
            id="update-too-large-keeps-ram-until-source-changes",
        ),
        pytest.param(
            in_ram(want=True),
            lambda m: lifecycle.admit(m, Listing(NEW, 1 << 20), budget(available=1 << 30)),
            [Remember(None), Note(PRESSURE), Want(False), Answer(PRESSURE_TOLD), FIRST_BACKOFF],
            id="update-under-pressure-keeps-ram-until-rescan",
        ),
        pytest.param(
            record(),
            # 1 GiB free, of which the copies in flight have yet to take 1023.5 MiB.
            lambda m: lifecycle.admit(
                m, Listing(NEW, 1 << 20), budget(in_flight=1 << 29, reserved=(1 << 30) - (1 << 19))
            ),
            [],
            id="fits-only-beside-what-copies-in-flight-have-yet-to-take-waits",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.admit(
                m, Listing(NEW, 1 << 20), budget(available=(1 << 30) + (3 << 19), reserved=1 << 20)
            ),
            [],
            id="under-floor-only-with-copies-in-flight-waits",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.admit(
                m, Listing(NEW, 1 << 20), budget(in_flight=1 << 29, reserved=(1 << 30) - (1 << 20))
            ),
            [StartCopy(NEW, 1 << 20), Note(None)],
            id="fits-beside-every-reservation-admitted",
        ),
        pytest.param(
            record(),
            # Too large even if the copies in flight gave back the 512 MiB they took.
            lambda m: lifecycle.admit(
                m, Listing(NEW, 2 << 30), budget(free=1 << 29, in_flight=1 << 29, reserved=1 << 20)
            ),
            [
                Serve(SOURCE),
                Note(TOO_LARGE),
                Want(False),
                Answer("too_large: needs 2.0 GiB, store has 512 MiB free"),
            ],
            id="too-large-even-without-copies-in-flight-refused-now",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.admit(m, Listing(missing=True), budget()),
            [Remember(None), Note(MISSING), Want(False), Serve(NOTHING), Answer("source_missing")],
            id="missing-source-no-link",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.admit(m, Listing(error=Why(Reason.ERROR, "boom")), budget()),
            [Serve(SOURCE), Note(Why(Reason.ERROR, "boom")), Want(False), Answer("error: boom")],
            id="unlistable-falls-back",
        ),
        pytest.param(
            in_ram(want=True),
            lambda m: lifecycle.admit(m, Listing(error=UNTRUSTED), budget()),
            [Note(UNTRUSTED), Want(False), Answer("untrusted: /ssd is group-writable")],
            id="untrusted-update-keeps-the-copy-made-before",
        ),
    ],
)
def test_admission(model: Model, decide: Callable[[Model], list[Action]], expected: list[Action]):
    assert without_logs(decide(model)) == expected


RETRIED = RetryLater(None)  # a copy published: no failure left to try again


def copy_failed(model: Model, error: BaseException, exists: bool = True) -> list[Action]:
    why = lifecycle.copy_failure(error)
    return lifecycle.copy_failed(model, why, NEW, 100.0, 10.0, source_exists=exists)


@pytest.mark.parametrize(
    ("model", "decide", "expected"),
    [
        pytest.param(
            record(),
            lambda m: lifecycle.copied(m, "g2", NEW),
            [Serve(RAM, "g2"), Remember(NEW), Note(None), Want(False), Answer(None), RETRIED],
            id="copied-serves-ram",
        ),
        pytest.param(
            in_ram(want=True, why=CHANGED),
            lambda m: lifecycle.copied(m, "g2", NEW),
            [Serve(RAM, "g2"), Remember(NEW), Note(None), Want(False), Answer(None), RETRIED],
            id="update-copied-flips",
        ),
        pytest.param(record(), lambda m: copy_failed(m, Cancelled("off")), [], id="cancelled"),
        pytest.param(
            record(),
            lambda m: copy_failed(m, NoSpace("full")),
            [Serve(SOURCE), Note(Why(Reason.STORE_FULL)), Want(False), Answer("store_full")],
            id="no-space-is-store-full-and-tried-again",
        ),
        pytest.param(
            record(),
            lambda m: copy_failed(m, OSError(22, "EINVAL")),
            [
                Remember(NEW),
                Serve(SOURCE),
                Note(Why(Reason.ERROR, "[Errno 22] EINVAL")),
                Want(False),
                Answer("error: [Errno 22] EINVAL"),
            ],
            id="error-falls-back-until-the-source-changes",
        ),
        pytest.param(
            record(),
            lambda m: copy_failed(m, OSError(5, "EIO")),
            [
                Serve(SOURCE),
                Note(Why(Reason.ERROR, "[Errno 5] EIO")),
                Want(False),
                Answer("error: [Errno 5] EIO"),
                RetryLater(Backoff(1, 100.0, 10.0)),
            ],
            id="eio-falls-back-and-is-tried-again-after-a-backoff",
        ),
        pytest.param(
            record(),
            lambda m: copy_failed(m, SourceHung("source read hung")),
            [
                Serve(SOURCE),
                Note(Why(Reason.ERROR, "source read hung")),
                Want(False),
                Answer("error: source read hung"),
                RetryLater(Backoff(1, 100.0, 10.0)),
            ],
            id="hung-read-falls-back-and-is-tried-again-after-a-backoff",
        ),
        pytest.param(
            in_ram(want=True),
            lambda m: copy_failed(m, ValueError("bad")),
            [Remember(NEW), Note(Why(Reason.ERROR, "bad")), Want(False), Answer("error: bad")],
            id="failed-update-keeps-the-previous-version",
        ),
        pytest.param(
            record(),
            lambda m: copy_failed(m, Untrusted("/ssd is group-writable")),
            [
                Remember(NEW),
                Serve(SOURCE),
                Note(UNTRUSTED),
                Want(False),
                Answer("untrusted: /ssd is group-writable"),
            ],
            id="untrusted-falls-back-with-why",
        ),
        pytest.param(
            record(),
            lambda m: copy_failed(m, FileNotFoundError(2, "gone")),
            [Remember(None), Note(MISSING), Want(False), Serve(NOTHING), Answer("source_missing")],
            id="source-gone-during-copy",
        ),
        pytest.param(
            in_ram(),
            lambda m: copy_failed(m, FileNotFoundError(2, "gone")),
            [Remember(None), Note(MISSING), Want(False), Answer(None)],
            id="source-gone-ram-still-served",
        ),
    ],
)
def test_copy_outcomes(
    model: Model, decide: Callable[[Model], list[Action]], expected: list[Action]
):
    assert without_logs(decide(model)) == expected


@pytest.mark.parametrize(
    ("model", "listing", "writers", "expected"),
    [
        pytest.param(in_ram(), Listing(OLD, 100), False, [Mark(None)], id="unchanged"),
        pytest.param(in_ram(), Listing(NEW, 120), True, [Mark(50.0)], id="still-written"),
        pytest.param(
            in_ram(),
            Listing(NEW, 120),
            False,
            [Mark(None), Note(CHANGED), Want(True)],
            id="changed",
        ),
        pytest.param(
            record(seen=OLD, want=False, why=PRESSURE),
            Listing(NEW, 120),
            False,
            [Mark(None), Want(True)],
            id="changed-on-source",
        ),
        pytest.param(
            record(serving=NOTHING, want=False, why=MISSING),
            Listing(NEW, 120),
            False,
            [Mark(None), Serve(SOURCE), Note(None), Want(True)],
            id="back-after-missing",
        ),
        pytest.param(
            record(held=True, want=False, why=EVICTED),
            Listing(NEW, 120),
            False,
            [Mark(None)],
            id="held-stays",
        ),
        pytest.param(
            record(job=True, copying=NEW), Listing(NEW, 120), False, [Mark(None)], id="being-copied"
        ),
        pytest.param(
            in_ram(),
            Listing(missing=True),
            False,
            [Mark(None), Remember(None), Note(MISSING), Want(False), Answer(None)],
            id="deleted-served-from-ram",
        ),
        pytest.param(
            in_ram(),
            Listing(error=Why(Reason.ERROR, "EACCES")),
            False,
            [Mark(None)],
            id="unlistable-looked-at-later",
        ),
        pytest.param(
            record(want=False, why=UNTRUSTED),
            Listing(error=UNTRUSTED),
            False,
            [Mark(None), Want(True)],
            id="untrusted-refused-by-admission-with-why",
        ),
        pytest.param(
            record(serving=NOTHING, want=False, why=MISSING),
            Listing(error=UNTRUSTED),
            False,
            [Mark(None), Serve(SOURCE), Note(None), Want(True)],
            id="untrusted-where-nothing-was",
        ),
    ],
)
def test_settled(model: Model, listing: Listing, writers: bool, expected: list[Action]):
    assert without_logs(lifecycle.settled(model, listing, writers=writers, now=50.0)) == expected


@pytest.mark.parametrize(
    ("model", "decide", "expected"),
    [
        pytest.param(record(), lambda m: lifecycle.source_event(m, 7.0), [Mark(7.0)], id="event"),
        pytest.param(
            record(job=True),
            lambda m: lifecycle.source_event(m, 7.0),
            [Mark(7.0), DropCopy(), Want(True)],
            id="event-calls-off-first-copy",
        ),
        pytest.param(
            in_ram(job=True, want=True),
            lambda m: lifecycle.source_event(m, 7.0),
            [Mark(7.0), DropCopy(), Want(False)],
            id="event-calls-off-update",
        ),
        pytest.param(record(), lambda m: lifecycle.rescan(m, 10.0, 2.0), [Mark(8.0)], id="rescan"),
        pytest.param(
            record(changed_at=9.0), lambda m: lifecycle.rescan(m, 10.0, 2.0), [], id="rescan-marked"
        ),
        pytest.param(
            in_ram(job=True, want=True),
            lambda m: lifecycle.evict_requested(m, source_exists=True),
            [DropCopy(), Serve(SOURCE), Note(EVICTED), Want(False), Answer("evicted"), Hold(True)],
            id="evict-while-an-update-copies",
        ),
        pytest.param(
            in_ram(),
            lambda m: lifecycle.evict_requested(m, source_exists=False),
            [Serve(NOTHING), Note(EVICTED), Want(False), Answer("evicted"), Hold(True)],
            id="evict-without-source",
        ),
        pytest.param(
            in_ram(),
            lambda m: lifecycle.verify_failed(m, "g1", source_exists=True),
            [
                Serve(SOURCE),
                Note(Why(Reason.ERROR, "verify failed, staging again")),
                Want(False),
                Answer("error: verify failed, staging again"),
                Want(True),
            ],
            id="verify-failed",
        ),
        pytest.param(
            in_ram(),
            lambda m: lifecycle.verify_failed(m, "g0", source_exists=True),
            [],
            id="verify-failed-on-a-replaced-generation",
        ),
        pytest.param(
            in_ram(),
            lambda m: lifecycle.pressure_evict(m, 100.0, 2.0, source_exists=True),
            [Serve(SOURCE), Note(PRESSURE), Want(False), Answer("pressure"), FIRST_BACKOFF],
            id="pressure-evicts",
        ),
        pytest.param(
            in_ram(job=True, want=True),
            lambda m: lifecycle.pressure_cancel(m, 100.0, 2.0, source_exists=True),
            [DropCopy(), Note(PRESSURE), Want(False), Answer("pressure"), FIRST_BACKOFF],
            id="pressure-cancels-an-update-ram-stays",
        ),
        pytest.param(
            record(job=True),
            lambda m: lifecycle.pressure_cancel(m, 100.0, 2.0, source_exists=True),
            [
                DropCopy(),
                Serve(SOURCE),
                Note(PRESSURE),
                Want(False),
                Answer("pressure"),
                FIRST_BACKOFF,
            ],
            id="pressure-cancels-a-first-copy",
        ),
        pytest.param(
            record(job=True),
            lambda m: lifecycle.released(m, "ramstage is stopping", source_exists=True),
            [DropCopy(), Serve(SOURCE), Answer("ramstage is stopping")],
            id="released",
        ),
        pytest.param(
            in_ram(),
            lambda m: lifecycle.source_replaced(m, source_exists=False),
            [Serve(NOTHING), Note(CHANGED), Want(False), Answer("source_changed")],
            id="reload-replaced-source-gone",
        ),
        pytest.param(
            in_ram(),
            lambda m: lifecycle.source_replaced(m, source_exists=True),
            [Remember(None), Note(CHANGED), Want(True)],
            id="reload-replaced-keeps-serving-ram",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.source_replaced(m, source_exists=True),
            [Serve(SOURCE), Note(CHANGED), Want(False), Answer("source_changed"), Want(True)],
            id="reload-replaced-on-source",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.placed(m, source_exists=True),
            [Serve(SOURCE)],
            id="placed-on-source",
        ),
        pytest.param(
            record(),
            lambda m: lifecycle.adopted("g1", OLD),
            [Serve(RAM, "g1"), Remember(OLD), Want(False)],
            id="adopted",
        ),
    ],
)
def test_events(model: Model, decide: Callable[[Model], list[Action]], expected: list[Action]):
    assert without_logs(decide(model)) == expected


@pytest.mark.parametrize(
    ("model", "already", "expected"),
    [
        (in_ram(), True, [Hold(False)]),
        (in_ram(why=MISSING), True, [Hold(False)]),
        (in_ram(why=Why(Reason.ERROR, "bad")), False, [Hold(False), Want(True)]),
        (record(held=True, want=False, why=EVICTED), False, [Hold(False), Want(True)]),
        (record(job=True), False, [Hold(False)]),
    ],
    ids=["staged", "staged-source-missing", "failed-update-retried", "evicted", "copying"],
)
def test_stage_requested(model: Model, already: bool, expected: list[Action]):
    assert lifecycle.stage_requested(model) == (already, expected)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (record(), Phase.PENDING),
        (record(job=True), Phase.STAGING),
        (in_ram(), Phase.STAGED),
        (in_ram(job=True, why=CHANGED), Phase.STAGED),  # the clarification: RAM is served
        (in_ram(want=True, why=CHANGED), Phase.STAGED),
        (record(want=False, why=PRESSURE), Phase.FALLBACK),
        (record(held=True, why=EVICTED), Phase.FALLBACK),
        (record(serving=NOTHING), Phase.MISSING),
    ],
    ids=[
        "pending",
        "staging",
        "staged",
        "update-copying",
        "update-waiting",
        "fallback",
        "held",
        "missing",
    ],
)
def test_the_state_is_derived_from_what_the_link_serves(model: Model, expected: Phase):
    assert phase(model) is expected


def test_up_to_workers_copies_highest_priority_first_settled_sources_only():
    low, high = record("low", priority=1), record("high", priority=5)
    moving = record("moving", priority=9, changed_at=3.0)
    assert lifecycle.next_copies([low, high, moving], 2) == ["high", "low"]
    assert lifecycle.next_copies([low, high, moving], 1) == ["high"]
    assert lifecycle.next_copies([low, high, record("busy", job=True)], 2) == ["high"]
    assert lifecycle.next_copies([in_ram(want=True, job=True), low], 3) == ["low"]
    assert lifecycle.next_copies([low, record("busy", job=True)], 1) == []
    assert lifecycle.next_copies([in_ram(), record("held", held=True)], 2) == []
    assert lifecycle.next_copies([in_ram(want=True)], 2) == ["m"]  # an update waits its turn too


def test_a_copy_waits_for_a_copy_in_flight_of_a_file_it_shares_to_link_it():
    copying = record("other", job=True, copying=(("blob", OLD[0][1]),))
    assert lifecycle.shares_a_copy_in_flight(Listing(OLD, 100), [copying])
    assert not lifecycle.shares_a_copy_in_flight(Listing(NEW, 120), [copying, record()])


def test_resume_only_when_calm_idle_and_past_the_backoff():
    evicted = record("a", priority=1, want=False, why=PRESSURE)
    later = record("b", priority=9, want=False, why=PRESSURE, backoff=Backoff(1, 95.0, 10.0))
    assert lifecycle.to_resume([evicted, later], 100.0, calm=True) == "a"
    assert lifecycle.to_resume([evicted, later], 106.0, calm=True) == "b"
    assert lifecycle.to_resume([evicted, later], 106.0, calm=False) is None
    assert lifecycle.to_resume([evicted, record("c", job=True)], 100.0, calm=True) is None
    assert lifecycle.to_resume([evicted, record("p")], 100.0, calm=True) is None
    by_hand = record("h", want=False, why=EVICTED, held=True)
    assert lifecycle.to_resume([by_hand], 100.0, calm=True) is None
    assert lifecycle.resume() == [Note(None), Want(True)]
    # An update refused for pressure while the older version stays in RAM comes back too.
    update_refused = in_ram(want=False, why=PRESSURE)
    assert lifecycle.to_resume([update_refused], 100.0, calm=True) == "m"
    # A copy failed for a fault that may clear comes back after its retry backoff, whatever its
    # pressure backoff says; another does not.
    eio = Why(Reason.ERROR, "[Errno 5] EIO", retry=True)
    failed = record("e", want=False, why=eio, retry=Backoff(1, 95.0, 10.0))
    assert lifecycle.to_resume([failed], 100.0, calm=True) is None
    assert lifecycle.to_resume([failed], 106.0, calm=True) == "e"
    failed.backoff = Backoff(1, 100.0, 600.0)
    assert lifecycle.to_resume([failed], 106.0, calm=True) == "e"
    failed.why = PRESSURE  # then evicted for pressure: its pressure backoff counts
    assert lifecycle.to_resume([failed], 106.0, calm=True) is None
    broken = record("x", want=False, why=Why(Reason.ERROR, "bad"), backoff=Backoff(1, 0.0, 1.0))
    assert lifecycle.to_resume([broken], 106.0, calm=True) is None


@pytest.mark.parametrize(
    ("models", "mode", "ready"),
    [
        ([record()], "links", True),
        ([record()], "staged", False),
        ([record(job=True)], "staged", False),
        ([in_ram(job=True, want=True)], "staged", True),
        ([record(want=False, why=TOO_LARGE)], "staged", True),
        ([record(held=True)], "staged", True),
        ([record(serving=NOTHING, want=False)], "staged", True),
    ],
    ids=["links", "pending", "staging", "update", "refused", "held", "missing"],
)
def test_readiness(models: list[Model], mode: str, ready: bool):
    assert lifecycle.ready(models, mode) is ready


@pytest.mark.parametrize(
    ("model", "exists", "expected"),
    [
        (in_ram(), True, Path("/store/m/g1/m.ckpt")),
        (record(), True, Path("/ssd/m.ckpt")),
        (record(), False, None),
        (record(serving=NOTHING), False, None),
    ],
    ids=["ram", "source", "source-gone", "nothing"],
)
def test_where_the_link_belongs(model: Model, exists: bool, expected: Path | None):
    generation = Path("/store/m/g1/m.ckpt")
    assert lifecycle.expected_link(model, generation, source_exists=exists) == expected


def test_a_missing_source_is_said_once():
    first = lifecycle.source_missing(in_ram())
    assert [a.level for a in first if isinstance(a, Log)] == [logging.WARNING]
    again = lifecycle.source_missing(in_ram(why=MISSING))
    assert not [a for a in again if isinstance(a, Log)]
