"""A model's lifecycle as pure transitions: given its record and the facts the loop gathered
(the source listing, its writers, the memory budget, the time), each returns the actions that
carry the decision out. Nothing here touches the system; the loop applies the actions.

How the record moves (the contract's state in brackets, derived by model.phase):

    SOURCE, want [pending] --admitted--> job [staging] --copied--> RAM [staged]
    SOURCE [pending] --refused / failed--> SOURCE, not wanted [fallback, reason]
    RAM [staged] --source settled, changed--> RAM, want [staged, source_changed] --admitted--> job
    RAM, job --copied--> RAM, newer generation (the old one kept for a grace period)
    RAM, job --refused / failed--> RAM [staged, reason]: the verified version is kept
    any --source gone--> RAM [staged, source_missing] or NOTHING [missing]
    any --evicted / pressure / verify failed--> SOURCE [fallback] or NOTHING [missing]
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ramstage import policy, units
from ramstage.access import Untrusted
from ramstage.copier import NoSpace
from ramstage.errors import Cancelled, SourceHung
from ramstage.model import (
    Action,
    Answer,
    BackOff,
    DropCopy,
    Hold,
    Identities,
    Log,
    Mark,
    Model,
    Note,
    Reason,
    Remember,
    RetryLater,
    Serve,
    Serving,
    StartCopy,
    Want,
    Why,
)

INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR


@dataclass(frozen=True)
class Listing:
    """What the loop found at a model's source: its files' identities, or why there are none."""

    identities: Identities = ()
    size_bytes: int = 0
    missing: bool = False
    error: Why | None = None  # untrusted, or an error


@dataclass(frozen=True)
class Budget:
    """The readings admission weighs a copy against (invariant 5)."""

    store_free_bytes: int
    available_bytes: int
    floor_bytes: int
    paused: bool  # within the cooldown of a pressure event, or under the floor
    now: float
    cooldown_seconds: float
    store_others_bytes: int = 0  # what others fill the store with, which may be freed
    in_flight_bytes: int = 0  # what copies in flight took (of the store and MemAvailable)
    reserved_bytes: int = 0  # and have yet to take of what they were admitted for


def waiting_to_copy(model: Model) -> bool:
    return model.want and not model.held and model.serving is not Serving.NOTHING


def next_copies(models: Iterable[Model], workers: int) -> list[str]:
    """The models to admit next, in order, while fewer than `workers` (staging.workers) copies
    are in flight; a source that moved lately waits until it settles."""
    models = list(models)
    room = workers - sum(1 for m in models if m.job)
    waiting = policy.stage_order(
        policy.Candidate(m.name, m.settings.priority)
        for m in models
        if waiting_to_copy(m) and not m.job and m.changed_at is None
    )
    return waiting[: max(room, 0)]


def shares_a_copy_in_flight(listing: Listing, models: Iterable[Model]) -> bool:
    """A file that a copy in flight reads (the same blob in another revision or model) is
    waited for, then linked (Generations.copies): never held twice in RAM."""
    copying = {identity for m in models if m.job for _, identity in m.job.identities}
    return any(identity in copying for _, identity in listing.identities)


def fall_back(model: Model, why: Why, *, source_exists: bool) -> list[Action]:
    """The link goes to the source (or away, with no source); the RAM copy is then deleted."""
    actions: list[Action] = [DropCopy()] if model.job else []
    serving = Serving.SOURCE if source_exists else Serving.NOTHING
    return [*actions, Serve(serving), Note(why), Want(False), Answer(_told(why))]


def refuse(model: Model, why: Why, *, source_exists: bool) -> list[Action]:
    """A copy that cannot be made, or that failed: a verified version in RAM stays served (an
    update never replaces it with nothing), else the model falls back."""
    if model.serving is Serving.RAM:
        return [Note(why), Want(False), Answer(_told(why))]
    return fall_back(model, why, source_exists=source_exists)


def _told(why: Why) -> str:
    """What a waiter (`ramstage stage`) is told: the reason with its figures."""
    return units.reason(str(why), dict(why.figures))


def source_missing(model: Model) -> list[Action]:
    """A deleted source keeps being served from its verified copy; with no copy, the model has
    no link at all (a link to nothing would only move the error into the app)."""
    why = Why(Reason.SOURCE_MISSING)
    actions: list[Action] = [DropCopy()] if model.job else []
    if model.why != why:
        serves = (
            "serving the verified copy in RAM" if model.generation else "no link until it is back"
        )
        actions.append(Log(WARNING, f"source {model.source} is missing; {serves}"))
    actions += [Remember(None), Note(why), Want(False)]
    if model.serving is Serving.RAM:
        return [*actions, Answer(None)]
    return [*actions, Serve(Serving.NOTHING), Answer(str(why))]


def admit(model: Model, listing: Listing, budget: Budget) -> list[Action]:
    """Starts a copy, or says why not (refused if it would be even were the copies in flight
    called off; no actions, waiting for them, if it fits only before they take all they were
    admitted for). Within the cooldown of a pressure event nothing is staged on its own; an
    operator's explicit `stage` (a waiter) still is, as far as the floor allows."""
    if listing.missing:
        return source_missing(model)
    if listing.error is not None:
        warning = Log(WARNING, f"not staged ({listing.error})")
        # A verified copy stays: it was made from the source as it was then.
        refused = [warning, *refuse(model, listing.error, source_exists=True)]
        if listing.error.retry:  # a source that may answer again: tried again on its own
            backoff = policy.next_backoff(model.retry, budget.now, budget.cooldown_seconds)
            return [*refused, RetryLater(backoff)]
        return refused
    need, in_flight, reserved = listing.size_bytes, budget.in_flight_bytes, budget.reserved_bytes
    free, others = budget.store_free_bytes, budget.store_others_bytes
    available, floor = budget.available_bytes, budget.floor_bytes
    refusal = policy.admit(need, free + in_flight, others, available + in_flight, floor)
    # The figures explain the floor and the store; a refusal in the cooldown has none.
    shown = dict(need_bytes=need, store_free_bytes=free, available_bytes=available)
    figures = tuple({**shown, "floor_bytes": floor}.items()) if refusal else ()
    if refusal is None and budget.paused and not model.waiters:
        refusal = "pressure"
    if refusal is None and policy.admit(need, free - reserved, 0, available - reserved, floor):
        return []
    if refusal is None:
        why = Why(Reason.SOURCE_CHANGED) if model.serving is Serving.RAM else None
        log = Log(INFO, f"staging {units.size(need)} from {model.source}")
        return [StartCopy(listing.identities, need), Note(why), log]
    why = Why(Reason(refusal), figures=figures)
    message = (
        f"not staged ({refusal}): needs {units.size(need)}, store has {units.size(free)} free,"
        f" {units.size(available)} available, floor {units.size(floor)}"
    )
    actions: list[Action] = [Log(WARNING, message)]
    if model.serving is Serving.RAM:
        # too_large waits for the source to change; pressure for calm (to_resume), store_full
        # for room (Core.retry_when_room); the identities are forgotten so that the version
        # refused is the one copied then.
        actions.append(Remember(listing.identities if refusal == "too_large" else None))
    actions += refuse(model, why, source_exists=True)
    if refusal == "pressure":
        actions.append(back_off(model, budget.now, budget.cooldown_seconds))
    return actions


