"""Pure decisions: whether a copy may be made, and which model to stage next."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    name: str
    priority: int


def admit(
    need_bytes: int, store_free_bytes: int, available_bytes: int, floor_bytes: int
) -> str | None:
    """None when a copy of need_bytes fits, else the reason it does not: the store has no room
    for it, or it would take MemAvailable under the floor (invariant 5)."""
    if need_bytes > store_free_bytes or available_bytes - need_bytes < floor_bytes:
        return "too_large"
    return None


def next_to_stage(waiting: Iterable[Candidate]) -> str | None:
    """The highest priority first; equal priorities in name order, so the plan is stable."""
    ordered = sorted(waiting, key=lambda c: (-c.priority, c.name))
    return ordered[0].name if ordered else None
