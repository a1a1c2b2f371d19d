"""The daemon: the composition root and the one event loop that owns all state.

Signal handlers, the control socket thread, the watchers and the copy worker only put events on
the queue; the loop gathers facts, lets lifecycle.py decide, and applies the actions. `status`
is answered from the snapshot the loop publishes after every turn, so it never waits for it.
"""

from __future__ import annotations

import logging
import queue
import signal
from pathlib import Path
from typing import Any

from ramstage import lifecycle
from ramstage.actuator import Actuator
from ramstage.config import Config, load_config, trust_warnings
from ramstage.control import ControlServer
from ramstage.core import Core
from ramstage.errors import RamstageError
from ramstage.eviction import Relief
from ramstage.generations import Generations
from ramstage.instance import Evictions, only_one
from ramstage.metrics import Metrics
from ramstage.model import (
    Event,
    JobDone,
    Model,
    Pressure,
    Reload,
    Request,
    Rescan,
    Serving,
    SourceEvent,
    Stop,
    Sync,
    VerifyFailed,
)
from ramstage.reach import Reach
from ramstage.requests import Requests
from ramstage.service import Notifier
from ramstage.status import Snapshot, render, snapshot
from ramstage.store import Store
from ramstage.system import System
from ramstage.updates import SourceUpdates

log = logging.getLogger("ramstage")
EXTEND_TIMEOUT_USEC = 30_000_000
PRUNE_INTERVAL_SECONDS = 5.0  # forget unpinned files, put back links
STORE_CHECK_SECONDS = 0.5  # is the store's tmpfs still mounted?


