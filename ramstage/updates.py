"""Source updates, from an inotify event to "stage the new version", and the look at a source
that every decision about it starts from.

An event only starts a model's settle timer; once its source has been quiet for watch.settle,
the loop lists it and asks who holds it open for writing, and lifecycle.settled decides. A
rescan (queue overflow, failed watch, watch.rescan) marks every model at once.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from ramstage import lifecycle
from ramstage.access import Trust, Untrusted
from ramstage.config import WatchConfig
from ramstage.errors import RamstageError
from ramstage.holders import writers
from ramstage.hub import downloads
from ramstage.model import Action, Event, Locate, Model, Reason, Reload, Rescan, SourceEvent, Why
from ramstage.reach import Reach, Unreachable
from ramstage.sources import list_source
from ramstage.system import System
from ramstage.watcher import ConfigWatcher, SourceWatcher

log = logging.getLogger("ramstage")


def look(source: Path, trust: Trust, reach: Reach) -> lifecycle.Listing:
    """The source as it is now, listed by the model's trust rule, in the terms the lifecycle
    decides on."""
    try:
        listing = reach.call(source, lambda: list_source(source, trust))
    except FileNotFoundError:
        return lifecycle.Listing(missing=True)
    except Untrusted as error:
        return lifecycle.Listing(error=Why(Reason.UNTRUSTED, str(error)))
    except OSError as error:  # a hung, failing or disconnected mount may answer again
        retry = isinstance(error, Unreachable) or error.errno in (errno.EIO, errno.ENOTCONN)
        return lifecycle.Listing(error=Why(Reason.ERROR, str(error), retry=retry))
    except RamstageError as error:
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
        self.relocated = False  # a source resolved to another path since the watches were set
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
        """The paths whose changes concern each model: its source, and a hub repo's refs."""
        return {
            name: (model.source, *filter(None, [model.settings.refs]))
            for name, model in self.models.items()
        }

    def locate(self, model: Model) -> OSError | None:
        """Resolves the model's source anew: a hub repo's revision, read from its refs/ file
        with reach's deadline (a hung mount under the cache must not block the loop), may have
        moved to another snapshot. What went wrong, if it could not be read in time; the
        source last resolved stays meanwhile."""
        refs = model.settings.refs
        try:
            source = (
                model.settings.resolve()
                if refs is None
                else self.reach.call(refs, model.settings.resolve)
            )
        except OSError as error:
            return error
        if source != model.source:
            self.apply(model, [Locate(source)])
            self.relocated = True  # settle() watches the new snapshot
        return None

    def look(self, model: Model) -> lifecycle.Listing:
        """The model's source, resolved anew (locate), as it is now."""
        problem = self.locate(model)
        if problem is not None:
            unreachable = Why(Reason.ERROR, f"source unreachable: {problem}", retry=True)
            return lifecycle.Listing(error=unreachable)
        return look(model.source, model.settings.trust, self.reach)

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
        if self.relocated:
            self.relocated = False
            self.watcher.watch(self._sources())
        now = self.system.monotonic()
        for model in list(self.models.values()):
            if model.changed_at is None or now - model.changed_at < self.config.settle_seconds:
                continue
            listing = self.look(model)
            # inotify cannot tell a writer that pauses from one that has finished.
            keys = {(i[0], i[1]) for _, i in listing.identities} | downloads(model.source)
            busy = writers(self.system.proc, keys) if keys else set()
            if busy:
                log.debug("%s: still open for writing by %s", model.name, sorted(busy))
            self.apply(model, lifecycle.settled(model, listing, writers=bool(busy), now=now))
