"""Memory pressure: give RAM back before anything else has to suffer, take it again when calm.

The watcher (pressure.py) only posts events; the decisions are policy.py's pure functions; the
acting is catalog.fall_back (link to the source first, then the generation deleted).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from ramstage import policy
from ramstage.config import MemoryConfig
from ramstage.pressure import Pressure, PressureWatcher, last_used, memory_status
from ramstage.state import Model
from ramstage.system import System
from ramstage.users import holders

log = logging.getLogger("ramstage")


class MemoryGuard:
    def __init__(
        self,
        memory: MemoryConfig,
        system: System,
        post: Callable[[Pressure], None],
        fall_back: Callable[[Model, str], None],
    ) -> None:
        self.memory, self.system, self.post, self.fall_back = memory, system, post, fall_back
        self.watcher: PressureWatcher | None = None
        self.last_pressure_at: float | None = None  # monotonic; None: no pressure seen yet
        self.backoffs: dict[str, policy.Backoff] = {}
        self._nothing_to_evict = False  # said once per episode, not at every reading

    def stop(self) -> None:
        if self.watcher:
            self.watcher.stop()

    def watch(self, memory: MemoryConfig) -> None:
        """Starts (or, after a reload, restarts) the watcher for these settings."""
        self.memory = memory
        self.stop()
        self.watcher = PressureWatcher(memory, self.system, self.post, os.environ)
        self.watcher.start()

    def since_pressure(self, last_pressure_at: float | None) -> float | None:
        return None if last_pressure_at is None else self.system.monotonic() - last_pressure_at

    def refusal(self, model: Model) -> str | None:
        """Within the cooldown of a pressure event nothing is staged on its own; an operator's
        explicit `stage` (a waiter) still is, as far as admit's floor allows."""
        memory = self.memory
        paused = policy.under_pressure(
            self.system.available_bytes(),
            memory.min_available_bytes,
            self.since_pressure(self.last_pressure_at),
            memory.effective_cooldown_seconds,
        )
        return "pressure" if paused and not model.waiters else None

    def relieve(self, event: Pressure, models: dict[str, Model]) -> None:
        """Gives RAM back in policy order, looking at MemAvailable again after every eviction
        (earlyoom's rule: re-read before anything destructive), until it is above the floor."""
        self.last_pressure_at = self.system.monotonic()
        floor = self.memory.min_available_bytes
        available = self.system.available_bytes()  # the event's reading may be stale already
        evicted = 0
        copying = next((m for m in models.values() if m.job), None)
        if copying and policy.keep_evicting(available, floor, event.kind, evicted):
            # A copy in progress goes first: RAM that no reader uses yet.
            log.warning(
                "%s: copy cancelled for memory pressure (%s): MemAvailable %d, floor %d",
                copying.config.name,
                event.kind,
                available,
                floor,
            )
            self.fall_back(copying, "pressure")
            self.back_off(copying)
            evicted += 1
            available = self.system.available_bytes()
        # The order costs a walk over /proc (who holds what): only when something must go.
        order = (
            self._eviction_order(models)
            if policy.keep_evicting(available, floor, event.kind, evicted)
            else []
        )
        for name in order:
            if not policy.keep_evicting(available, floor, event.kind, evicted):
                break
            available = self._evict(models[name], event.kind, available)
            evicted += 1
        if evicted or not policy.keep_evicting(available, floor, event.kind, evicted):
            self._nothing_to_evict = False  # the episode is over, or something could be done
        else:
            if not self._nothing_to_evict:
                log.warning(
                    "memory pressure (%s): MemAvailable %d, floor %d, nothing left to evict"
                    " (%d bytes pinned by readers)",
                    event.kind,
                    available,
                    floor,
                    sum(sum(m.retired.values()) for m in models.values()),
                )
            self._nothing_to_evict = True

    def _eviction_order(self, models: dict[str, Model]) -> list[str]:
        staged = [
            (m.config, g) for m in models.values() if m.state == "staged" and (g := m.generation)
        ]
        held = holders(self.system.proc, {key for _, g in staged for key in g.file_keys})
        return policy.eviction_order(
            policy.Resident(c.name, c.priority, last_used(g, held), g.manifest.size_bytes)
            for c, g in staged
        )

    def _evict(self, model: Model, trigger: str, available_before: int) -> int:
        """Link to the source, then the generation deleted (_fall_back); returns MemAvailable
        read again afterwards. Only bytes no reader holds count as freed."""
        generation = model.generation
        assert generation is not None
        self.fall_back(model, "pressure")
        pinned = sum(size for key, size in model.retired.items() if key in generation.file_keys)
        backoff = self.back_off(model)
        available = self.system.available_bytes()
        log.warning(
            "%s: evicted for memory pressure (%s): MemAvailable %d -> %d, floor %d; freed %d"
            " bytes, %d pinned by readers; staged again no sooner than %.1fs from now"
            " (eviction %d in a row)",
            model.config.name,
            trigger,
            available_before,
            available,
            self.memory.min_available_bytes,
            generation.manifest.size_bytes - pinned,
            pinned,
            backoff.delay_seconds,
            backoff.count,
        )
        return available

    def back_off(self, model: Model) -> policy.Backoff:
        name = model.config.name
        backoff = policy.next_backoff(
            self.backoffs.get(name),
            self.system.monotonic(),
            self.memory.effective_cooldown_seconds,
        )
        self.backoffs[name] = backoff
        return backoff

    def resume(self, models: dict[str, Model]) -> None:
        """When memory is calm again, one model evicted (or refused) for pressure goes back to
        pending, the highest priority first; _start checks its budget again."""
        waiting = [
            m
            for m in models.values()
            if m.state == "fallback" and m.reason == "pressure" and not m.held
        ]
        busy = any(m.job or (m.state == "pending" and not m.held) for m in models.values())
        if not waiting or busy:
            return
        memory = self.memory
        available, since = (
            self.system.available_bytes(),
            self.since_pressure(self.last_pressure_at),
        )
        if not policy.may_resume(
            available, memory.resume_available_bytes, since, memory.effective_cooldown_seconds
        ):
            return
        now = self.system.monotonic()
        name = policy.next_to_stage(
            policy.Candidate(m.config.name, m.config.priority)
            for m in waiting
            if m.config.name not in self.backoffs or self.backoffs[m.config.name].not_before <= now
        )
        if name is None:
            return
        model = models[name]
        model.state, model.reason = "pending", None
        log.info(
            "%s: staging again: MemAvailable %d >= resume %d, no pressure for %s",
            name,
            available,
            memory.resume_available_bytes,
            "ever" if since is None else f"{since:.1f}s",
        )

    def fields(self, model: Model) -> dict[str, Any]:
        backoff = self.backoffs.get(model.config.name)
        return {
            "pressure_evictions": backoff.count if backoff else 0,
            "backoff_seconds": backoff.delay_seconds if backoff else None,
        }

    def status(self, pinned_bytes: int, last_pressure_at: float | None) -> dict[str, Any]:
        """Runs in the control thread, like status()."""
        since = self.since_pressure(last_pressure_at)
        return memory_status(self.memory, self.system, since, pinned_bytes)
