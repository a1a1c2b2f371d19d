"""The store's file system: a size-bounded tmpfs mounted in PID 1's mount namespace (or one
already there adopted, and resized to the configured size), or, with `store.mount: false`, a
plain directory. store.py lays generations out inside it.

Mounting in PID 1's namespace is what makes the store visible to every other service,
sandboxed ones included (systemd.exec(5): a mount made in a service's private namespace is
not); the unit's `ramstage mount` does it before the daemon starts, the daemon adopts it.
"""

from __future__ import annotations

import logging
import os

from ramstage import units
from ramstage.config import StoreConfig
from ramstage.errors import RamstageError
from ramstage.system import MountEntry, System

log = logging.getLogger(__name__)
FS_NAME = "ramstage"  # the mount's source field: how an existing ramstage tmpfs is recognised


class Tmpfs:
    """The tmpfs at config.path. The store's by default; `source`, `mode`, `key` (the config
    key named in errors) and `inodes` make another one: the fast loader's rings (store.py)."""

    def __init__(
        self,
        config: StoreConfig,
        system: System,
        *,
        source: str = FS_NAME,
        mode: str = "0755",
        key: str = "store.path",
        inodes: int | None = None,
    ) -> None:
        self.config, self.system = config, system
        self.path = config.path
        self.source, self.mode, self.key = source, mode, key
        self.inodes = inodes  # nr_inodes=, else the kernel's default (half the RAM's pages)
        self.swappable: bool | None = None  # None: unknown (a plain directory)

    def _entry(self) -> MountEntry | None:
        return next((m for m in reversed(self.system.mounts()) if m.mountpoint == self.path), None)

    @property
    def mounted(self) -> bool:
        entry = self._entry()
        return entry is not None and entry.fstype == "tmpfs"

    @property
    def ours(self) -> bool:
        """Mounted, and by ramstage (its source field), not some other tmpfs at the path."""
        entry = self._entry()
        return entry is not None and entry.fstype == "tmpfs" and entry.source == self.source

    def prepare(self) -> None:
        """Mounts or adopts the tmpfs, or makes the plain directory."""
        if not self.config.mount:
            self.path.mkdir(parents=True, exist_ok=True)
            return
        entry = self._entry()
        if entry is None:
            self._mount()
        else:
            self._adopt(entry)

    def _adopt(self, entry: MountEntry) -> None:
        if entry.fstype != "tmpfs" or entry.source != self.source:
            raise RamstageError(
                f"{self.key} {self.path}: something else is mounted there "
                f"({entry.fstype} from {entry.source}); unmount it or choose another path"
            )
        self.swappable = "noswap" not in entry.options
        if self.usage()[0] != _page_rounded(self.config.size_bytes):
            log.info("resizing %s to %s", self.path, units.size(self.config.size_bytes))
            self._remount(f"size={self.config.size_bytes}")
        huge = _huge(entry)
        if huge != self.config.huge:
            try:
                self._remount(f"huge={self.config.huge}")  # for the pages allocated from now on
                log.info("%s: huge=%s now (was %s)", self.path, self.config.huge, huge)
            except OSError as error:  # as at a mount: a kernel without it keeps what it has
                log.info("%s: the kernel refused huge=%s (%s)", self.path, self.config.huge, error)
        log.info("adopted the tmpfs already mounted at %s", self.path)

    def _remount(self, options: str) -> None:
        self.system.run_in_init_namespace(["mount", "-o", f"remount,{options}", str(self.path)])

    def _mount(self) -> None:
        if self.path.is_dir() and any(self.path.iterdir()):
            # A mount hides what is below it: whatever was there would seem lost.
            raise RamstageError(
                f"{self.key} {self.path} is a directory that is not empty: a tmpfs mounted over "
                "it would hide its files; empty it, or choose another path"
            )
        self.system.run_in_init_namespace(["mkdir", "-p", str(self.path)])
        base = f"size={self.config.size_bytes},mode={self.mode},nosuid,nodev,noexec"
        base += f",nr_inodes={self.inodes}" if self.inodes else ""
        # Optional options, best first, each dropped where the kernel refuses it:
        # noswap (Linux 6.4+): a staged copy that is swapped out is slower than the SSD it
        # mirrors; huge= (store.huge, default within_size): the copier preallocates each file,
        # so it gets 2 MiB pages, which made torch.load through the link 13% faster and mmap
        # first touch 6x faster (docs/benchmarks.md).
        huge = f",huge={self.config.huge}" if self.config.huge != "never" else ""
        for extras in (huge + ",noswap", huge, ",noswap", ""):
            try:
                self.system.run_in_init_namespace(
                    ["mount", "-t", "tmpfs", "-o", base + extras, self.source, str(self.path)]
                )
                break
            except OSError:
                if not extras:
                    raise
        self.swappable = "noswap" not in extras
        if not self.mounted:
            raise RamstageError(
                f"the tmpfs at {self.path} was mounted in PID 1's mount namespace but cannot be "
                "seen from ramstage's own (a private namespace?); run ramstage without one"
            )
        log.info(
            "mounted a %s tmpfs at %s (%s)",
            units.size(self.config.size_bytes),
            self.path,
            extras.strip(",") or "swappable, small pages",
        )

    def warnings(self) -> list[str]:
        """What the operator should know about the store as mounted (after prepare()), for
        the log at start: the huge pages the kernel took, not the ones configured."""
        entry = self._entry()
        huge = _huge(entry) if entry is not None and entry.fstype == "tmpfs" else "never"
        if huge == "never" or not self.system.reports_free_pages():
            return []
        return [
            f"store.huge is {huge} on a VM whose balloon hands free memory back to "
            "the host: each new huge page is faulted back in from the host, so a copy into the "
            "store can take several times as long as cp (docs/operations.md); huge: never "
            "copies faster and loads slower"
        ]

    def unmount(self) -> None:
        """Unmounts the tmpfs in PID 1's namespace. A lazy unmount lets a reader that still
        holds a file finish; its pages are freed when it lets go."""
        if self.config.mount and self.mounted:
            self.system.run_in_init_namespace(["umount", "--lazy", str(self.path)])

    def usage(self) -> tuple[int, int]:
        """(size_bytes, used_bytes) as statfs(2) reports them: df's view of a tmpfs."""
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


def _huge(entry: MountEntry) -> str:
    """The tmpfs's huge= option as mounted; a tmpfs mounted without it shows none."""
    return next((o.split("=", 1)[1] for o in entry.options if o.startswith("huge=")), "never")


def _page_rounded(size: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    return (size + page - 1) // page * page
