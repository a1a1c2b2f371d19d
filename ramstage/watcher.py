"""Source watching: inotify (through the watchdog library) turned into events for the loop.

Each source is watched from its parent and grandparent directories (non-recursive), and a
directory source also recursively, so in-place writers, rename-into-place writers, deletions
and a replaced parent directory are all seen. Events only say "look again": the loop decides
what changed by comparing file identities once the source has settled, so a lost or
coalesced event costs nothing as long as one arrives, and a queue overflow or the periodic
rescan covers the rest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

# Opening and reading a source (our own copies included) says nothing about its content.
_IGNORED_EVENTS = {"opened", "closed_no_write"}


@dataclass(frozen=True)
class Watch:
    path: str
    recursive: bool


def watches_for(source: Path) -> set[Watch]:
    parent = source.parent
    wanted = {Watch(str(parent), False), Watch(str(parent.parent), False)}
    if source.is_dir():
        wanted.add(Watch(str(source), True))
    return wanted


def affects(event_path: str, source: str, event_type: str) -> bool:
    """An event concerns a source if it is on the source, inside it, or on a directory above it
    (replaced or removed). A directory above it being merely "modified" is another file's news."""
    if event_path == source or event_path.startswith(source + "/"):
        return True
    return event_type != "modified" and source.startswith(event_path.rstrip("/") + "/")


class _OverflowSignal(logging.Handler):
    """watchdog rebuilds its own watches after an inotify queue overflow but does not tell
    event handlers; its log record is the one signal it gives (IN_Q_OVERFLOW, inotify(7))."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()


class SourceWatcher(FileSystemEventHandler):
    """Posts on_change(name) for every model whose source an event concerns, from the observer's
    thread; on_rescan() when events may have been lost (queue overflow, watch limit)."""

    def __init__(self, on_change: Callable[[str], None], on_rescan: Callable[[str], None]) -> None:
        self.on_change, self.on_rescan = on_change, on_rescan
        self.sources: dict[str, str] = {}  # name -> source path; replaced whole, never mutated
        self.observer = Observer()
        self.observer.daemon = True
        self._scheduled: dict[Watch, tuple[object, tuple[int, int]]] = {}
        self._failed: set[Watch] = set()  # said once; the periodic rescan tries them again
        self._overflow = _OverflowSignal(lambda: on_rescan("inotify queue overflow"))
        logging.getLogger("watchdog").addHandler(self._overflow)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        logging.getLogger("watchdog").removeHandler(self._overflow)
        self.observer.stop()
        self.observer.join(timeout=5)

    def watch(self, sources: dict[str, Path]) -> None:
        """Makes the watches match these sources; called again whenever a watched directory
        may have been replaced, it moves a watch to the directory now at that path."""
        self.sources = {name: str(path) for name, path in sources.items()}
        wanted: set[Watch] = set().union(*(watches_for(p) for p in sources.values()))
        for watch in list(self._scheduled):
            if watch not in wanted or _inode(watch.path) != self._scheduled[watch][1]:
                self.observer.unschedule(self._scheduled.pop(watch)[0])  # type: ignore[arg-type]
        for watch in wanted - self._scheduled.keys():
            inode = _inode(watch.path)
            if inode is None:
                continue  # appears later: the watch on the directory above it sees that
            try:
                handle = self.observer.schedule(self, watch.path, recursive=watch.recursive)
            except OSError as error:
                # ENOSPC here is fs.inotify.max_user_watches: rely on rescans until it fits. One
                # rescan per failure, not per attempt: a rescan calls watch() again.
                if watch not in self._failed:
                    self._failed.add(watch)
                    log.warning("cannot watch %s (%s); relying on rescans", watch.path, error)
                    self.on_rescan(f"watch failed: {error}")
                continue
            self._failed.discard(watch)
            self._scheduled[watch] = (handle, inode)

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.event_type in _IGNORED_EVENTS:
            return
        paths = [os.fsdecode(event.src_path)]
        if getattr(event, "dest_path", None):
            paths.append(os.fsdecode(event.dest_path))
        for name, source in self.sources.items():
            if any(affects(path, source, event.event_type) for path in paths):
                self.on_change(name)


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
