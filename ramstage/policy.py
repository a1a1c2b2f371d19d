"""Pure decisions: whether a copy may be made, which model to stage next, which to give back
under memory pressure, when to come back, and what a reload changes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ramstage.model import Backoff

# A model evicted again and again waits base * 2**(n-1), up to this long, before it is staged
# again: a copy that is thrown away under pressure cost a full read of the source for nothing.
BACKOFF_CAP_SECONDS = 600.0
# ...and starts over from one once it has gone this long (or 4 delays) without an eviction.
BACKOFF_RESET_SECONDS = 60.0


@dataclass(frozen=True)
class Candidate:
    name: str
    priority: int


@dataclass(frozen=True)
class Resident:
    """A model whose copy is in RAM (or being made), as the eviction order sees it."""

    name: str
    priority: int
    last_used: float  # larger is more recent; math.inf: some process holds it right now
    size_bytes: int


def admit(
    need_bytes: int,
    store_free_bytes: int,
    store_others_bytes: int,
    available_bytes: int,
    floor_bytes: int,
) -> str | None:
    """None when a copy of need_bytes fits, else the reason it does not: `too_large` when the
    store has no room for it beside ramstage's own copies, `store_full` when it would have but
    for what others fill it with (store_others_bytes: their files, deleted files still held),
    which may be freed any time; `pressure` when it would take MemAvailable under the floor
    (invariant 5)."""
    if need_bytes > store_free_bytes:
        return "store_full" if need_bytes <= store_free_bytes + store_others_bytes else "too_large"
    if available_bytes - need_bytes < floor_bytes:
        return "pressure"
    return None


def stage_order(waiting: Iterable[Candidate]) -> list[str]:
    """The highest priority first; equal priorities in name order, so the plan is stable."""
    return [c.name for c in sorted(waiting, key=lambda c: (-c.priority, c.name))]


def next_to_stage(waiting: Iterable[Candidate]) -> str | None:
    ordered = stage_order(waiting)
    return ordered[0] if ordered else None


def eviction_order(residents: Iterable[Resident]) -> list[str]:
    """Lowest priority first, then least recently used, then largest (frees most at once);
    names break the last ties so the order is stable."""
    ordered = sorted(residents, key=lambda r: (r.priority, r.last_used, -r.size_bytes, r.name))
    return [r.name for r in ordered]


def keep_evicting(available_bytes: int, floor_bytes: int, trigger: str, evicted: int) -> bool:
    """Under the floor: go on. A stall reported by PSI (or systemd's channel) with MemAvailable
    still above the floor costs one model, not all: reclaim is already hurting latencies, but
    PSI alone misjudges how much memory is short (nohang #25)."""
    return available_bytes < floor_bytes or (trigger != "floor" and evicted == 0)


def under_pressure(
    available_bytes: int,
    floor_bytes: int,
    since_pressure_seconds: float | None,
    cooldown_seconds: float,
) -> bool:
    return available_bytes < floor_bytes or (
        since_pressure_seconds is not None and since_pressure_seconds < cooldown_seconds
    )


def may_resume(
    available_bytes: int,
    resume_bytes: int,
    since_pressure_seconds: float | None,
    cooldown_seconds: float,
) -> bool:
    """Hysteresis: evict under min_available, stage again only at resume_available and after a
    quiet cooldown, so one reading near the floor cannot make a model flap."""
    quiet = since_pressure_seconds is None or since_pressure_seconds >= cooldown_seconds
    return available_bytes >= resume_bytes and quiet


def next_backoff(previous: Backoff | None, now: float, base_seconds: float) -> Backoff:
    """The wait before a model evicted (or refused) for pressure at `now` may come back; the
    same for one whose copy failed at `now` for a fault that may clear (EIO, a hung read)."""
    count = 1
    if previous is not None and now - previous.at <= max(
        BACKOFF_RESET_SECONDS, 4 * previous.delay_seconds
    ):
        count = previous.count + 1
    delay = min(base_seconds * 2 ** (count - 1), BACKOFF_CAP_SECONDS)
    return Backoff(count, now, delay)


@dataclass(frozen=True)
class ReloadPlan:
    removed: tuple[str, ...]
    added: tuple[str, ...]
    replaced: tuple[str, ...]  # another source, digest or validation
    kept: tuple[str, ...]


def reload_plan(
    old: Mapping[str, tuple[object, ...]], new: Mapping[str, tuple[object, ...]]
) -> ReloadPlan:
    """old and new map each model's name to what, when it changes, means copying again."""
    return ReloadPlan(
        removed=tuple(sorted(old.keys() - new.keys())),
        added=tuple(n for n in new if n not in old),
        replaced=tuple(n for n in new if n in old and old[n] != new[n]),
        kept=tuple(n for n in new if n in old and old[n] == new[n]),
    )