def back_off(model: Model, now: float, cooldown_seconds: float) -> BackOff:
    return BackOff(policy.next_backoff(model.backoff, now, cooldown_seconds))


def copied(model: Model, generation_id: str, identities: Identities) -> list[Action]:
    return [
        Serve(Serving.RAM, generation_id),
        Remember(identities),
        Note(None),
        Want(False),
        Answer(None),
        RetryLater(None),
    ]


def copy_failure(error: BaseException) -> Why | None:
    """What a failed copy means for the model; None: it was called off."""
    if isinstance(error, Cancelled):
        return None
    if isinstance(error, FileNotFoundError):
        return Why(Reason.SOURCE_MISSING)
    if isinstance(error, NoSpace):
        return Why(Reason.STORE_FULL)  # admitted, so something else took the room meanwhile
    if isinstance(error, Untrusted):
        return Why(Reason.UNTRUSTED, str(error))
    # A hung read, or EIO, may clear on its own: tried again after a backoff.
    retry = isinstance(error, SourceHung) or getattr(error, "errno", None) == errno.EIO
    return Why(Reason.ERROR, str(error), retry=retry)


def copy_failed(
    model: Model,
    why: Why | None,
    identities: Identities,
    now: float,
    cooldown_seconds: float,
    *,
    source_exists: bool,
) -> list[Action]:
    """why None: the copy was called off (its caller already decided what follows)."""
    if why is None:
        return []
    if why.reason is Reason.SOURCE_MISSING:
        return source_missing(model)
    if why.reason is Reason.STORE_FULL:
        return refuse(model, why, source_exists=source_exists)  # tried again once there is room
    if why.retry:  # tried again by to_resume once its retry backoff has run out
        retry = RetryLater(policy.next_backoff(model.retry, now, cooldown_seconds))
        return [*refuse(model, why, source_exists=source_exists), retry]
    # Not tried again on its own until this source version changes.
    return [Remember(identities), *refuse(model, why, source_exists=source_exists)]


