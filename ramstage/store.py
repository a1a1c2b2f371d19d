"""The store: the tmpfs (or, unprivileged, a plain directory) that holds generations.

Layout: STORE/NAME/GEN/… is a published generation and STORE/NAME/GEN.json its manifest;
anything starting with "." inside STORE/NAME is work in progress. A generation counts only when
both are present, so a crash at any instant leaves either a complete generation or debris that
the next start removes (invariant 7).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ramstage.config import StoreConfig
from ramstage.errors import RamstageError
from ramstage.manifest import Manifest
from ramstage.system import MountEntry, System

log = logging.getLogger(__name__)
MARKER = ".ramstage-store"
FS_NAME = "ramstage"  # the mount's source field: how an existing ramstage tmpfs is recognised


@dataclass(frozen=True)
class Generation:
    path: Path
    manifest: Manifest

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def target(self) -> Path:
        """What the link points at: the file itself, or the copy of the source directory. Both
        sit in the generation directory, the gate that stands for the source's parents."""
        if self.manifest.kind == "file":
            return self.path / self.manifest.files[0].relpath
        return self.path / self.manifest.root

    def file_paths(self) -> list[Path]:
        if self.manifest.kind == "file":
            return [self.target]
        return [self.target / f.relpath for f in self.manifest.files]

    @cached_property
    def file_keys(self) -> dict[tuple[int, int], int]:
        """(st_dev, st_ino) of each file, with its size: how /proc tells who holds it."""
        keys = {}
        for path in self.file_paths():
            st = os.stat(path)
            keys[(st.st_dev, st.st_ino)] = st.st_size
        return keys


