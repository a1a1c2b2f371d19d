"""The daemon: the composition root and the one event loop that owns all state.

Signal handlers, the control socket thread and the copy worker only put events on the queue;
the loop decides (policy.py) and acts. `status` is answered from the snapshot the loop
publishes after every event, so it never waits for the loop.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ramstage import __version__, links, policy
from ramstage.config import Config, MemoryConfig, ModelConfig, load_config, source_problems
from ramstage.control import ControlServer
from ramstage.digest import new_hasher
from ramstage.errors import ConfigError, NotFound, RamstageError
from ramstage.manifest import Identity
from ramstage.pressure import Pressure, PressureWatcher, last_used, memory_status
from ramstage.service import Notifier
from ramstage.stager import (
    CHUNK_BYTES,
    Cancelled,
    NoSpace,
    list_source,
    stage_source,
)
from ramstage.store import Generation, Store, remove_tree
from ramstage.system import System
from ramstage.users import FileKey, holders, writers
from ramstage.validate import check_generation
from ramstage.watcher import SourceWatcher

log = logging.getLogger("ramstage")
REQUEST_TIMEOUT_SECONDS = 3600.0
EXTEND_TIMEOUT_USEC = 30_000_000
PRUNE_INTERVAL_SECONDS = 5.0
# A generation swapped out for a newer one stays this long, so that a reader that resolved the
# link just before the swap (a sharded loader opening shard after shard) can still open it.
SWAP_GRACE_SECONDS = 10.0


@dataclass
class Job:
    partial: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    identities: tuple[tuple[str, Identity], ...] = ()  # the source version being copied
    progress: float = 0.0
    future: Future[Generation] | None = None


@dataclass
class Model:
    config: ModelConfig
    link: Path
    state: str = "pending"
    reason: str | None = None
    generation: Generation | None = None
    job: Job | None = None
    held: bool = False  # evicted by the operator: stays on its source until `stage`
    changed_at: float | None = None  # last source event not yet looked at
    seen: tuple[tuple[str, Identity], ...] | None = None  # the source version last taken up
    waiters: list[Future[str | None]] = field(default_factory=list)
    retired: dict[FileKey, int] = field(default_factory=dict)  # unlinked files, by size
    outgoing: list[tuple[float, Generation]] = field(default_factory=list)  # (delete at, gen)

    def settle(self, outcome: str | None) -> None:
        """Answers everyone waiting for this model to be staged: None, or why it is not."""
        for waiter in self.waiters:
            waiter.set_result(outcome)
        self.waiters.clear()


@dataclass(frozen=True)
class Stop:
    signum: int


@dataclass(frozen=True)
class Reload:
    future: Future[Any] | None = None


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]
    future: Future[Any]


@dataclass(frozen=True)
class JobDone:
    name: str
    job: Job


@dataclass(frozen=True)
class VerifyFailed:
    name: str
    generation_id: str


@dataclass(frozen=True)
class SourceEvent:
    name: str


@dataclass(frozen=True)
class Rescan:
    reason: str


Event = Union[Stop, Reload, Request, JobDone, VerifyFailed, SourceEvent, Rescan, Pressure]


class Daemon:
    def __init__(
        self, config_path: Path, config: Config, system: System, notifier: Notifier
    ) -> None:
        self.config_path, self.config = config_path, config
        self.system, self.notifier = system, notifier
        self.store = Store(config.store, system)
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.models: dict[str, Model] = {}
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ramstage-copy")
        self.control: ControlServer | None = None
        self.watcher = SourceWatcher(
            lambda name: self.events.put(SourceEvent(name)),
            lambda reason: self.events.put(Rescan(reason)),
        )
        self.snapshot: dict[str, Any] = {}
        self.ready_sent = False
        self.stopping = False
        self._last_extend = 0.0
        self._last_prune = 0.0
        self._last_rescan = 0.0
        self.memory_watcher: PressureWatcher | None = None
        self.last_pressure_at: float | None = None  # monotonic; None: no pressure seen yet
        self.backoffs: dict[str, policy.Backoff] = {}
        self._nothing_to_evict = False  # said once per episode, not at every reading

    # ---- life cycle -------------------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: self.events.put(Stop(signum)))
        signal.signal(signal.SIGHUP, lambda signum, frame: self.events.put(Reload()))
        for problem in source_problems(self.config):
            log.warning("%s", problem)
        self.store.open()
        links.prepare(self.config.links_dir)
        self._adopt_or_fall_back()
        self.watcher.watch(self._sources())
        self.watcher.start()
        self._last_rescan = self.system.monotonic()
        self.control = ControlServer(self.config.socket, self._answer)
        self.control.start()
        self._watch_memory(self.config.memory)
        self._publish_snapshot()
        log.info(
            "ready: %d models, every link in place under %s",
            len(self.models),
            self.config.links_dir,
        )
        while not self.stopping:
            self._settle()
            self._maybe_resume()
            self._schedule()
            self._maybe_ready()
            self._publish_snapshot()
            self.notifier.watchdog()
            try:
                event = self.events.get(timeout=self._tick_seconds())
            except queue.Empty:
                self._tick()
                continue
            self._handle(event)
        self._shutdown()
        return 0

    def _tick_seconds(self) -> float:
        tick = 0.5 if any(m.job for m in self.models.values()) else 1.0
        if self.notifier.watchdog_interval:
            tick = min(tick, self.notifier.watchdog_interval)
        settle = self.config.watch.settle_seconds
        due = [m.changed_at + settle for m in self.models.values() if m.changed_at is not None]
        if due:
            tick = min(tick, max(min(due) - self.system.monotonic(), 0.01))
        return tick

    def _tick(self) -> None:
        now = self.system.monotonic()
        if not self.ready_sent and now - self._last_extend > EXTEND_TIMEOUT_USEC / 3e6:
            # Long copies hold back READY=1 (ready: staged); ask systemd for more time.
            self._last_extend = now
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_TIMEOUT_USEC}")
        for model in self.models.values():
            while model.outgoing and model.outgoing[0][0] <= now:
                self._retire(model, model.outgoing.pop(0)[1])
        if now - self._last_prune > PRUNE_INTERVAL_SECONDS:
            self._last_prune = now
            self._prune_retired()
        if now - self._last_rescan > self.config.watch.rescan_seconds:
            self._rescan("periodic rescan")

    def _shutdown(self) -> None:
        log.info("stopping: links back to their sources, RAM freed")
        self.notifier.send("STOPPING=1")
        if self.control:
            self.control.close()
        self.watcher.stop()
        if self.memory_watcher:
            self.memory_watcher.stop()
        for model in self.models.values():
            if model.job:
                model.job.cancel.set()
        self.copier.shutdown(wait=True)
        for model in self.models.values():
            self._point_at_source(model)
            for generation in [*(g for _, g in model.outgoing), model.generation]:
                if generation:
                    self.store.remove(generation)
            model.settle("ramstage is stopping")
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
        elif isinstance(event, JobDone):
            self._job_done(event.name, event.job)
        elif isinstance(event, SourceEvent):
            self._source_event(event.name)
        elif isinstance(event, Rescan):
            self._rescan(event.reason)
        elif isinstance(event, VerifyFailed):
            model = self.models.get(event.name)
            if model and model.generation and model.generation.id == event.generation_id:
                log.error(
                    "%s: generation %s no longer matches its digest",
                    event.name,
                    event.generation_id,
                )
                self._fall_back(model, "error: verify failed, staging again")
                model.state = "pending"
        elif isinstance(event, Pressure):
            self._relieve(event)

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
                self._fall_back(model, "evicted")
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
        if model.state == "staged":
            waiter.set_result(None)
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
            listing = list_source(model.config.source)
        except FileNotFoundError:
            self._set_missing(model)
            return
        except (OSError, RamstageError) as error:
            self._fall_back(model, f"error: {error}")
            return
        need = listing.size_bytes
        refusal = policy.admit(
            need,
            self.store.free_bytes(),
            self.system.available_bytes(),
            self.config.memory.min_available_bytes,
        ) or self._pressure_refusal(model)
        if refusal:
            log.warning(
                "%s: not staged (%s): needs %d bytes, store has %d free, MemAvailable %d, floor %d",
                model.config.name,
                refusal,
                need,
                self.store.free_bytes(),
                self.system.available_bytes(),
                self.config.memory.min_available_bytes,
            )
            self._fall_back(model, refusal)
            if refusal == "pressure":
                self._back_off(model)
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
                cancel=job.cancel,
                expected_digest=config.digest,
            )
            # A torn or truncated checkpoint hashes fine; it must not become the staged version.
            check_generation(job.partial, [f.relpath for f in manifest.files], config.validate)
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
                if not (model and model.generation and model.generation.path == generation.path):
                    self.store.remove(generation)
            if model is None:
                self.store.remove_model(name)  # removed from the config while it was copied
            return
        model.job = None
        if error is None:
            self._publish(model, job.future.result())
            return
        if isinstance(error, Cancelled):
            return
        if isinstance(error, FileNotFoundError):
            self._set_missing(model)
            return
        if isinstance(error, (RamstageError, OSError)):
            log.error("%s: staging failed: %s", name, error)
        else:
            log.error("%s: staging failed", name, exc_info=error)
        reason = "too_large" if isinstance(error, NoSpace) else f"error: {error}"
        model.seen = job.identities  # not tried again until this version changes
        if model.generation:
            # A new version that cannot be staged never replaces the verified previous one.
            model.state, model.reason = "staged", reason
            model.settle(None)
        else:
            self._fall_back(model, reason)

    def _publish(self, model: Model, generation: Generation) -> None:
        links.point(model.link, generation.target)
        old, model.generation = model.generation, generation
        model.seen = generation.manifest.identities()
        model.state, model.reason = "staged", None
        if old and old.path != generation.path:
            model.outgoing.append((self.system.monotonic() + SWAP_GRACE_SECONDS, old))
        log.info(
            "%s: staged generation %s (%d bytes, %s)",
            model.config.name,
            generation.id,
            generation.manifest.size_bytes,
            generation.manifest.digest,
        )
        for skipped in generation.manifest.skipped:
            log.warning("%s: skipped %s", model.config.name, skipped)
        model.settle(None)

    # ---- watching sources -------------------------------------------------------------

    def _sources(self) -> dict[str, Path]:
        return {name: model.config.source for name, model in self.models.items()}

    def _source_event(self, name: str) -> None:
        model = self.models.get(name)
        if model is None:
            return
        if model.changed_at is None:
            log.debug(
                "%s: source event; waiting %gs for it to settle",
                name,
                self.config.watch.settle_seconds,
            )
        model.changed_at = self.system.monotonic()
        if model.job:
            # The copy is of a source in flux: call it off and copy once it has settled.
            model.job.cancel.set()
            model.job = None
            model.state = "staged" if model.generation else "pending"
        self.watcher.watch(self._sources())  # a watched directory may have been replaced

    def _rescan(self, reason: str) -> None:
        """Looks at every source again, as if each had sent an event a settle period ago."""
        log.info("rescanning every source (%s)", reason)
        now = self.system.monotonic()
        self._last_rescan = now
        self.watcher.watch(self._sources())
        for model in self.models.values():
            if model.changed_at is None:
                model.changed_at = now - self.config.watch.settle_seconds

    def _settle(self) -> None:
        """Takes up sources that have been quiet for watch.settle and that no one holds open
        for writing; a source whose files have the identities last seen has not changed."""
        now = self.system.monotonic()
        for model in self.models.values():
            if (
                model.changed_at is None
                or now - model.changed_at < self.config.watch.settle_seconds
            ):
                continue
            try:
                listing = list_source(model.config.source)
            except FileNotFoundError:
                model.changed_at = None
                self._set_missing(model)
                continue
            except (OSError, RamstageError) as error:
                model.changed_at = None
                log.warning("%s: cannot list the source: %s", model.config.name, error)
                continue
            busy = writers(self.system.proc, {f.identity[:2] for f in listing.files})
            if busy:
                log.debug("%s: still open for writing by %s", model.config.name, sorted(busy))
                model.changed_at = now
                continue
            model.changed_at = None
            current = listing.identities()
            if (
                current == model.seen
                or model.held
                or (model.job and current == model.job.identities)
            ):
                continue
            log.info("%s: source changed; staging the new version", model.config.name)
            if model.state == "missing":
                self._point_at_source(model)
            model.state = "pending"

    # ---- links and generations --------------------------------------------------------

    def _point_at_source(self, model: Model) -> None:
        if model.config.source.exists():
            links.point(model.link, model.config.source)
        else:
            links.remove(model.link)

    def _fall_back(self, model: Model, reason: str) -> None:
        """The link goes back to the source first; only then is the RAM copy deleted."""
        if model.job:
            model.job.cancel.set()
            model.job = None
        self._point_at_source(model)
        outgoing = [g for _, g in model.outgoing]
        if model.generation:
            outgoing.append(model.generation)
        model.generation, model.outgoing = None, []
        for generation in outgoing:
            self._retire(model, generation)
        model.state, model.reason = "fallback", reason
        if not model.config.source.exists():
            model.state = "missing"
        model.settle(reason)

    def _set_missing(self, model: Model) -> None:
        """A deleted source keeps being served from its verified copy; with no copy, the model
        has no link at all (a link to nothing would only move the error into the app)."""
        if model.reason != "source_missing":
            log.warning(
                "%s: source %s is missing; %s",
                model.config.name,
                model.config.source,
                "serving the verified copy in RAM"
                if model.generation
                else "no link until it is back",
            )
        if model.job:
            model.job.cancel.set()
            model.job = None
        model.seen = None
        model.reason = "source_missing"
        if model.generation:
            model.state = "staged"
            model.settle(None)
        else:
            links.remove(model.link)
            model.state = "missing"
            model.settle(model.reason)

    def _retire(self, model: Model, generation: Generation) -> None:
        """Deletes a generation no link points at; readers that still hold its files keep
        them, and their bytes are reported as pinned until they let go (invariant 3)."""
        if model.generation and model.generation.path == generation.path:
            return  # the same content was staged again and is linked once more
        model.retired.update(generation.file_keys)
        self.store.remove(generation)
        self._prune_retired()

    def _prune_retired(self) -> None:
        retired = {key for m in self.models.values() for key in m.retired}
        if not retired:
            return
        held = holders(self.system.proc, retired)
        for model in self.models.values():
            model.retired = {k: v for k, v in model.retired.items() if k in held}

    def _adopt_or_fall_back(self) -> None:
        """At start: every link in place at once, on an adoptable generation or the source."""
        found = self.store.scan({m.name for m in self.config.models})
        for config in self.config.models:
            model = Model(config, self.config.links_dir / config.name)
            self.models[config.name] = model
            adopted = self._adoptable(config, found.get(config.name, []))
            for generation in found.get(config.name, []):
                if generation is not adopted:
                    self.store.remove(generation)
            if adopted:
                links.point(model.link, adopted.target)
                model.generation, model.state = adopted, "staged"
                model.seen = adopted.manifest.identities()
                log.info("%s: adopted generation %s without copying", config.name, adopted.id)
            elif config.source.exists():
                self._point_at_source(model)
            else:
                self._set_missing(model)

    def _adoptable(self, config: ModelConfig, generations: list[Generation]) -> Generation | None:
        for generation in generations:
            manifest = generation.manifest
            if manifest.source != str(config.source) or (
                config.digest and manifest.digest != config.digest
            ):
                continue
            try:
                same_source = list_source(config.source).identities() == manifest.identities()
                complete = all(
                    os.stat(generation.path / f.relpath).st_size == f.size_bytes
                    for f in manifest.files
                )
            except (OSError, RamstageError):
                continue
            if same_source and complete:
                return generation
        return None

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
        for problem in source_problems(new):
            log.warning("%s", problem)
        old_models = {m.name: m for m in self.config.models}
        new_models = {m.name: m for m in new.models}
        for name in old_models.keys() - new_models.keys():
            model = self.models.pop(name)
            links.remove(model.link)
            if model.job:
                # The copy thread is still writing under STORE/NAME: deleting that tree now
                # races it (and an error there ends the loop). The copy removes its own partial
                # and _job_done the rest.
                model.job.cancel.set()
                if model.generation:
                    self.store.remove(model.generation)
            else:
                self.store.remove_model(name)
            model.settle("removed from the config")
            log.info("%s: removed from the config; link and RAM copy gone", name)
        for name, config in new_models.items():
            previous = old_models.get(name)
            if previous is None:
                model = Model(config, self.config.links_dir / name)
                self.models[name] = model
                self._point_at_source(model)
                if not config.source.exists():
                    self._set_missing(model)
                log.info("%s: added", name)
            elif (previous.source, previous.digest, previous.validate) != (
                config.source,
                config.digest,
                config.validate,
            ):
                model = self.models[name]
                model.config = config
                self._fall_back(model, "source_changed")
                model.state = "pending" if config.source.exists() else "missing"
                log.info("%s: source changed to %s; staging again", name, config.source)
            else:
                self.models[name].config = config
        if new.memory != self.config.memory:
            self._watch_memory(new.memory)
        self.config = new
        self.watcher.watch(self._sources())
        log.info("reloaded %s: %d models", self.config_path, len(self.models))
        self.notifier.send("READY=1")
        if future:
            future.set_result({"models": len(self.models)})

    # ---- memory pressure --------------------------------------------------------------

    def _watch_memory(self, memory: MemoryConfig) -> None:
        if self.memory_watcher:
            self.memory_watcher.stop()
        self.memory_watcher = PressureWatcher(memory, self.system, self.events.put, os.environ)
        self.memory_watcher.start()

    def _since_pressure(self, last_pressure_at: float | None) -> float | None:
        return None if last_pressure_at is None else self.system.monotonic() - last_pressure_at

    def _pressure_refusal(self, model: Model) -> str | None:
        """Within the cooldown of a pressure event nothing is staged on its own; an operator's
        explicit `stage` (a waiter) still is, as far as admit's floor allows."""
        memory = self.config.memory
        paused = policy.under_pressure(
            self.system.available_bytes(),
            memory.min_available_bytes,
            self._since_pressure(self.last_pressure_at),
            memory.effective_cooldown_seconds,
        )
        return "pressure" if paused and not model.waiters else None

    def _relieve(self, event: Pressure) -> None:
        """Gives RAM back in policy order, looking at MemAvailable again after every eviction
        (earlyoom's rule: re-read before anything destructive), until it is above the floor."""
        self.last_pressure_at = self.system.monotonic()
        floor = self.config.memory.min_available_bytes
        available = self.system.available_bytes()  # the event's reading may be stale already
        evicted = 0
        copying = next((m for m in self.models.values() if m.job), None)
        if copying and policy.keep_evicting(available, floor, event.kind, evicted):
            # A copy in progress goes first: RAM that no reader uses yet.
            log.warning(
                "%s: copy cancelled for memory pressure (%s): MemAvailable %d, floor %d",
                copying.config.name,
                event.kind,
                available,
                floor,
            )
            self._fall_back(copying, "pressure")
            self._back_off(copying)
            evicted += 1
            available = self.system.available_bytes()
        # The order costs a walk over /proc (who holds what): only when something must go.
        order = (
            self._eviction_order()
            if policy.keep_evicting(available, floor, event.kind, evicted)
            else []
        )
        for name in order:
            if not policy.keep_evicting(available, floor, event.kind, evicted):
                break
            available = self._evict(self.models[name], event.kind, available)
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
                    sum(sum(m.retired.values()) for m in self.models.values()),
                )
            self._nothing_to_evict = True

    def _eviction_order(self) -> list[str]:
        staged = [
            (m.config, g)
            for m in self.models.values()
            if m.state == "staged" and (g := m.generation)
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
        self._fall_back(model, "pressure")
        pinned = sum(size for key, size in model.retired.items() if key in generation.file_keys)
        backoff = self._back_off(model)
        available = self.system.available_bytes()
        log.warning(
            "%s: evicted for memory pressure (%s): MemAvailable %d -> %d, floor %d; freed %d"
            " bytes, %d pinned by readers; staged again no sooner than %.1fs from now"
            " (eviction %d in a row)",
            model.config.name,
            trigger,
            available_before,
            available,
            self.config.memory.min_available_bytes,
            generation.manifest.size_bytes - pinned,
            pinned,
            backoff.delay_seconds,
            backoff.count,
        )
        return available

    def _back_off(self, model: Model) -> policy.Backoff:
        name = model.config.name
        backoff = policy.next_backoff(
            self.backoffs.get(name),
            self.system.monotonic(),
            self.config.memory.effective_cooldown_seconds,
        )
        self.backoffs[name] = backoff
        return backoff

    def _maybe_resume(self) -> None:
        """When memory is calm again, one model evicted (or refused) for pressure goes back to
        pending, the highest priority first; _start checks its budget again."""
        waiting = [
            m
            for m in self.models.values()
            if m.state == "fallback" and m.reason == "pressure" and not m.held
        ]
        busy = any(m.job or (m.state == "pending" and not m.held) for m in self.models.values())
        if not waiting or busy or self.stopping:
            return
        memory = self.config.memory
        available, since = (
            self.system.available_bytes(),
            self._since_pressure(self.last_pressure_at),
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
        model = self.models[name]
        model.state, model.reason = "pending", None
        log.info(
            "%s: staging again: MemAvailable %d >= resume %d, no pressure for %s",
            name,
            available,
            memory.resume_available_bytes,
            "ever" if since is None else f"{since:.1f}s",
        )

    def _pressure_fields(self, model: Model) -> dict[str, Any]:
        backoff = self.backoffs.get(model.config.name)
        return {
            "pressure_evictions": backoff.count if backoff else 0,
            "backoff_seconds": backoff.delay_seconds if backoff else None,
        }

    def _memory_status(self, pinned_bytes: int) -> dict[str, Any]:
        """Runs in the control thread, like status()."""
        since = self._since_pressure(self.snapshot.get("last_pressure_at"))
        return memory_status(self.config.memory, self.system, since, pinned_bytes)

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
        models = []
        for model in self.models.values():
            generation = model.generation
            models.append(
                {
                    "name": model.config.name,
                    "state": model.state,
                    "link": str(model.link),
                    "target": links.read(model.link),
                    "source": str(model.config.source),
                    "size_bytes": generation.manifest.size_bytes if generation else None,
                    "digest": generation.manifest.digest if generation else None,
                    "generation": generation.id if generation else None,
                    "reason": model.reason,
                    "progress": 1.0
                    if model.state == "staged"
                    else (model.job.progress if model.job else 0.0),
                    "priority": model.config.priority,
                    **self._pressure_fields(model),
                    "skipped": list(generation.manifest.skipped) if generation else [],
                    "_current": generation.file_keys if generation else {},
                    # Swapped-out generations still in their grace period count like unlinked ones:
                    # the link no longer points at them, so whoever holds them pins their bytes.
                    "_retired": {
                        **model.retired,
                        **{k: v for _, g in model.outgoing for k, v in g.file_keys.items()},
                    },
                }
            )
        self.snapshot = {"models": models, "last_pressure_at": self.last_pressure_at}
        staged = sum(m.state == "staged" for m in self.models.values())
        self.notifier.status(f"{staged}/{len(self.models)} models staged")

    def status(self, name: str | None = None) -> dict[str, Any]:
        """Runs in the control thread, from the latest snapshot plus fresh readings."""
        models = self.snapshot.get("models", [])
        if name is not None:
            models = [m for m in models if m["name"] == name]
            if not models:
                raise NotFound(f"no model named {name} in {self.config_path}")
        wanted = {k for m in models for k in [*m["_current"], *m["_retired"]]}
        held = holders(self.system.proc, wanted)
        size, used = self.store.usage()
        result = []
        for m in models:
            public = {k: v for k, v in m.items() if not k.startswith("_")}
            pinned = {k: v for k, v in m["_retired"].items() if k in held}
            users = set().union(*(held[k] for k in [*m["_current"], *pinned] if k in held))
            public["pinned_bytes"] = sum(pinned.values())
            public["users"] = sorted(users)
            result.append(public)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "store": {
                "path": str(self.store.path),
                "mounted": self.store.mounted,
                "size_bytes": size,
                "used_bytes": used,
                "swappable": self.store.swappable,
            },
            "memory": self._memory_status(sum(m["pinned_bytes"] for m in result)),
            "models": result,
        }

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
            for staged_file in manifest.files:
                try:
                    actual = _hash_file(generation.path / staged_file.relpath, manifest.algorithm)
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


def _hash_file(path: Path, algorithm: str) -> str:
    hasher = new_hasher(algorithm)
    buffer = bytearray(CHUNK_BYTES)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            hasher.update(memoryview(buffer)[:count])
    return f"{algorithm}:{hasher.hexdigest()}"


def run_daemon(config_path: Path) -> int:
    config = load_config(config_path)
    return Daemon(config_path, config, System(), Notifier()).run()
