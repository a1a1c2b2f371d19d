"""Carries out the actions lifecycle.py decides, for one model at a time, in the loop's thread:
links, generations, copies and the answers to those waiting. The only writer of a record.

Order matters and is the decision's: a link moves (atomically, links.point) before the
generation it leaves is released, so no reader ever follows it into a deleted copy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from ramstage import links, units
from ramstage.checkpoint import check_generation
from ramstage.copier import stage_source
from ramstage.crew import Crew, default_workers
from ramstage.errors import SourceHung
from ramstage.generations import Generations
from ramstage.manifest import CopyKey, Manifest
from ramstage.model import (
    Action,
    Answer,
    Await,
    BackOff,
    Configure,
    DropCopy,
    Event,
    Hold,
    Job,
    JobDone,
    Locate,
    Log,
    Mark,
    Model,
    Note,
    Remember,
    RetryLater,
    Serve,
    Serving,
    Settings,
    StartCopy,
    Want,
    Work,
)
from ramstage.system import System

log = logging.getLogger("ramstage")
# A copy that reads nothing from its source for this long is given up on (a hung mount); its
# thread may stay blocked, but publishes nothing. A stop waits this long for copies to stop.
COPY_STALL_SECONDS = 10.0
STOP_WAIT_SECONDS = 2.0
_FIELDS: dict[type, str] = {
    Note: "why",
    Want: "want",
    Hold: "held",
    Remember: "seen",
    Mark: "changed_at",
    BackOff: "backoff",
    RetryLater: "retry",
    Locate: "source",
    Configure: "settings",
}


def copy_source(
    settings: Settings,
    source: Path,
    job: Job,
    checksum: str,
    crew: Crew,
    system: System,
    copies: Mapping[CopyKey, tuple[Path, str]],
    by_device: bool,
) -> Manifest:
    """Runs in the copy worker and writes nothing but the job's partial directory; the loop
    publishes it. A torn or truncated checkpoint hashes fine, so its format is checked too.
    by_device (staging.workers not set): the copies from one spinning disk read one file at a
    time between them."""
    algorithm = settings.digest.partition(":")[0] if settings.digest else checksum
    disk = system.spinning_disk(source) if by_device else None

    def progress(done_bytes: int, total_bytes: int) -> None:
        job.work.done_bytes, job.work.total_bytes = done_bytes, total_bytes
        job.work.moved_at = system.monotonic()
        job.progress = min(done_bytes / total_bytes, 1.0) if total_bytes else 1.0

    started = system.monotonic()
    manifest = stage_source(
        settings.name,
        source,
        job.partial,
        algorithm,
        trust=settings.trust,
        run_files=partial(_run_files, crew, job.work, lane=disk, most=None if disk is None else 1),
        on_progress=progress,
        cancel=job.cancel,
        expected_digest=settings.digest,
        copies=copies,
        sleep=system.sleep,
        step=system.step,
    )
    relpaths = [f.relpath for f in manifest.files]
    check_generation(job.partial / manifest.root, relpaths, settings.validate)
    return replace(manifest, staged_at=system.time(), copy_seconds=system.monotonic() - started)


def _run_files(
    crew: Crew,
    work: Work,
    owner: threading.Event,
    tasks: Sequence[Callable[[], Any]],
    **options: Any,
) -> list[Future[Any]]:
    """Crew.run_all, counting the files copied for status (from 0 again if the copy starts
    over)."""
    counting = threading.Lock()
    work.files_done, work.files_total = 0, len(tasks)

    def counted(task: Callable[[], Any]) -> Any:
        result = task()
        with counting:
            work.files_done += 1
        return result

    return crew.run_all(owner, [partial(counted, task) for task in tasks], **options)


class Actuator:
    def __init__(
        self,
        generations: Generations,
        post: Callable[[Event], None],
        checksum: str,
        workers: int | None,
    ) -> None:
        self.generations, self.post, self.system = generations, post, generations.system
        self.crew = Crew(1)  # shared by every copy in flight
        self.configure(checksum, workers)

    def configure(self, checksum: str, workers: int | None) -> None:
        """config.checksum and staging.workers (None: one per core, by the source's device)."""
        self.checksum, self.by_device = checksum, workers is None
        self.crew.resize(workers or default_workers(self.system.cores()))

    def apply(self, model: Model, actions: Iterable[Action]) -> None:
        served = model.serving
        for action in actions:
            self._apply(model, action)
            model.actions += 1
        self._tally(model, served)

    def _tally(self, model: Model, served: Serving) -> None:
        tally = model.tally
        # Given up for a reason: a stop or a removal from the config (no reason) is no eviction.
        if served is Serving.RAM and model.serving is not Serving.RAM and model.why:
            cause = model.why.reason.value
            tally.evictions[cause] = tally.evictions.get(cause, 0) + 1
        # A newer version waits until a copy of it is published (count_copy), even when its copy
        # is refused while the version before stays served; a model off RAM on purpose or for
        # a reason its state shows does not wait.
        if model.held or (model.serving is not Serving.RAM and not model.want):
            tally.wanted_since = None
        elif model.want and tally.wanted_since is None:
            tally.wanted_since = self.system.monotonic()

    def count_copy(self, model: Model, job: Job, size_bytes: int) -> None:
        model.tally.copies += 1
        model.tally.last_copy_seconds = self.system.monotonic() - job.work.started_at
        model.tally.last_copy_bytes = size_bytes
        model.tally.wanted_since = None

    def count_verify_failure(self, model: Model) -> None:
        model.tally.verify_failures += 1

    def _apply(self, model: Model, action: Action) -> None:
        if isinstance(action, Serve):
            self._serve(model, action)
        elif isinstance(action, StartCopy):
            self._start(model, action)
        elif isinstance(action, DropCopy):
            if model.job:
                model.job.cancel.set()
            model.job = None
        elif isinstance(action, Answer):
            for waiter in model.waiters:
                waiter.set_result(action.outcome)
            model.waiters.clear()
        elif isinstance(action, Await):
            model.waiters.append(action.waiter)
        elif isinstance(action, Log):
            log.log(action.level, "%s: %s", model.name, action.message)
        else:
            # The rest set the record's field of the same name as theirs.
            name = _FIELDS[type(action)]
            setattr(model, name, getattr(action, name))

    def _serve(self, model: Model, action: Serve) -> None:
        if action.serving is Serving.RAM:
            assert action.generation is not None
            generation = self.generations.find(model.name, action.generation)
            links.point(model.link, generation.target, relative=True, step=self.system.step)
            self.generations.serve(model.name, generation)
            if model.generation != generation.id:
                manifest = generation.manifest
                took = manifest.copy_seconds
                copy = f" in {units.duration(took)}" if took is not None else ""
                log.info(
                    "%s: staged generation %s (%s%s, %s)",
                    model.name,
                    generation.id,
                    units.size(manifest.size_bytes),
                    copy,
                    manifest.digest,
                )
                for skipped in manifest.skipped:
                    log.warning("%s: skipped %s", model.name, skipped)
        else:
            if action.serving is Serving.SOURCE:
                links.point(model.link, model.source, step=self.system.step)
            else:
                links.remove(model.link, step=self.system.step)
            self.generations.release(model.name)
        model.serving, model.generation = action.serving, action.generation

    def _start(self, model: Model, action: StartCopy) -> None:
        now = self.system.monotonic()
        job = Job(
            self.generations.new_partial(model.name),
            identities=action.identities,
            need_bytes=action.need_bytes,
            work=Work(now, moved_at=now),
        )
        copies = self.generations.copies()
        future: Future[Manifest] = Future()
        job.future = future
        name = model.name
        future.add_done_callback(lambda _: self.post(JobDone(name, job)))
        model.job = job
        copy = partial(
            copy_source,
            model.settings,
            model.source,
            job,
            self.checksum,
            self.crew,
            self.system,
            copies,
            self.by_device,
        )
        # A thread of its own, never joined: one blocked on a hung mount holds up no later
        # copy and no stop.
        threading.Thread(
            target=self._run, args=(job, future, copy), name="ramstage-copy", daemon=True
        ).start()

    def _run(self, job: Job, future: Future[Manifest], copy: Callable[[], Manifest]) -> None:
        try:
            outcome: tuple[Callable[[Any], None], Any] = (future.set_result, copy())
        except BaseException as error:
            outcome = (future.set_exception, error)
        try:
            outcome[0](outcome[1])
        except InvalidStateError:
            # Given up on (give_up_stalled) and its partial discarded by the loop meanwhile:
            # what this thread wrote since then goes too, as nothing else knows of it.
            self.generations.store.remove_path(job.partial)

    def give_up_stalled(self, models: Iterable[Model]) -> None:
        """A copy that read nothing for COPY_STALL_SECONDS fails now (the loop discards its
        partial at JobDone); its thread, maybe blocked for good, is called off."""
        now = self.system.monotonic()
        for model in models:
            job = model.job
            if job is None or job.future is None or job.future.done():
                continue
            reading = not job.work.total_bytes or job.work.done_bytes < job.work.total_bytes
            if reading and now - job.work.moved_at >= COPY_STALL_SECONDS:
                job.cancel.set()
                self.crew.forfeit(job.cancel)  # its thread may hold a worker for good
                stalled = SourceHung(
                    f"source read hung: nothing read from {model.source} for "
                    f"{COPY_STALL_SECONDS:g}s (a hung mount?)"
                )
                with contextlib.suppress(InvalidStateError):  # it finished just now
                    job.future.set_exception(stalled)

    def stop(self, models: Iterable[Model]) -> None:
        """Calls off every copy and waits a moment for their threads (not for one blocked on a
        hung mount: the process exits without it); their partials go."""
        running = [(m.name, m.job) for m in models if m.job]
        for _, job in running:
            job.cancel.set()
        wait([job.future for _, job in running if job.future], timeout=STOP_WAIT_SECONDS)
        for name, job in running:
            self.generations.discard(name, job.partial)