class Daemon:
    def __init__(
        self, config_path: Path, config: Config, system: System, notifier: Notifier
    ) -> None:
        self.system, self.notifier = system, notifier
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        post = self.events.put
        store = Store(config.store, system)
        generations = Generations(store, system)
        actuator = Actuator(generations, post, config.checksum, config.staging.workers)
        models: dict[str, Model] = {}
        reach = Reach()  # every look at a source, with a deadline
        relief = Relief(config.memory, system, reach, generations, actuator.apply, post)
        updates = SourceUpdates(
            config.watch,
            system,
            reach,
            models,
            actuator.apply,
            post,
            config_path,
        )
        self.core = Core(
            config_path,
            config,
            system,
            reach,
            store,
            generations,
            actuator,
            relief,
            updates,
            models,
        )
        self.requests = Requests(self.core, notifier, post, self.status)
        self.control: ControlServer | None = None
        self.metrics = Metrics(config.metrics, self.status)
        self.snapshot = Snapshot()
        self.ready_sent = False
        self.evictions = Evictions(config)  # the operator's, kept for the next start
        self.stopping = False
        # Periodic work, by name: the next monotonic time it is due. The other timers live on
        # the records (settle, backoff) and in the generations (grace periods).
        self.due: dict[str, float] = {}

    # ---- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        core, post = self.core, self.events.put
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: post(Stop(signum)))
        signal.signal(signal.SIGHUP, lambda signum, frame: post(Reload()))
        for problem in core.source_problems(core.config) + trust_warnings(core.config):
            log.warning("%s", problem)
        core.store.open()
        for warning in core.store.fs.warnings():  # the store as mounted
            log.warning("%s", warning)
        core.place_all(self.evictions.load())
        core.updates.start()
        core.relief.watch(core.config.memory)
        self._publish_snapshot()  # before the socket opens: no status without the models
        self.control = ControlServer(core.config.socket, self.requests.answer)
        self.control.start()
        self.metrics.start()
        log.info(
            "ready: %d models, every link in place under %s",
            len(core.models),
            core.config.links_dir,
        )
        self._every("rescan", core.config.watch.rescan_seconds)
        while not self.stopping:
            try:
                self._turn()
            except Exception:
                # A bug or an unexpected OS error costs this one turn, not the daemon: the
                # invariants hold at every step, and the next turn looks at everything again.
                log.exception("internal error in the event loop; carrying on")
        self._shutdown()
        return 0

    def _turn(self) -> None:
        core = self.core
        core.updates.settle()
        core.relief.resume(core.models)
        core.schedule(self.stopping)
        self._maybe_ready()
        self._publish_snapshot()
        self.notifier.watchdog()
        # Timed work runs every turn, not only when the queue is idle: a steady stream of
        # events (pressure readings every 0.25 s) must not hold back freeing outgoing copies.
        self._tick()
        try:
            event = self.events.get(timeout=self._wait_seconds())
        except queue.Empty:
            return
        self._handle(event)
        self._publish_snapshot()  # what the event changed, before the next turn's work
        if isinstance(event, Sync):
            event.future.set_result(None)

    def _every(self, name: str, seconds: float) -> bool:
        """Whether periodic work `name` is due now; if so, it is due again in `seconds`."""
        now = self.system.monotonic()
        if now < self.due.get(name, 0.0):
            return False
        self.due[name] = now + seconds
        return True

    def _wait_seconds(self) -> float:
        """Until the next timer is due: settle, grace period, backoff, periodic work."""
        core = self.core
        wait = 0.5 if any(m.job for m in core.models.values()) else 1.0
        if self.notifier.watchdog_interval:
            wait = min(wait, self.notifier.watchdog_interval)
        backoffs = [b.not_before for m in core.models.values() for b in (m.backoff, m.retry) if b]
        timers = [core.updates.next_due(), core.generations.next_expiry(), *backoffs]
        now = self.system.monotonic()
        for due in [*timers, *self.due.values()]:
            if due is not None and due > now:
                wait = min(wait, max(due - now, 0.01))
        return wait

    def _tick(self) -> None:
        core = self.core
        if not self.ready_sent and self._every("extend", EXTEND_TIMEOUT_USEC / 3e6):
            # Long copies hold back READY=1 (ready: staged); ask systemd for more time.
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_TIMEOUT_USEC}")
        core.generations.expire(self.system.monotonic())
        if self._every("store", STORE_CHECK_SECONDS):
            core.check_store()
        if self._every("prune", PRUNE_INTERVAL_SECONDS):
            core.generations.prune()
            core.heal_links()
            core.retry_when_room()
        if self._every("rescan", core.config.watch.rescan_seconds):
            core.updates.rescan("periodic rescan")
        metrics = core.config.metrics
        if metrics.textfile and self._every("metrics", metrics.interval_seconds):
            self.metrics.write(metrics.textfile)

    def _shutdown(self) -> None:
        core = self.core
        log.info("stopping: copies in RAM and their links stay for the next start to adopt")
        self.notifier.send("STOPPING=1")
        if self.control:
            self.control.close()
        core.updates.stop()
        core.relief.stop()
        core.actuator.stop(core.models.values())
        self.metrics.stop()
        if core.config.metrics.textfile:
            self._publish_snapshot()
            self.metrics.write(core.config.metrics.textfile)  # as the stop leaves the store
        self._refuse_late_events()

    def _refuse_late_events(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, Reload):
                log.info("reload during shutdown: ignored")
            if isinstance(event, (Reload, Request)) and event.future:
                event.future.set_exception(RamstageError("ramstage is stopping"))
            if isinstance(event, Sync):
                event.future.set_result(None)

    # ---- events --------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        core = self.core
        if isinstance(event, Stop):
            log.info("signal %s: stopping", signal.Signals(event.signum).name)
            self.stopping = True
        elif isinstance(event, Reload):
            self.requests.reload(event)
        elif isinstance(event, Request):
            self.requests.handle(event)
        elif isinstance(event, JobDone):
            core.job_done(event.name, event.job)
        elif isinstance(event, SourceEvent):
            core.updates.on_event(event.name)
        elif isinstance(event, Rescan):
            self.due["rescan"] = self.system.monotonic() + core.config.watch.rescan_seconds
            core.updates.rescan(event.reason)
        elif isinstance(event, VerifyFailed):
            self._verify_failed(event)
        elif isinstance(event, Pressure):
            core.relief.relieve(event, core.models)

    def _verify_failed(self, event: VerifyFailed) -> None:
        core = self.core
        model = core.models.get(event.name)
        if model:
            exists = core.reach.exists(model.source)
            actions = lifecycle.verify_failed(model, event.generation_id, source_exists=exists)
            if actions:
                core.actuator.count_verify_failure(model)
            core.apply(model, actions)

    # ---- what others see -----------------------------------------------------------------

    def _maybe_ready(self) -> None:
        if self.ready_sent or not lifecycle.ready(
            self.core.models.values(), self.core.config.ready
        ):
            return
        self.ready_sent = True
        self.notifier.send("READY=1")

    def _publish_snapshot(self) -> None:
        core = self.core
        self.snapshot = snapshot(
            core.models.values(),
            core.generations,
            core.relief.last_pressure_at,
            core.updates.watcher.problems(),
            previous=self.snapshot,
            now=self.system.monotonic(),
            wall=self.system.time(),
        )
        staged = sum(m.serving is Serving.RAM for m in core.models.values())
        self.notifier.status(f"{staged}/{len(core.models)} models staged")
        self.evictions.keep({m.name for m in core.models.values() if m.held})

    def status(self, name: str | None = None) -> dict[str, Any]:
        """Runs in the control thread, from the latest snapshot plus fresh readings."""
        core = self.core
        return render(
            self.snapshot,
            name,
            store=core.store,
            system=self.system,
            memory=core.config.memory,
            psi_trigger=core.relief.watcher.psi_trigger if core.relief.watcher else None,
            verifying=self.requests.verifying,
            config_path=core.config_path,
        )


def run_daemon(config_path: Path, system: System) -> int:
    config = load_config(config_path)
    with only_one(config, "start"):
        return Daemon(config_path, config, system, Notifier(system)).run()