def source_event(model: Model, now: float) -> list[Action]:
    """An event only starts the settle timer; a copy of a source in flux is called off."""
    if not model.job:
        return [Mark(now)]
    return [Mark(now), DropCopy(), Want(model.serving is not Serving.RAM)]


def rescan(model: Model, now: float, settle_seconds: float) -> list[Action]:
    """As if the source had sent an event a settle period ago."""
    return [Mark(now - settle_seconds)] if model.changed_at is None else []


def settled(model: Model, listing: Listing, *, writers: bool, now: float) -> list[Action]:
    """A source quiet for watch.settle: a new version is staged, unless no one has finished
    writing it or its files have the identities last seen (restic's rule)."""
    if listing.missing:
        return [Mark(None), *source_missing(model)]
    # An untrusted source is taken up like a changed one: admission refuses it, and says why.
    untrusted = listing.error is not None and listing.error.reason is Reason.UNTRUSTED
    if listing.error is not None and not untrusted:
        return [Mark(None), Log(WARNING, f"cannot list the source: {listing.error.detail}")]
    if writers:
        return [Mark(now)]
    current = listing.identities
    known = current == model.seen or (model.job and current == model.job.identities)
    if model.held or (known and not untrusted):
        return [Mark(None)]
    actions: list[Action] = [Mark(None), Log(INFO, "source changed; staging the new version")]
    if model.serving is Serving.NOTHING:
        actions += [Serve(Serving.SOURCE), Note(None)]
    elif model.serving is Serving.RAM:
        actions.append(Note(Why(Reason.SOURCE_CHANGED)))
    return [*actions, Want(True)]


def stage_requested(model: Model) -> tuple[bool, list[Action]]:
    """(already staged as asked, actions): the newest version there is, or could be, in RAM."""
    if model.serving is Serving.RAM and (
        model.why is None or model.why.reason is Reason.SOURCE_MISSING
    ):
        return True, [Hold(False)]
    return False, [Hold(False)] if model.job else [Hold(False), Want(True)]


def evict_requested(model: Model, *, source_exists: bool) -> list[Action]:
    """Stays on its source until `stage`, whatever memory does."""
    return [*fall_back(model, Why(Reason.EVICTED), source_exists=source_exists), Hold(True)]


def verify_failed(model: Model, generation_id: str, *, source_exists: bool) -> list[Action]:
    if model.serving is not Serving.RAM or model.generation != generation_id:
        return []  # replaced since: its successor was verified when it was made
    why = Why(Reason.ERROR, "verify failed, staging again")
    log = Log(ERROR, f"generation {generation_id} no longer matches its digest")
    return [log, *fall_back(model, why, source_exists=source_exists), Want(True)]