def remove_tree(path: Path) -> None:
    """Deletes a generation or partial copy. Its directories are read-only and may belong to
    the sources' owners, and the unit gives ramstage no CAP_DAC_OVERRIDE: each directory is
    taken back (owner root, 0700) before it is emptied. 0700, so nobody else can look in while
    it goes."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    _take_back(path)
    for directory, subdirs, _ in os.walk(path):
        for name in subdirs:
            _take_back(Path(directory, name))
    shutil.rmtree(path)


def _take_back(directory: Path) -> None:
    if os.geteuid() == 0:
        os.chown(directory, 0, 0, follow_symlinks=False)
    os.chmod(directory, 0o700)


class Store:
    def __init__(self, config: StoreConfig, system: System) -> None:
        self.config, self.system = config, system
        self.path = config.path
        self.swappable: bool | None = None  # None: unknown (a plain directory)
        self.mounted_here = False  # mounted by this process rather than adopted

    def _mount_entry(self) -> MountEntry | None:
        return next((m for m in reversed(self.system.mounts()) if m.mountpoint == self.path), None)

    @property
    def mounted(self) -> bool:
        entry = self._mount_entry()
        return entry is not None and entry.fstype == "tmpfs"

    def open(self) -> None:
        """Mounts (or adopts) the tmpfs, or checks the plain directory, and marks it ours."""
        if self.config.mount:
            self._mount()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / MARKER).exists() and any(self.path.iterdir()):
            raise RamstageError(
                f"store.path {self.path} is not empty and is not a ramstage store "
                f"(no {MARKER}); point store.path at an empty directory"
            )
        (self.path / MARKER).touch()

    def _mount(self) -> None:
        entry = self._mount_entry()
        size_option = f"size={self.config.size_bytes}"
        if entry is not None:
            if entry.fstype != "tmpfs" or entry.source != FS_NAME:
                raise RamstageError(
                    f"store.path {self.path}: something else is mounted there "
                    f"({entry.fstype} from {entry.source}); unmount it or choose another path"
                )
            self.swappable = "noswap" not in entry.options
            if self.usage()[0] != _page_rounded(self.config.size_bytes):
                log.info("resizing the store to %d bytes", self.config.size_bytes)
                self.system.run_in_init_namespace(
                    ["mount", "-o", f"remount,{size_option}", str(self.path)]
                )
            log.info("adopted the tmpfs already mounted at %s", self.path)
            return
        self.system.run_in_init_namespace(["mkdir", "-p", str(self.path)])
        base = f"{size_option},mode=0755,nosuid,nodev,noexec"
        # Optional options, best first, each dropped where the kernel refuses it:
        # noswap (Linux 6.4+): a staged copy that is swapped out is slower than the SSD it
        # mirrors; huge= (store.huge, default within_size): the copier preallocates each file,
        # so it gets 2 MiB pages, which made torch.load through the link 13% faster and mmap
        # first touch 6x faster (docs/benchmarks.md).
        huge = f",huge={self.config.huge}" if self.config.huge != "never" else ""
        for extras in (huge + ",noswap", huge, ",noswap", ""):
            try:
                self.system.run_in_init_namespace(
                    ["mount", "-t", "tmpfs", "-o", base + extras, FS_NAME, str(self.path)]
                )
                break
            except OSError:
                if not extras:
                    raise
        self.swappable = "noswap" not in extras
        self.mounted_here = True
        if not self.mounted:
            raise RamstageError(
                f"the tmpfs at {self.path} was mounted in PID 1's mount namespace but cannot be "
                "seen from ramstage's own (a private namespace?); run ramstage without one"
            )
        log.info(
            "mounted a %d-byte tmpfs at %s (%s)",
            self.config.size_bytes,
            self.path,
            extras.strip(",") or "swappable, small pages",
        )

    def close(self) -> None:
        """Unmounts the tmpfs we mounted, or one we may unmount ourselves (we run in PID 1's
        mount namespace). A sandboxed daemon that adopted the tmpfs leaves it to the unit's
        `ramstage unmount`."""
        if self.mounted_here or self.system.in_init_mount_namespace():
            self.unmount()

    def unmount(self) -> None:
        """Unmounts the tmpfs in PID 1's namespace. A lazy unmount lets a reader that still
        holds a file finish; its pages are freed when it lets go."""
        if self.config.mount and self.mounted:
            self.system.run_in_init_namespace(["umount", "--lazy", str(self.path)])

    def holds_generations(self) -> bool:
        """Whether some published generation is left, which a link may still point at."""
        return any(self.path.glob("*/*.json"))

    def usage(self) -> tuple[int, int]:
        """(size_bytes, used_bytes) as statfs(2) reports them: df's view of a tmpfs."""
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def scan(self, names: set[str]) -> dict[str, list[Generation]]:
        """Removes partial and unknown entries and returns the published generations."""
        found: dict[str, list[Generation]] = {}
        for entry in sorted(self.path.iterdir()):
            if entry.name == MARKER:
                continue
            if entry.name not in names or not entry.is_dir() or entry.is_symlink():
                log.info("removing %s: not a configured model", entry)
                remove_tree(entry)
                continue
            self.model_dir(entry.name)
            found[entry.name] = self._scan_model(entry)
        return found

    def _scan_model(self, directory: Path) -> list[Generation]:
        generations = []
        for entry in sorted(directory.iterdir()):
            manifest_path = directory / f"{entry.name}.json"
            if entry.suffix == ".json" and (directory / entry.stem).is_dir():
                continue
            manifest = None
            if not entry.name.startswith(".") and entry.is_dir() and manifest_path.is_file():
                try:
                    manifest = Manifest.from_json(manifest_path.read_text())
                except (ValueError, KeyError, TypeError) as error:
                    log.warning("removing %s: unreadable manifest (%s)", entry, error)
            if manifest is None or manifest.generation_id != entry.name:
                log.info("removing %s: partial or unknown", entry)
                remove_tree(entry)
                remove_tree(manifest_path)
                continue
            generations.append(Generation(entry, manifest))
        return generations

    def new_partial(self, name: str) -> Path:
        """An empty directory that nobody but ramstage can look into until it is published."""
        partial = self.model_dir(name) / f".partial-{secrets.token_hex(6)}"
        partial.mkdir(mode=0o700)
        return partial

    def model_dir(self, name: str) -> Path:
        """STORE/NAME: anyone may pass through, to the generations they may reach; nobody but
        root may list it, read the manifests or see the copies in progress."""
        model_dir = self.path / name
        model_dir.mkdir(mode=0o711, exist_ok=True)
        model_dir.chmod(0o711)  # made 0755 by an earlier version
        return model_dir

    def publish(self, partial: Path, manifest: Manifest) -> Generation:
        """Makes a verified partial copy, already read-only and owned as its source
        (copier.py), a generation (invariant 3), then writes its manifest, which is what makes
        it count. The manifest names the files and their digests: root's eyes only."""
        final = partial.parent / manifest.generation_id
        if final.exists():
            remove_tree(partial)  # the same content, with the same owners, is already here
        else:
            os.rename(partial, final)
        temporary = partial.parent / f".{manifest.generation_id}.json.tmp"
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(manifest.to_json())
        os.replace(temporary, partial.parent / f"{manifest.generation_id}.json")
        return Generation(final, manifest)

    def remove(self, generation: Generation) -> None:
        """Deletes a generation; its manifest goes first, so a crash halfway leaves debris,
        never a generation that looks complete."""
        remove_tree(generation.path.parent / f"{generation.id}.json")
        remove_tree(generation.path)

    def remove_model(self, name: str) -> None:
        remove_tree(self.path / name)


def _page_rounded(size: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    return (size + page - 1) // page * page
