"""The daemon: the composition root and the one event loop that owns all state.

Signal handlers, the control socket thread and the copy worker only put events on the queue;
the loop decides (policy.py) and acts. `status` is answered from the snapshot the loop
publishes after every event, so it never waits for the loop.
"""

from __future__ import annotations

import logging
import queue
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ramstage import links, policy
from ramstage.catalog import Catalog
from ramstage.config import Config, ModelConfig, load_config, source_problems, trust_warnings
from ramstage.control import ControlServer
from ramstage.digest import hash_file
from ramstage.errors import ConfigError, NotFound, RamstageError
from ramstage.pressure import Pressure
from ramstage.relief import MemoryGuard
from ramstage.service import Notifier
from ramstage.sources import list_source
from ramstage.stager import Cancelled, failure_reason, stage_source
from ramstage.state import (
    Event,
    Job,
    JobDone,
    Model,
    Reload,
    Request,
    Rescan,
    SourceEvent,
    Stop,
    VerifyFailed,
)
from ramstage.status import model_entry, render
from ramstage.store import Generation, Store, remove_tree
from ramstage.system import System
from ramstage.updates import SourceUpdates
from ramstage.validate import check_generation

log = logging.getLogger("ramstage")
REQUEST_TIMEOUT_SECONDS = 3600.0
EXTEND_TIMEOUT_USEC = 30_000_000
PRUNE_INTERVAL_SECONDS = 5.0


