"""`status --json`: a snapshot the loop takes of its models, and the answer built from it.

The loop publishes a fresh snapshot after every event; the control thread answers from the
latest one, adding what is cheap to read fresh (store usage, memory, who holds which file).
A model's `state` is derived from what its link serves (model.phase): one in RAM is `staged`
even while a newer version is copied, which its `reason` and `progress` then tell.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ramstage import __version__, links, policy
from ramstage.config import MemoryConfig
from ramstage.errors import NotFound
from ramstage.generations import Generations
from ramstage.holders import FileKey, holders
from ramstage.memwatch import psi_avg10
from ramstage.model import Backoff, Model, Serving, Work, phase
from ramstage.store import Store
from ramstage.system import System


@dataclass(frozen=True)
class Snapshot:
    models: tuple[dict[str, Any], ...] = ()
    last_pressure_at: float | None = None  # monotonic
    # Per model: the files its link points at, and files no link points at that a reader may
    # still hold (deleted, or swapped out and in their grace period).
    current: dict[str, dict[FileKey, int]] = field(default_factory=dict)
    unlinked: dict[str, dict[FileKey, int]] = field(default_factory=dict)
    watch_problems: tuple[str, ...] = ()  # why watching sources is degraded, if it is
    wanted_since: dict[str, float | None] = field(default_factory=dict)  # monotonic


def work_entry(work: Work | None, now: float) -> dict[str, Any] | None:
    """A copy or verify in flight: bytes done of the total, and the rate so far."""
    if work is None:
        return None
    seconds = max(now - work.started_at, 0.0)
    return {
        "done_bytes": work.done_bytes,
        "total_bytes": work.total_bytes,
        "seconds": seconds,
        "rate_bytes_per_second": work.done_bytes / seconds if seconds > 0 else None,
        "files_done": work.files_done,
        "files_total": work.files_total,
    }


def _retry(retry: Backoff | None, now: float) -> dict[str, Any] | None:
    """A copy failed for a fault that may clear: failures in a row, and when it is tried again
    (once memory is calm and no other copy runs)."""
    if retry is None:
        return None
    return {
        "failures": retry.count,
        "backoff_seconds": retry.delay_seconds,
        "due_in_seconds": max(retry.not_before - now, 0.0),
    }


def model_entry(model: Model, generations: Generations, now: float) -> dict[str, Any]:
    generation = generations.current(model.name)
    manifest = generation.manifest if generation else None
    in_ram = model.serving is Serving.RAM
    figures = dict(model.why.figures) if model.why and model.why.figures else None
    return {
        "name": model.name,
        "state": phase(model).value,
        "link": str(model.link),
        "target": links.read(model.link),
        "source": str(model.source),
        "size_bytes": manifest.size_bytes if manifest else None,
        "digest": manifest.digest if manifest else None,
        "generation": generation.id if generation else None,
        "reason": None if model.why is None else str(model.why),
        "reason_figures": figures,
        # The copy's progress: 1 once it is done, 0 while a copy is wanted and not started.
        "progress": model.job.progress
        if model.job
        else (1.0 if in_ram and not model.want else 0.0),
        "priority": model.settings.priority,
        "pressure_evictions": model.backoff.count if model.backoff else 0,
        "backoff_seconds": model.backoff.delay_seconds if model.backoff else None,
        "retry": _retry(model.retry, now),
        "skipped": list(manifest.skipped) if manifest else [],
        "copies": model.tally.copies,
        "last_copy_seconds": model.tally.last_copy_seconds,
        "last_copy_bytes": model.tally.last_copy_bytes,
        "evictions": dict(model.tally.evictions),
        "verify_failures": model.tally.verify_failures,
        "staged_at": manifest.staged_at if manifest else None,
        "copy_seconds": manifest.copy_seconds if manifest else None,
        "copy": work_entry(model.job.work if model.job else None, now),
    }


def snapshot(
    models: Iterable[Model],
    generations: Generations,
    last_pressure_at: float | None,
    watch_problems: Iterable[str] = (),
    *,
    previous: Snapshot,
    now: float,
    wall: float,
) -> Snapshot:
    """`since` (wall-clock) carries over from the previous snapshot while the state holds."""
    models = list(models)
    before = {entry["name"]: entry for entry in previous.models}
    current = {}
    for model in models:
        generation = generations.current(model.name)
        current[model.name] = dict(generation.file_keys) if generation else {}
    return Snapshot(
        models=tuple(_since(model_entry(m, generations, now), before, wall) for m in models),
        last_pressure_at=last_pressure_at,
        current=current,
        unlinked={m.name: generations.pinned_candidates(m.name) for m in models},
        watch_problems=tuple(watch_problems),
        wanted_since={m.name: m.tally.wanted_since for m in models},
    )


def _since(entry: dict[str, Any], before: dict[str, dict[str, Any]], wall: float) -> dict[str, Any]:
    old = before.get(entry["name"])
    return {**entry, "since": old["since"] if old and old["state"] == entry["state"] else wall}


def memory_status(
    memory: MemoryConfig,
    system: System,
    since_pressure: float | None,
    pinned_bytes: int,
    psi_trigger: str | None,
) -> dict[str, Any]:
    """The `memory` object of `status --json`."""
    available = system.available_bytes()
    return {
        "available_bytes": available,
        "min_available_bytes": memory.min_available_bytes,
        "resume_available_bytes": memory.resume_available_bytes,
        "pressure": policy.under_pressure(
            available,
            memory.min_available_bytes,
            since_pressure,
            memory.effective_cooldown_seconds,
        ),
        "psi_avg10": psi_avg10(system),
        "psi_trigger": psi_trigger,
        "cooldown_seconds": memory.effective_cooldown_seconds,
        "seconds_since_pressure": since_pressure,
        "pinned_bytes": pinned_bytes,
    }


def render(
    taken: Snapshot,
    name: str | None,
    *,
    store: Store,
    system: System,
    memory: MemoryConfig,
    psi_trigger: str | None,
    verifying: dict[str, Work],
    config_path: Path,
) -> dict[str, Any]:
    """Runs in the control thread: the snapshot's models plus fresh readings."""
    models = list(taken.models)
    if name is not None:
        models = [m for m in models if m["name"] == name]
        if not models:
            raise NotFound(f"no model named {name} in {config_path}")
    names = [m["name"] for m in models]
    wanted = {k for n in names for k in [*taken.current[n], *taken.unlinked[n]]}
    held = holders(system.proc, wanted)
    size, used = store.fs.usage()
    result = []
    now = system.monotonic()
    for entry in models:
        current, unlinked = taken.current[entry["name"]], taken.unlinked[entry["name"]]
        pinned = {k: v for k, v in unlinked.items() if k in held}
        users = set().union(*(held[k] for k in [*current, *pinned] if k in held))
        wanted_since = taken.wanted_since[entry["name"]]
        stale = 0.0 if wanted_since is None else now - wanted_since
        result.append(
            {
                **entry,
                "pinned_bytes": sum(pinned.values()),
                "users": sorted(users),
                "stale_seconds": stale,
                "verify": work_entry(verifying.get(entry["name"]), now),
                "holders": [{"pid": pid, "command": command(system, pid)} for pid in sorted(users)],
            }
        )
    since = None if taken.last_pressure_at is None else now - taken.last_pressure_at
    return {
        "version": __version__,
        "pid": os.getpid(),
        "store": {
            "path": str(store.path),
            "mounted": store.fs.mounted,
            "size_bytes": size,
            "used_bytes": used,
            "swappable": store.fs.swappable,
        },
        "rings": rings_status(store),
        "memory": memory_status(
            memory, system, since, sum(m["pinned_bytes"] for m in result), psi_trigger
        ),
        # Degraded: some source changes are seen only by the periodic rescan.
        "watch": {"degraded": bool(taken.watch_problems), "problems": list(taken.watch_problems)},
        "models": result,
    }


def rings_status(store: Store) -> dict[str, Any] | None:
    """The tmpfs of the fast loader's ring files, where ramstage mounted one: RAM the
    applications' GPU loads keep between processes, freed first under pressure; else None."""
    if not store.rings_ours:
        return None
    size, used = store.rings.usage()
    return {"path": str(store.rings.path), "size_bytes": size, "used_bytes": used}


def command(system: System, pid: int) -> str | None:
    """The holder's command name (proc(5) comm); None once it has exited."""
    try:
        return (system.proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return None
