"""Memory relief: under pressure, gives RAM back in policy order, reading MemAvailable again
after every eviction (earlyoom's rule: look again before anything destructive); when memory is
calm again, lets one model at a time be staged again.

memwatch.py only posts Pressure events; policy.py and lifecycle.py decide; the actuator acts
(the link to the source first, then the generation deleted).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Mapping
from typing import Callable

from ramstage import lifecycle, policy, units
from ramstage.config import MemoryConfig
from ramstage.generations import Generations
from ramstage.holders import FileKey, holders
from ramstage.links import LinkError
from ramstage.memwatch import PressureWatcher
from ramstage.model import Action, Event, Model, Pressure, Serving
from ramstage.reach import Reach
from ramstage.store import Generation
from ramstage.system import System

log = logging.getLogger("ramstage")


def last_used(generation: Generation, held: Collection[FileKey]) -> float:
    """Last use, as far as it can be told cheaply: the newest of when the generation was
    published (its manifest's atime), its files' atime (tmpfs mounts relatime: the first read
    after staging, then at most daily), and now (math.inf) if some process holds it open or
    mapped at this moment. A reader that opened, read and closed in between is seen only
    through atime."""
    if any(key in held for key in generation.file_keys):
        return math.inf
    manifest = generation.path.parent / f"{generation.id}.json"
    try:
        return max(os.stat(path).st_atime for path in [manifest, *generation.file_paths()])
    except OSError:
        return 0.0


class Relief:
    def __init__(
        self,
        memory: MemoryConfig,
        system: System,
        reach: Reach,
        generations: Generations,
        apply: Callable[[Model, list[Action]], None],
        post: Callable[[Event], None],
    ) -> None:
        self.memory, self.system, self.generations = memory, system, generations
        self.reach = reach
        self.apply, self.post = apply, post
        self.watcher: PressureWatcher | None = None
        self.last_pressure_at: float | None = None  # monotonic; None: no pressure seen yet
        self._nothing_to_evict = False  # said once per episode, not at every reading

    def watch(self, memory: MemoryConfig) -> None:
        """Starts (or, after a reload, restarts) the watcher for these settings."""
        self.memory = memory
        self.stop()
        self.watcher = PressureWatcher(memory, self.system, self.post)
        self.watcher.start()

    def stop(self) -> None:
        if self.watcher:
            self.watcher.stop()

    def since_pressure(self, last_pressure_at: float | None) -> float | None:
        return None if last_pressure_at is None else self.system.monotonic() - last_pressure_at

    def paused(self) -> bool:
        """Within the cooldown of a pressure event, or under the floor: nothing is staged on
        its own."""
        return policy.under_pressure(
            self.system.available_bytes(),
            self.memory.min_available_bytes,
            self.since_pressure(self.last_pressure_at),
            self.memory.effective_cooldown_seconds,
        )

    def relieve(self, event: Pressure, models: Mapping[str, Model]) -> None:
        now = self.last_pressure_at = self.system.monotonic()
        floor = self.memory.min_available_bytes
        available = self.system.available_bytes()  # the event's reading may be stale already
        # The fast loader's idle ring files go first: they only make a next first load faster.
        freed = self.generations.store.prune_rings()
        if freed:
            log.info("memory pressure (%s): freed %s of idle rings", event.kind, units.size(freed))
            available = self.system.available_bytes()
        evicted = 0
        # Copies in flight go first, the lowest priority first: RAM that no reader uses yet.
        copying = sorted(
            (m for m in models.values() if m.job), key=lambda m: (m.settings.priority, m.name)
        )
        for model in copying:
            if not policy.keep_evicting(available, floor, event.kind, evicted):
                break
            available = self._cancel(model, event.kind, available, now)
            evicted += 1
        # The order costs a walk over /proc (who holds what): only when something must go.
        keep = policy.keep_evicting(available, floor, event.kind, evicted)
        for name in self._eviction_order(models) if keep else []:
            if not policy.keep_evicting(available, floor, event.kind, evicted):
                break
            try:
                available = self._evict(models[name], event.kind, available)
            except LinkError as error:
                log.error("%s: cannot be evicted for memory pressure: %s", name, error)
                continue  # it keeps serving RAM; the next may be freed
            evicted += 1
        stuck = not evicted and policy.keep_evicting(available, floor, event.kind, evicted)
        if stuck and not self._nothing_to_evict:
            log.warning(
                "memory pressure (%s): %s available, floor %s, nothing left to evict"
                " (%s pinned by readers)",
                event.kind,
                units.size(available),
                units.size(floor),
                units.size(sum(sum(keys.values()) for keys in self.generations.retired.values())),
            )
        self._nothing_to_evict = stuck

    def _cancel(self, model: Model, trigger: str, available: int, now: float) -> int:
        """Returns MemAvailable read again, with what the copy took counted as freed: its
        partial is deleted once its thread has stopped (Core.job_done), moments later."""
        assert model.job is not None
        taken = self.generations.store.partial_bytes(model.job.partial)
        floor, cooldown = self.memory.min_available_bytes, self.memory.effective_cooldown_seconds
        log.warning(
            "%s: copy cancelled for memory pressure (%s): %s available, floor %s",
            model.name,
            trigger,
            units.size(available),
            units.size(floor),
        )
        exists = self.reach.exists(model.source)
        self.apply(model, lifecycle.pressure_cancel(model, now, cooldown, source_exists=exists))
        return self.system.available_bytes() + taken

    def _eviction_order(self, models: Mapping[str, Model]) -> list[str]:
        resident = [
            (m, g)
            for m in models.values()
            if m.serving is Serving.RAM and (g := self.generations.current(m.name))
        ]
        held = holders(self.system.proc, {key for _, g in resident for key in g.file_keys})
        return policy.eviction_order(
            policy.Resident(m.name, m.settings.priority, last_used(g, held), g.manifest.size_bytes)
            for m, g in resident
        )

    def _evict(self, model: Model, trigger: str, available_before: int) -> int:
        """Returns MemAvailable read again afterwards. Only bytes no reader holds count as
        freed."""
        generation = self.generations.current(model.name)
        assert generation is not None
        now, cooldown = self.system.monotonic(), self.memory.effective_cooldown_seconds
        problem = self.reach.problem(model.source)
        exists = problem is None
        self.apply(model, lifecycle.pressure_evict(model, now, cooldown, source_exists=exists))
        if problem is not None and not isinstance(problem, FileNotFoundError):
            self.apply(model, lifecycle.unreachable(model, problem))
        retired = self.generations.retired.get(model.name, {})
        pinned = sum(size for key, size in retired.items() if key in generation.file_keys)
        available = self.system.available_bytes()
        backoff = model.backoff
        assert backoff is not None
        log.warning(
            "%s: evicted for memory pressure (%s): available %s -> %s, floor %s; freed %s,"
            " %s pinned by readers; staged again no sooner than %.1fs from now"
            " (eviction %d in a row)",
            model.name,
            trigger,
            units.size(available_before),
            units.size(available),
            units.size(self.memory.min_available_bytes),
            units.size(generation.manifest.size_bytes - pinned),
            units.size(pinned),
            backoff.delay_seconds,
            backoff.count,
        )
        return available

    def resume(self, models: Mapping[str, Model]) -> None:
        memory = self.memory
        available = self.system.available_bytes()
        since = self.since_pressure(self.last_pressure_at)
        calm = policy.may_resume(
            available, memory.resume_available_bytes, since, memory.effective_cooldown_seconds
        )
        name = lifecycle.to_resume(models.values(), self.system.monotonic(), calm=calm)
        if name is None:
            return
        self.apply(models[name], lifecycle.resume())
        log.info(
            "%s: staging again: %s available >= resume %s, no pressure for %s",
            name,
            units.size(available),
            units.size(memory.resume_available_bytes),
            "ever" if since is None else f"{since:.1f}s",
        )