class Daemon:
    def __init__(
        self, config_path: Path, config: Config, system: System, notifier: Notifier
    ) -> None:
        self.config_path, self.config = config_path, config
        self.system, self.notifier = system, notifier
        self.store = Store(config.store, system)
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.catalog = Catalog(self.store, config.links_dir, system)
        self.models = self.catalog.models  # the one table of models, shared, never replaced
        self.guard = MemoryGuard(config.memory, system, self.events.put, self.catalog.fall_back)
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ramstage-copy")
        self.control: ControlServer | None = None
        self.updates = SourceUpdates(
            config.watch,
            system,
            self.catalog,
            lambda name: self.events.put(SourceEvent(name)),
            lambda reason: self.events.put(Rescan(reason)),
        )
        self.snapshot: dict[str, Any] = {}
        self.ready_sent = False
        self.stopping = False
        self._last_extend = 0.0
        self._last_prune = 0.0

    # ---- life cycle -------------------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: self.events.put(Stop(signum)))
        signal.signal(signal.SIGHUP, lambda signum, frame: self.events.put(Reload()))
        for problem in [*source_problems(self.config), *trust_warnings(self.config)]:
            log.warning("%s", problem)
        self.store.open()
        links.prepare(self.config.links_dir)
        self.catalog.adopt(self.config.models)
        self.updates.start()
        self.guard.watch(self.config.memory)
        self._publish_snapshot()  # before the socket opens: no status without the models
        self.control = ControlServer(self.config.socket, self._answer)
        self.control.start()
        log.info(
            "ready: %d models, every link in place under %s",
            len(self.models),
            self.config.links_dir,
        )
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
        self.updates.settle()
        self.guard.resume(self.models)
        self._schedule()
        self._maybe_ready()
        self._publish_snapshot()
        self.notifier.watchdog()
        # Timed work runs every turn, not only when the queue is idle: a steady stream of
        # events (pressure readings every 0.25 s) must not hold back freeing outgoing copies.
        self._tick()
        try:
            event = self.events.get(timeout=self._tick_seconds())
        except queue.Empty:
            return
        self._handle(event)

    def _tick_seconds(self) -> float:
        tick = 0.5 if any(m.job for m in self.models.values()) else 1.0
        if self.notifier.watchdog_interval:
            tick = min(tick, self.notifier.watchdog_interval)
        due = self.updates.next_due()
        if due is not None:
            tick = min(tick, max(due - self.system.monotonic(), 0.01))
        return tick

    def _tick(self) -> None:
        now = self.system.monotonic()
        if not self.ready_sent and now - self._last_extend > EXTEND_TIMEOUT_USEC / 3e6:
            # Long copies hold back READY=1 (ready: staged); ask systemd for more time.
            self._last_extend = now
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_TIMEOUT_USEC}")
        self.catalog.expire_outgoing(now)
        if now - self._last_prune > PRUNE_INTERVAL_SECONDS:
            self._last_prune = now
            self.catalog.prune_retired()
            self.catalog.heal_links()
        if self.updates.rescan_due(now):
            self.updates.rescan("periodic rescan")

    def _shutdown(self) -> None:
        log.info("stopping: links back to their sources, RAM freed")
        self.notifier.send("STOPPING=1")
        if self.control:
            self.control.close()
        self.updates.stop()
        self.guard.stop()
        for model in self.models.values():
            if model.job:
                model.job.cancel.set()
        self.copier.shutdown(wait=True)
        self.catalog.release_all()
        self.store.close()
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

    # ---- events -----------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, Stop):
            log.info("signal %s: stopping", signal.Signals(event.signum).name)
            self.stopping = True
        elif isinstance(event, Reload):
            self._reload(event.future)
        elif isinstance(event, Request):
            try:
                event.future.set_result(self._request(event.cmd, event.args))
            except RamstageError as error:
                event.future.set_exception(error)
            except Exception as error:
                event.future.set_exception(RamstageError(f"internal error: {error}"))
                raise
        elif isinstance(event, JobDone):
            self._job_done(event.name, event.job)
        elif isinstance(event, SourceEvent):
            self.updates.on_event(event.name)
        elif isinstance(event, Rescan):
            self.updates.rescan(event.reason)
        elif isinstance(event, VerifyFailed):
            model = self.models.get(event.name)
            if model and model.generation and model.generation.id == event.generation_id:
                log.error(
                    "%s: generation %s no longer matches its digest",
                    event.name,
                    event.generation_id,
                )
                self.catalog.fall_back(model, "error: verify failed, staging again")
                model.state = "pending"
        elif isinstance(event, Pressure):
            self.guard.relieve(event, self.models)

    def _request(self, cmd: str, args: dict[str, Any]) -> Any:
        names = args.get("names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RamstageError("names must be a list of model names")
        if cmd == "stage" and args.get("all"):
            names = list(self.models)
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise NotFound(f"no model named {', '.join(unknown)} in {self.config_path}")
        if cmd == "stage":
            return {name: self._request_stage(self.models[name]) for name in names}
        if cmd == "evict":
            for name in names:
                model = self.models[name]
                self.catalog.fall_back(model, "evicted")
                model.held = True
                log.info("%s: evicted on request", name)
            return None
        if cmd == "verify":
            chosen = names or list(self.models)
            return {n: self.models[n].generation for n in chosen if self.models[n].generation}
        raise RamstageError(f"unknown command {cmd}")

    def _request_stage(self, model: Model) -> Future[str | None]:
        model.held = False
        waiter: Future[str | None] = Future()
        if model.state == "staged" and model.reason in (None, "source_missing"):
            waiter.set_result(None)  # the newest version there is, or could be, is in RAM
            return waiter
        model.waiters.append(waiter)
        if not model.job:
            model.state = "pending"
        return waiter

    # ---- staging ----------------------------------------------------------------------

    def _schedule(self) -> None:
        """One copy at a time, so each starts with a fresh look at memory and store space."""
        if self.stopping or any(m.job for m in self.models.values()):
            return
        waiting = [
            policy.Candidate(m.config.name, m.config.priority)
            for m in self.models.values()
            if m.state == "pending" and not m.held and m.changed_at is None
        ]
        name = policy.next_to_stage(waiting)
        if name is not None:
            self._start(self.models[name])

    def _start(self, model: Model) -> None:
        try:
            listing = list_source(model.config.source, model.config.trust)
        except FileNotFoundError:
            self.catalog.set_missing(model)
            return
        except (OSError, RamstageError) as error:
            reason = failure_reason(error)
            log.warning("%s: not staged (%s)", model.config.name, reason)
            if model.generation:
                # The verified copy stays: it was made from the source as it was then.
                model.state, model.reason = "staged", reason
                model.settle(reason)
            else:
                self.catalog.fall_back(model, reason)
            return
        need, free, available = (
            listing.size_bytes,
            self.store.free_bytes(),
            self.system.available_bytes(),
        )
        floor = self.config.memory.min_available_bytes
        refusal = policy.admit(need, free, available, floor) or self.guard.refusal(model)
        if refusal:
            log.warning(
                "%s: not staged (%s): needs %d bytes, store has %d free, MemAvailable %d, floor %d",
                model.config.name,
                refusal,
                need,
                free,
                available,
                floor,
            )
            if model.generation:
                # An update that does not fit leaves the verified previous version in place.
                # too_large waits for the source to change; pressure for the next rescan.
                model.state, model.reason = "staged", refusal
                model.seen = listing.identities() if refusal == "too_large" else None
                model.settle(refusal)
            else:
                self.catalog.fall_back(model, refusal)
            if refusal == "pressure":
                self.guard.back_off(model)
            return
        job = Job(self.store.new_partial(model.config.name), identities=listing.identities())
        job.future = self.copier.submit(self._copy, model.config, job)
        job.future.add_done_callback(lambda _: self.events.put(JobDone(model.config.name, job)))
        model.job, model.state = job, "staging"
        model.reason = "source_changed" if model.generation else None
        log.info("%s: staging %d bytes from %s", model.config.name, need, model.config.source)

    def _copy(self, config: ModelConfig, job: Job) -> Generation:
        """Runs in the copy worker; touches nothing but the job's own partial directory."""
        algorithm = config.digest.partition(":")[0] if config.digest else self.config.checksum

        def progress(fraction: float) -> None:
            job.progress = fraction

        try:
            manifest = stage_source(
                config.name,
                config.source,
                job.partial,
                algorithm,
                on_progress=progress,
                trust=config.trust,
                workers=self.config.staging.workers,
                cancel=job.cancel,
                expected_digest=config.digest,
            )
            # A torn or truncated checkpoint hashes fine; it must not become the staged version.
            check_generation(
                job.partial / manifest.root, [f.relpath for f in manifest.files], config.validate
            )
            return self.store.publish(job.partial, manifest)
        finally:
            remove_tree(job.partial)

    def _job_done(self, name: str, job: Job) -> None:
        assert job.future is not None
        model = self.models.get(name)
        error = job.future.exception()
        if model is None or model.job is not job:
            # Evicted, removed or replaced while copying: this copy is not wanted.
            if error is None:
                generation = job.future.result()
                # Content-addressed: the copy may have reused a generation still linked, or
                # still in its grace period; only a generation nobody has is deleted.
                kept = [model.generation, *(g for _, g in model.outgoing)] if model else []
                if all(g is None or g.path != generation.path for g in kept):
                    self.store.remove(generation)
            if model is None:
                self.store.remove_model(name)  # removed from the config while it was copied
            return
        model.job = None
        if error is None:
            self.catalog.publish(model, job.future.result())
            return
        if isinstance(error, Cancelled):
            return
        if isinstance(error, FileNotFoundError):
            self.catalog.set_missing(model)
            return
        if isinstance(error, (RamstageError, OSError)):
            log.error("%s: staging failed: %s", name, error)
        else:
            log.error("%s: staging failed", name, exc_info=error)
        reason = failure_reason(error)
        model.seen = job.identities  # not tried again until this version changes
        if model.generation:
            # A new version that cannot be staged never replaces the verified previous one.
            model.state, model.reason = "staged", reason
            model.settle(reason)
        else:
            self.catalog.fall_back(model, reason)

    # ---- reload -----------------------------------------------------------------------

    def _reload(self, future: Future[Any] | None) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            fixed = [
                key
                for key, old_value, new_value in (
                    ("store", self.config.store, new.store),
                    ("links_dir", self.config.links_dir, new.links_dir),
                    ("socket", self.config.socket, new.socket),
                )
                if old_value != new_value
            ]
            if fixed:
                raise ConfigError(
                    [f"{key}: cannot change while running; restart ramstage" for key in fixed]
                )
        except ConfigError as error:
            log.error("reload refused, keeping the running config:\n%s", error)
            self.notifier.send("READY=1")
            if future:
                future.set_exception(error)
            return
        for problem in [*source_problems(new), *trust_warnings(new)]:
            log.warning("%s", problem)
        old_models = {m.name: m for m in self.config.models}
        new_models = {m.name: m for m in new.models}
        for name in old_models.keys() - new_models.keys():
            self.catalog.remove(name).settle("removed from the config")
            log.info("%s: removed from the config; link and RAM copy gone", name)
        for name, config in new_models.items():
            previous = old_models.get(name)
            if previous is None:
                model = self.catalog.add(config)
                self.catalog.point_at_source(model)
                if not config.source.exists():
                    self.catalog.set_missing(model)
                log.info("%s: added", name)
            elif (previous.source, previous.digest, previous.validate) != (
                config.source,
                config.digest,
                config.validate,
            ):
                model = self.models[name]
                model.config = config
                self.catalog.fall_back(model, "source_changed")
                model.state = "pending" if config.source.exists() else "missing"
                log.info("%s: source changed to %s; staging again", name, config.source)
            else:
                self.models[name].config = config
        if new.memory != self.config.memory:
            self.guard.watch(new.memory)
        self.config = new
        self.updates.configure(new.watch)
        log.info("reloaded %s: %d models", self.config_path, len(self.models))
        self.notifier.send("READY=1")
        if future:
            future.set_result({"models": len(self.models)})

    # ---- what others see --------------------------------------------------------------

    def _maybe_ready(self) -> None:
        if self.ready_sent:
            return
        if self.config.ready == "staged" and any(
            m.state in ("pending", "staging") and not m.held for m in self.models.values()
        ):
            return
        self.ready_sent = True
        self.notifier.send("READY=1")

    def _publish_snapshot(self) -> None:
        self.snapshot = {
            "models": [model_entry(model, self.guard) for model in self.models.values()],
            "last_pressure_at": self.guard.last_pressure_at,
        }
        staged = sum(m.state == "staged" for m in self.models.values())
        self.notifier.status(f"{staged}/{len(self.models)} models staged")

    def status(self, name: str | None = None) -> dict[str, Any]:
        """Runs in the control thread, from the latest snapshot plus fresh readings."""
        snapshot = self.snapshot
        return render(
            snapshot.get("models", []),
            name,
            store=self.store,
            system=self.system,
            memory=lambda pinned: self.guard.status(pinned, snapshot.get("last_pressure_at")),
            config_path=self.config_path,
        )

    # ---- control socket (runs in its threads) -----------------------------------------

    def _answer(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "status":
            name = args.get("name")
            return self.status(name if isinstance(name, str) else None)
        future: Future[Any] = Future()
        self.events.put(Reload(future) if cmd == "reload" else Request(cmd, args, future))
        result = future.result(timeout=REQUEST_TIMEOUT_SECONDS)
        if cmd == "stage":
            outcomes = {
                name: waiter.result(timeout=REQUEST_TIMEOUT_SECONDS)
                for name, waiter in result.items()
            }
            failed = {name: reason for name, reason in outcomes.items() if reason}
            if failed:
                raise RamstageError(
                    "; ".join(f"{name}: not staged ({reason})" for name, reason in failed.items())
                )
            return {"staged": sorted(outcomes)}
        if cmd == "verify":
            return self._verify(result)
        return result

    def _verify(self, generations: dict[str, Generation]) -> dict[str, Any]:
        """Re-hashes generations in RAM; a generation is immutable, so no lock is needed, and
        one deleted meanwhile is still readable through the descriptor opened here."""
        mismatched = []
        for name, generation in generations.items():
            manifest = generation.manifest
            for staged_file, path in zip(manifest.files, generation.file_paths()):
                try:
                    actual = hash_file(path, manifest.algorithm)
                except FileNotFoundError:
                    continue  # replaced since: its successor was verified when it was made
                if actual != staged_file.digest:
                    mismatched.append(name)
                    self.events.put(VerifyFailed(name, generation.id))
                    break
        if mismatched:
            raise RamstageError(
                f"digest mismatch in RAM: {', '.join(mismatched)}; falling back and staging again"
            )
        return {"verified": sorted(generations)}


def run_daemon(config_path: Path) -> int:
    config = load_config(config_path)
    return Daemon(config_path, config, System(), Notifier()).run()
