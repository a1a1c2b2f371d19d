"""Source updates, from an inotify event to "stage the new version", and the look at a source
that every decision about it starts from.

An event only starts a model's settle timer; once its source has been quiet for watch.settle,
the loop lists it and asks who holds it open for writing, and lifecycle.settled decides. A
rescan (queue overflow, failed watch, watch.rescan) marks every model at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from ramstage import lifecycle
from ramstage.access import Untrusted
from ramstage.config import WatchConfig
from ramstage.errors import RamstageError
from ramstage.holders import writers
from ramstage.hub import downloads
from ramstage.model import Action, Event, Model, Reason, Reload, Rescan, Settings, SourceEvent, Why
from ramstage.reach import Reach
from ramstage.sources import list_source
from ramstage.system import System
from ramstage.watcher import ConfigWatcher, SourceWatcher

log = logging.getLogger("ramstage")


def look(config: Settings, reach: Reach) -> lifecycle.Listing:
    """The source as it is now, listed by the model's trust rule, in the terms the lifecycle
    decides on."""
    try:
        listing = reach.call(config.source, lambda: list_source(config.source, config.trust))
    except FileNotFoundError:
        return lifecycle.Listing(missing=True)
    except Untrusted as error:
        return lifecycle.Listing(error=Why(Reason.UNTRUSTED, str(error)))
    except (OSError, RamstageError) as error:
        return lifecycle.Listing(error=Why(Reason.ERROR, str(error)))
    return lifecycle.Listing(listing.identities(), listing.size_bytes)


class SourceUpdates:
    def __init__(
        self,
        config: WatchConfig,
        system: System,
        reach: Reach,
        models: Mapping[str, Model],
        apply: Callable[[Model, list[Action]], None],
        post: Callable[[Event], None],
        config_path: Path,
    ) -> None:
        self.config, self.system, self.models, self.apply = config, system, models, apply
        self.reach = reach
        self.watcher = SourceWatcher(
            lambda name: post(SourceEvent(name)), lambda reason: post(Rescan(reason)), reach.call
        )
        self.config_watcher = ConfigWatcher(config_path, lambda: post(Reload()))

    def start(self) -> None:
        self.watcher.watch(self._sources())
        self.watcher.start()
        self._watch_config()

    def stop(self) -> None:
        self.watcher.stop()
        self.config_watcher.stop()

    def configure(self, config: WatchConfig) -> None:
        """After a reload: new settings, and watches for the models as they are now."""
        self.config = config
        self.watcher.watch(self._sources())
        self._watch_config()

    def _watch_config(self) -> None:
        """`watch.config`: one more inotify instance, on the config file's directory, while
        it is on."""
        if not self.config.config:
            self.config_watcher.stop()
        elif self.config_watcher.thread is None:
            self.config_watcher.start()

    def next_due(self) -> float | None:
        """When the earliest marked source will have settled, if any is marked."""
        due = [m.changed_at for m in self.models.values() if m.changed_at is not None]
        return min(due) + self.config.settle_seconds if due else None

    def _sources(self) -> dict[str, tuple[Path, ...]]:
        return {name: model.settings.watched for name, model in self.models.items()}

    def on_event(self, name: str) -> None:
        model = self.models.get(name)
        if model is None:
            return
        if model.changed_at is None:
            log.debug("%s: source event; waiting %gs to settle", name, self.config.settle_seconds)
        self.apply(model, lifecycle.source_event(model, self.system.monotonic()))
        self.watcher.watch(self._sources())  # a watched directory may have been replaced

    def rescan(self, reason: str) -> None:
        """Looks at every source again, as if each had sent an event a settle period ago."""
        log.info("rescanning every source (%s)", reason)
        now = self.system.monotonic()
        self.watcher.watch(self._sources())
        for model in self.models.values():
            self.apply(model, lifecycle.rescan(model, now, self.config.settle_seconds))

    def settle(self) -> None:
        """Takes up sources that have been quiet for watch.settle."""
        now = self.system.monotonic()
        for model in list(self.models.values()):
            if model.changed_at is None or now - model.changed_at < self.config.settle_seconds:
                continue
            listing = look(model.settings, self.reach)
            # inotify cannot tell a writer that pauses from one that has finished.
            keys = {(i[0], i[1]) for _, i in listing.identities} | downloads(model.settings.source)
            busy = writers(self.system.proc, keys) if keys else set()
            if busy:
                log.debug("%s: still open for writing by %s", model.name, sorted(busy))
            self.apply(model, lifecycle.settled(model, listing, writers=bool(busy), now=now))
