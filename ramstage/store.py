"""The store: the generation layout inside the tmpfs (or, unprivileged, a plain directory)
that tmpfs.py mounts.

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
import stat
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from ramstage import rings, units
from ramstage.config import Config, StoreConfig
from ramstage.digest import hash_file
from ramstage.errors import RamstageError
from ramstage.manifest import Manifest
from ramstage.sources import list_source
from ramstage.system import System
from ramstage.tmpfs import Tmpfs

log = logging.getLogger(__name__)
MARKER = ".ramstage-store"


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
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # the store was unmounted under the daemon
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


def link_copy(
    existing: Path, digest: str, target: Path, access: tuple[int, int, int], size: int
) -> bool:
    """Makes `target` another name of a copy already in the store, while that is still the
    copy published: a regular file of this owner, group, mode and size, whose bytes still hash
    to its digest (its owner may have changed them since). False when it has gone or changed,
    or when the kernel refuses the link (fs.protected_hardlinks: a file ramstage does not own,
    without CAP_FOWNER); the caller then copies."""
    try:
        st = os.lstat(existing)
        shown = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_size)
        if not stat.S_ISREG(st.st_mode) or shown != (*access, size):
            return False
        os.link(existing, target, follow_symlinks=False)
    except (FileNotFoundError, PermissionError):
        return False
    linked = os.lstat(target)
    same = (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino)  # not replaced in between
    if not same or hash_file(target, digest.partition(":")[0]) != digest:
        target.unlink()
        return False
    return True


def _take_back(directory: Path) -> None:
    if os.geteuid() == 0:
        os.chown(directory, 0, 0, follow_symlinks=False)
    os.chmod(directory, 0o700)


class Store:
    def __init__(self, config: StoreConfig, system: System) -> None:
        self.config, self.path, self.system = config, config.path, system
        self.fs = Tmpfs(config, system)
        # The fast loader's ring files (rings.py): huge pages for any file, anyone may write.
        at = replace(config, path=config.rings_path, size_bytes=config.rings_bytes, huge="always")
        self.rings = Tmpfs(
            at, system, source=rings.SOURCE, mode="1777", key="store.rings", inodes=rings.INODES
        )

    def open(self) -> None:
        """Mounts (or adopts) the tmpfs, or checks the plain directory, and marks it ours;
        mounts the rings' tmpfs beside a mounted store, or says why not."""
        self.fs.prepare()
        if self.config.mount and self.config.rings_bytes:
            try:
                self._prepare_rings()
            except (OSError, RamstageError) as error:  # the fast loader makes fresh rings
                log.warning("no tmpfs for the fast loader's rings: %s", error)
        elif self.rings.ours:  # store.rings: 0 now, and a restart kept the tmpfs
            self.rings.unmount()
        if not (self.path / MARKER).exists() and any(self.path.iterdir()):
            raise RamstageError(
                f"store.path {self.path} is not empty and is not a ramstage store "
                f"(no {MARKER}); point store.path at an empty directory"
            )
        (self.path / MARKER).touch()

    def _prepare_rings(self) -> None:
        """Mounts the rings' tmpfs, never through a symlink or in a directory that anyone but
        root could have changed: a path nobody configured, mounted by root for everyone."""
        path = self.rings.path
        parent = os.lstat(path.parent)
        if parent.st_uid != 0 or parent.st_mode & 0o022 or not stat.S_ISDIR(parent.st_mode):
            raise RamstageError(f"{path.parent} is not a directory only root may change")
        if path.is_symlink():
            raise RamstageError(f"{path} is a symbolic link")
        self.rings.prepare()

    @property
    def rings_ours(self) -> bool:
        """The rings' tmpfs is mounted, by ramstage, and the config wants it: ramstage's to
        prune and to report (never a directory that only happens to be there)."""
        return bool(self.config.mount and self.config.rings_bytes and self.rings.ours)

    def prune_rings(self) -> int:
        """Deletes the ring files no process holds, in the rings' tmpfs if ramstage's;
        returns the bytes freed."""
        return rings.prune(self.rings.path) if self.rings_ours else 0

    def scan(self, names: set[str]) -> dict[str, list[Generation]]:
        """Removes partial and unknown entries and returns the published generations."""
        found: dict[str, list[Generation]] = {}
        for entry in sorted(self.path.iterdir()):
            if entry.name == MARKER:
                continue
            if entry.name not in names or not entry.is_dir() or entry.is_symlink():
                log.info("removing %s: not a configured model", entry)
                self.remove_path(entry)
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
                self.remove_path(entry)
                self.remove_path(manifest_path)
                continue
            generations.append(Generation(entry, manifest))
        return generations

    def others_bytes(self, names: Iterable[str]) -> int:
        """What fills the store besides the copies of these models: another process's files,
        and deleted files a reader still holds. That room may come back any time."""
        _, used = self.fs.usage()
        own = 0
        for name in names:
            for directory, _, files in os.walk(self.path / name):
                for file in files:
                    try:
                        own += os.lstat(os.path.join(directory, file)).st_blocks * 512
                    except FileNotFoundError:
                        continue  # deleted meanwhile
        return max(used - own, 0)

    def partial_bytes(self, partial: Path) -> int:
        """What a copy in flight took of the store so far: its files' pages (posix_fallocate
        takes a file's all at once), less those of files it shares with a generation (hard
        links: link_copy) that were there before it."""
        seen: dict[int, int] = {}  # inode -> its links found in the partial
        files: dict[int, os.stat_result] = {}
        for directory, _, names in os.walk(partial):
            for name in names:
                try:
                    st = os.lstat(os.path.join(directory, name))
                except FileNotFoundError:
                    continue  # the copy started again from an empty directory
                seen[st.st_ino] = seen.get(st.st_ino, 0) + 1
                files[st.st_ino] = st
        return sum(st.st_blocks * 512 for ino, st in files.items() if seen[ino] == st.st_nlink)

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
        self.system.step(f"rename {partial} -> {final.name}")
        if final.exists():
            remove_tree(partial)  # the same content, with the same owners, is already here
        else:
            os.rename(partial, final)
        temporary = partial.parent / f".{manifest.generation_id}.json.tmp"
        self.system.step(f"write {temporary}")
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(manifest.to_json())
        self.system.step(f"rename {temporary.name}")
        os.replace(temporary, partial.parent / f"{manifest.generation_id}.json")
        return Generation(final, manifest)

    def remove(self, generation: Generation) -> None:
        """Deletes a generation; its manifest goes first, so a crash halfway leaves debris,
        never a generation that looks complete."""
        self.system.step(f"unlink {generation.path}.json")
        remove_tree(generation.path.parent / f"{generation.id}.json")
        self.remove_path(generation.path)

    def remove_path(self, path: Path) -> None:
        """Removes a file or tree in the store: debris, a partial copy, a model's directory."""
        self.system.step(f"remove {path}")
        remove_tree(path)

    def remove_model(self, name: str) -> None:
        self.remove_path(self.path / name)

    def clear(self) -> None:
        """Everything in the store goes but its marker (`ramstage unmount`)."""
        for entry in self.path.iterdir():
            if entry.name != MARKER:
                self.remove_path(entry)


def fit_warnings(config: Config) -> list[str]:
    """Models larger than the whole store: the daemon would leave them on their sources."""
    store = config.store.size_bytes
    warnings = []
    for index, model in enumerate(config.models):
        try:
            need = list_source(model.resolve(), model.trust).size_bytes
        except (OSError, RamstageError):
            continue  # the daemon says why when it looks; the size is what matters here
        if need > store:
            warnings.append(
                f"models[{index}] ({model.name}): needs {units.size(need)}, more than"
                f" store.size {units.size(store)}; it will stay on its source (too_large)"
            )
    return warnings
