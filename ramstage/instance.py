"""What lies between two daemons: the lock that makes a daemon the only one on its store and
socket, the operator's evictions kept for the next one, and the store that a stop leaves.

A daemon that stops keeps its verified generations and the links to them, so the next one (a
`systemctl restart`, a package upgrade, a pod rollout) adopts them without copying and
applications read from RAM all along. `ramstage unmount`, the unit's ExecStopPost, frees them
when no start follows: links back on their sources, generations deleted, the tmpfs unmounted.
While no daemon runs, nothing watches memory pressure (docs/design.md, "Stop and restart").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ramstage import links
from ramstage.config import Config
from ramstage.errors import RamstageError
from ramstage.store import MARKER, Store
from ramstage.system import System

log = logging.getLogger("ramstage")
# systemd jobs after which the unit runs again, so the store is kept for it: `systemctl
# restart` and debhelper's restart after an upgrade run a restart job, whose stop half runs
# ExecStopPost.
RESTARTING_JOBS = frozenset({"start", "restart", "try-restart", "reload-or-start"})


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{suffix}")


def lock_paths(config: Config) -> list[Path]:
    """One lock beside the store and one beside the socket: two configs that share either
    one cannot both run."""
    return sorted({_beside(config.store.path, "lock"), _beside(config.socket, "lock")})


@contextlib.contextmanager
def only_one(config: Config, doing: str) -> Iterator[None]:
    """Holds the locks (flock(2), released by the kernel however the process ends) for as long
    as the block runs; another process holding one is named by the PID it wrote there."""
    fds: list[int] = []
    try:
        for path in lock_paths(config):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RamstageError(
                    f"cannot {doing}: a ramstage daemon (PID {pid}) already runs on "
                    f"store {config.store.path} and socket {config.socket} (lock {path}); "
                    "stop it first (systemctl stop ramstage), or give this one its own "
                    "store.path and socket"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        for fd in fds:
            os.close(fd)


# ---- the operator's evictions -----------------------------------------------------------


class Evictions:
    """The models an operator evicted: they stay on their sources until `ramstage stage`,
    across restarts (a file beside the store, in /run: a reboot forgets it)."""

    def __init__(self, config: Config) -> None:
        self.path = _beside(config.store.path, "held.json")
        self.saved: set[str] = set()

    def load(self) -> set[str]:
        try:
            names = json.loads(self.path.read_text())
        except FileNotFoundError:
            names = []
        except (OSError, ValueError) as error:
            log.warning("ignoring %s: %s", self.path, error)
            names = []
        listed = names if isinstance(names, list) else []
        self.saved = {n for n in listed if isinstance(n, str)}
        return set(self.saved)

    def keep(self, names: set[str]) -> None:
        """Saves the names when they changed."""
        if names == self.saved:
            return
        temporary = self.path.with_name(f"{self.path.name}.tmp")
        temporary.write_text(json.dumps(sorted(names)))
        os.replace(temporary, self.path)
        self.saved = set(names)


# ---- after a stop -----------------------------------------------------------------------


def keep_for_restart(system: System, unit: str) -> str | None:
    """Why the store stays after the unit stopped, or None to free it: a start of the unit
    follows (a restart job), or the daemon died with no stop asked for (Restart= brings it
    back, and the links still point into the store)."""
    job = system.queued_job(unit)
    if job in RESTARTING_JOBS:
        return f"systemd is running a {job} job for {unit}; the next daemon adopts it"
    result = system.environ.get("SERVICE_RESULT", "success")
    if job is None and result != "success":
        return f"the daemon ended with {result}; its restart adopts it"
    return None


def free(config: Config, system: System) -> str:
    """Every link that points into the store goes back to its source (or away, with no
    source), then the generations are deleted and the tmpfs unmounted: what a stop with no
    start after it frees. Refused while a daemon runs."""
    store = Store(config.store, system)
    with only_one(config, "free the store"):
        mounted = config.store.mount and store.fs.mounted
        if (mounted or not config.store.mount) and (store.path / MARKER).is_file():
            _links_to_sources(config, store.path, system)
            store.clear()
        if store.rings.ours:  # a process still loading keeps its ring's pages till done
            store.rings.unmount()
        if not mounted:
            return f"store {store.path}: emptied, every link on its source"
        store.fs.unmount()
        return f"store {store.path}: emptied and unmounted, every link on its source"


def _links_to_sources(config: Config, store_path: Path, system: System) -> None:
    sources = {m.name: m.resolve() for m in config.models}
    if not config.links_dir.is_dir():
        return
    for link in sorted(config.links_dir.iterdir()):
        target = links.read(link)
        if target is None or not target.startswith(f"{store_path}/"):
            continue
        source = sources.get(link.name)
        if source is not None and source.exists():
            links.point(link, source, step=system.step)
        else:
            links.remove(link, step=system.step)
