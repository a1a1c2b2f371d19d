"""Source updates, from an inotify event to "stage the new version".

An event only marks a model; once its source has been quiet for watch.settle and no process
holds it open for writing, the file identities decide whether it changed. A rescan (queue
overflow, failed watch, watch.rescan) marks every model at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from ramstage.access import Untrusted
from ramstage.catalog import Catalog
from ramstage.config import WatchConfig
from ramstage.errors import RamstageError
from ramstage.sources import list_source
from ramstage.system import System
from ramstage.users import writers
from ramstage.watcher import SourceWatcher

log = logging.getLogger("ramstage")


class SourceUpdates:
    def __init__(
        self,
        config: WatchConfig,
        system: System,
        catalog: Catalog,
        on_change: Callable[[str], None],
        on_rescan: Callable[[str], None],
    ) -> None:
        self.config, self.system, self.catalog = config, system, catalog
        self.watcher = SourceWatcher(on_change, on_rescan)
        self.last_rescan = 0.0

    def start(self) -> None:
        self.watcher.watch(self._sources())
        self.watcher.start()
        self.last_rescan = self.system.monotonic()

    def stop(self) -> None:
        self.watcher.stop()

    def configure(self, config: WatchConfig) -> None:
        """After a reload: new settings, and watches for the models as they are now."""
        self.config = config
        self.watcher.watch(self._sources())

    def rescan_due(self, now: float) -> bool:
        return now - self.last_rescan > self.config.rescan_seconds

    def next_due(self) -> float | None:
        """When the earliest marked source will have settled, if any is marked."""
        due = [m.changed_at for m in self.catalog.models.values() if m.changed_at is not None]
        return min(due) + self.config.settle_seconds if due else None

    def _sources(self) -> dict[str, Path]:
        return {name: model.config.source for name, model in self.catalog.models.items()}

    def on_event(self, name: str) -> None:
        model = self.catalog.models.get(name)
        if model is None:
            return
        if model.changed_at is None:
            log.debug(
                "%s: source event; waiting %gs for it to settle",
                name,
                self.config.settle_seconds,
            )
        model.changed_at = self.system.monotonic()
        if model.job:
            # The copy is of a source in flux: call it off and copy once it has settled.
            model.job.cancel.set()
            model.job = None
            model.state = "staged" if model.generation else "pending"
        self.watcher.watch(self._sources())  # a watched directory may have been replaced

    def rescan(self, reason: str) -> None:
        """Looks at every source again, as if each had sent an event a settle period ago."""
        log.info("rescanning every source (%s)", reason)
        now = self.system.monotonic()
        self.last_rescan = now
        self.watcher.watch(self._sources())
        for model in self.catalog.models.values():
            if model.changed_at is None:
                model.changed_at = now - self.config.settle_seconds

    def settle(self) -> None:
        """Takes up sources that have been quiet for watch.settle and that no one holds open
        for writing; a source whose files have the identities last seen has not changed."""
        now = self.system.monotonic()
        for model in self.catalog.models.values():
            if model.changed_at is None or now - model.changed_at < self.config.settle_seconds:
                continue
            try:
                listing = list_source(model.config.source, model.config.trust)
            except FileNotFoundError:
                model.changed_at = None
                self.catalog.set_missing(model)
                continue
            except Untrusted:
                model.changed_at = None
                model.state = "pending"  # the daemon refuses it, with the reason, when it starts
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
                self.catalog.point_at_source(model)
            model.state = "pending"
