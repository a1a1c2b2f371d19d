"""Source watching: inotify (inotify.py) turned into events for the loop.

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
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from ramstage.inotify import IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW, Inotify

log = logging.getLogger(__name__)
T = TypeVar("T")


class Look(Protocol):
    """Runs a look at a path, maybe elsewhere and with a deadline (reach.Reach.call): a source
    on a hung mount must not block the loop, which calls watch()."""

    def __call__(self, path: str | Path, look: Callable[[], T], /) -> T: ...


@dataclass(frozen=True)
class Watch:
    path: str
    recursive: bool


def watches_for(source: Path, look: Look) -> set[Watch]:
    parent = source.parent
    wanted = {Watch(str(parent), False), Watch(str(parent.parent), False)}
    try:
        if stat.S_ISDIR(look(source, lambda: os.stat(source)).st_mode):
            wanted.add(Watch(str(source), True))
    except OSError:
        pass  # missing, or not answering: the watches above it see it come back
    return wanted


def _direct(path: str | Path, call: Callable[[], T]) -> T:
    return call()


def affects(event_path: str, source: str, event_type: str) -> bool:
    """An event concerns a source if it is on the source, inside it, or on a directory above it
    (replaced or removed). A directory above it being merely "modified" is another file's news."""
    if event_path == source or event_path.startswith(source + "/"):
        return True
    return event_type != "modified" and source.startswith(event_path.rstrip("/") + "/")


class SourceWatcher:
    """Posts on_change(name) for every model whose source an event concerns, from its reader
    thread; on_rescan() when events may have been lost (queue overflow, watch limit)."""

    def __init__(
        self,
        on_change: Callable[[str], None],
        on_rescan: Callable[[str], None],
        look: Look = _direct,
    ) -> None:
        self.on_change, self.on_rescan, self.look = on_change, on_rescan, look
        # name -> the paths that concern it (its source, a hub repo's refs); replaced whole
        self.sources: dict[str, tuple[str, ...]] = {}
        self.inotify: Inotify | None = None  # watches may be added before start()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()  # watch() runs on the loop's thread, events on the reader's
        self._watched: dict[str, tuple[int, tuple[int, int]]] = {}  # directory -> wd, inode
        self._paths: dict[int, set[str]] = {}  # wd -> the directories it stands for
        self._trees: set[str] = set()  # directory sources: new subdirectories are watched too
        self._failed: dict[str, str] = {}  # directory -> why; the periodic rescan tries again
        self.unavailable: str | None = None  # why there is no inotify instance at all
        self.started = False

    def start(self) -> None:
        self.started = True
        self._instance()

    def _instance(self) -> Inotify | None:
        """The instance, made now if there is none yet: at start, fs.inotify.max_user_instances
        may be reached, and the next rescan (watch()) tries again."""
        if self.inotify is None:
            try:
                self.inotify = Inotify()
            except OSError as error:
                # EMFILE: fs.inotify.max_user_instances is reached by other programs of root's.
                if self.unavailable is None:
                    log.warning("cannot watch sources (%s); relying on rescans", error)
                    self.on_rescan(f"inotify unavailable: {error}")
                self.unavailable = str(error)
                return None
            if self.unavailable is not None:
                log.info("watching sources again")
            self.unavailable = None
        if self.started and self.thread is None:
            self.thread = threading.Thread(target=self._read, name="ramstage-inotify", daemon=True)
            self.thread.start()
        return self.inotify

    def problems(self) -> list[str]:
        """Why watching is degraded now (status says so): changes are then seen by rescans."""
        if self.unavailable is not None:
            return [f"inotify unavailable: {self.unavailable}"]
        failed = dict(self._failed)  # a copy in one step: the reader thread may add to it
        return [f"cannot watch {d}: {why}" for d, why in sorted(failed.items())]

    def stop(self) -> None:
        if self.inotify:
            self.inotify.close()
            if self.thread:
                self.thread.join(timeout=5)
            self.inotify.release()
        self.inotify, self.thread, self.started = None, None, False

    def watch(self, sources: dict[str, tuple[Path, ...]]) -> None:
        """Makes the watches match these sources; called again whenever a watched directory
        may have been replaced, it moves a watch to the directory now at that path, and after
        a queue overflow it catches up with subdirectories made meanwhile."""
        self.sources = {name: tuple(map(str, paths)) for name, paths in sources.items()}
        wanted: set[Watch] = set().union(
            *(watches_for(path, self.look) for paths in sources.values() for path in paths)
        )
        with self.lock:
            self._trees = {w.path for w in wanted if w.recursive}
            directories = {w.path for w in wanted} | set().union(
                *(self._subdirectories(tree) for tree in self._trees)
            )
            self._failed = {d: why for d, why in self._failed.items() if d in directories}
            for directory in list(self._watched):
                inode = self._inode(directory)
                if directory not in directories or inode != self._watched[directory][1]:
                    self._unwatch(directory)
            for directory in sorted(directories - self._watched.keys()):
                self._add(directory)

    def _subdirectories(self, tree: str) -> set[str]:
        try:
            return self.look(tree, lambda: _subdirectories(tree))
        except OSError:
            return set()

    def _inode(self, path: str) -> tuple[int, int] | None:
        try:
            st = self.look(path, lambda: os.stat(path))
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _add(self, directory: str) -> None:
        inode, inotify = self._inode(directory), self._instance()
        if inode is None or inotify is None:
            return  # appears later: the watch on the directory above it sees that
        try:
            wd = inotify.add_watch(directory)
        except OSError as error:
            # ENOSPC is fs.inotify.max_user_watches: rely on rescans until it fits. One rescan
            # per failure, not per attempt: a rescan calls watch() again.
            if directory not in self._failed:
                self._failed[directory] = str(error)
                log.warning("cannot watch %s (%s); relying on rescans", directory, error)
                self.on_rescan(f"watch failed: {error}")
            return
        self._failed.pop(directory, None)
        self._watched[directory] = (wd, inode)
        self._paths.setdefault(wd, set()).add(directory)

    def _unwatch(self, directory: str) -> None:
        wd, _ = self._watched.pop(directory)
        paths = self._paths.get(wd, set())
        paths.discard(directory)
        if not paths and self.inotify:
            self._paths.pop(wd, None)
            self.inotify.rm_watch(wd)

    def _read(self) -> None:
        assert self.inotify is not None
        for event in self.inotify.events():
            if event.mask & IN_Q_OVERFLOW:
                self.on_rescan("inotify queue overflow")
                continue
            with self.lock:
                directories = sorted(self._paths.get(event.wd, ()))
                if event.mask & IN_IGNORED:  # the directory is gone, and its watch with it
                    for directory in directories:
                        self._watched.pop(directory, None)
                    self._paths.pop(event.wd, None)
                    continue
                paths = [
                    os.path.join(d, os.fsdecode(event.name)) if event.name else d
                    for d in directories
                ]
                if event.mask & IN_ISDIR and event.kind == "created":
                    for path in paths:
                        if any(path.startswith(tree + "/") for tree in self._trees):
                            for directory in sorted(self._subdirectories(path)):
                                self._add(directory)
            self._dispatch(paths, event.kind)

    def _dispatch(self, paths: list[str], kind: str) -> None:
        for name, sources in self.sources.items():
            if any(affects(path, source, kind) for path in paths for source in sources):
                self.on_change(name)