def pressure_cancel(
    model: Model, now: float, cooldown_seconds: float, *, source_exists: bool
) -> list[Action]:
    """A copy in flight goes first under pressure: RAM that no reader uses yet. A version in RAM
    stays served (the eviction order weighs it), and the next rescan tries the update again."""
    actions = refuse(model, Why(Reason.PRESSURE), source_exists=source_exists)
    if model.serving is Serving.RAM:
        actions.insert(0, DropCopy())  # fall_back calls the copy off itself
    return [*actions, back_off(model, now, cooldown_seconds)]


def pressure_evict(
    model: Model, now: float, cooldown_seconds: float, *, source_exists: bool
) -> list[Action]:
    why = Why(Reason.PRESSURE)
    backoff = back_off(model, now, cooldown_seconds)
    return [*fall_back(model, why, source_exists=source_exists), backoff]


def to_resume(models: Iterable[Model], now: float, *, calm: bool) -> str | None:
    """Once memory is calm (policy.may_resume), one model evicted or refused for pressure goes
    back to pending, the highest priority first, unless another copy is wanted or running or its
    backoff has not run out. That includes a model whose update was refused for pressure while
    it kept serving the older version from RAM, and one whose copy failed for a fault that may
    clear (Why.retry), once its retry backoff has run out."""
    models = list(models)
    busy = any(m.job or waiting_to_copy(m) for m in models)
    if busy or not calm:
        return None
    return policy.next_to_stage(
        policy.Candidate(m.name, m.settings.priority) for m in models if not m.held and _due(m, now)
    )


def _due(model: Model, now: float) -> bool:
    if model.why == Why(Reason.PRESSURE):
        wait = model.backoff
    elif model.why is not None and model.why.retry:
        wait = model.retry
    else:
        return False
    return wait is None or wait.not_before <= now


def resume() -> list[Action]:
    return [Note(None), Want(True)]


def adopted(generation_id: str, identities: Identities) -> list[Action]:
    return [Serve(Serving.RAM, generation_id), Remember(identities), Want(False)]


def placed(model: Model, *, source_exists: bool) -> list[Action]:
    """A model just configured, with nothing in RAM: its link on the source, or no link."""
    return [Serve(Serving.SOURCE)] if source_exists else source_missing(model)


def unreachable(model: Model, error: OSError) -> list[Action]:
    """A source that cannot be reached (a disconnected or hung mount) served nothing instead:
    the reason names the error, and the next look that reaches it stages it again."""
    why = Why(Reason.ERROR, f"source unreachable: {error}")
    return [Log(WARNING, f"{why}; no link until it answers"), Note(why), Remember(None)]


def source_replaced(model: Model, *, source_exists: bool) -> list[Action]:
    """A reload gave the model another source, digest or validation: it is staged afresh. As
    with a source update, a verified copy in RAM is served until the new one replaces it; a
    new source that is not there leaves nothing to wait for."""
    if model.serving is Serving.RAM and source_exists:
        drop: list[Action] = [DropCopy()] if model.job else []
        return [*drop, Remember(None), Note(Why(Reason.SOURCE_CHANGED)), Want(True)]
    actions = fall_back(model, Why(Reason.SOURCE_CHANGED), source_exists=source_exists)
    return [*actions, Want(True)] if source_exists else actions


def released(model: Model, outcome: str, *, source_exists: bool) -> list[Action]:
    """Stopping, or removed from the config: the link on the source (or gone), RAM freed."""
    actions: list[Action] = [DropCopy()] if model.job else []
    serving = Serving.SOURCE if source_exists else Serving.NOTHING
    return [*actions, Serve(serving), Answer(outcome)]


def expected_link(
    model: Model, generation_target: Path | None, *, source_exists: bool
) -> Path | None:
    """Where the link belongs: the verified generation, else the source, else nowhere."""
    if model.serving is Serving.RAM:
        return generation_target
    return model.source if source_exists else None


def ready(models: Iterable[Model], mode: str) -> bool:
    """`ready: links` is ready once every link exists (at start); `ready: staged` once every
    model is staged or has a reason not to be."""
    return mode != "staged" or not any(
        waiting_to_copy(m) or m.job for m in models if m.serving is not Serving.RAM
    )