def _subdirectories(tree: str) -> set[str]:
    """A directory and every directory below it, not through symlinks."""
    found = {tree}
    for directory, subdirs, _ in os.walk(tree):
        found.update(os.path.join(directory, name) for name in subdirs)
    return found if os.path.isdir(tree) else set()


class ConfigWatcher:
    """Calls on_change() from its reader thread when the config file's contents change.

    kubelet updates a ConfigMap volume by writing a new `..<timestamp>` directory and renaming
    a `..data_tmp` symlink over `..data`; the file (`NAME -> ..data/NAME`) is never written, so
    only the directory holding it sees an event (IN_MOVED_TO). Every event in that directory
    leads to a read of the file through its links, and only new contents count: the steps of
    one swap before the rename, and a swap to the same contents, call nothing. A file written
    in place may be read half-written; a reload of it is refused and the next write retried.
    """

    def __init__(self, path: Path, on_change: Callable[[], None]) -> None:
        self.path, self.on_change = path, on_change
        self.inotify: Inotify | None = None
        self.thread: threading.Thread | None = None
        self.contents: bytes | None = None

    def start(self) -> None:
        self.contents = _contents(self.path)
        try:
            self.inotify = Inotify()
            self.inotify.add_watch(str(self.path.parent))
        except OSError as error:
            log.warning("cannot watch %s (%s); reload by SIGHUP", self.path, error)
            self.stop()
            return
        self.thread = threading.Thread(target=self._read, name="ramstage-config", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.inotify:
            self.inotify.close()
            if self.thread:
                self.thread.join(timeout=5)
            self.inotify.release()
        self.inotify, self.thread = None, None

    def _read(self) -> None:
        assert self.inotify is not None
        for _ in self.inotify.events():
            contents = _contents(self.path)
            if contents is not None and contents != self.contents:
                self.contents = contents
                log.info("%s changed: reloading", self.path)
                self.on_change()


def _contents(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None  # between an editor's unlink and its rename, or a swap's steps
