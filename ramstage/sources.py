"""Sources as ramstage reads them: listed and opened safely, one path component at a time.

ramstage runs as root and reads paths that users control. So every path is walked from "/",
each component opened relative to the directory before it (openat(2) with O_NOFOLLOW), and
every decision is taken on what fstat(2) says of the descriptor then read: a component swapped
for a symlink between a look and the open fails the open (ELOOP) instead of leading elsewhere.
Symlinks are read with readlinkat(2) and followed only by the trust rule (access.py).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ramstage.access import (
    NO_TRUST,
    Owner,
    Trust,
    Untrusted,
    check_symlink,
    check_writers,
    gate,
    through,
)
from ramstage.errors import RamstageError
from ramstage.manifest import Identity

MAX_SYMLINKS = 40  # as in the kernel's own path walk (path_resolution(7))
# O_NONBLOCK: opening a FIFO planted where a file was must not hang the daemon.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
Key = tuple[int, int]


class SourceChanged(RamstageError):
    """The source changed while it was read; the copy is discarded."""


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def owner_of(inode: int | str, st: os.stat_result) -> Owner:
    """The owner and mode of an open file (or of a path, not followed). With a POSIX ACL the
    group bits are the ACL's mask, not what the owning group may do (acl(5)), and named users
    may do more: the group bits are dropped, so a copy never gives the owning group more."""
    owner = Owner.of(st)
    try:
        # A descriptor is the inode itself; a path is looked at, not followed.
        os.getxattr(inode, "system.posix_acl_access", follow_symlinks=isinstance(inode, int))
    except OSError as error:
        if error.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return owner
        raise
    return Owner(owner.uid, owner.gid, owner.mode & ~0o070)


@dataclass(frozen=True)
class Hop:
    """A directory searched on the way to a source, with the owner of the entry taken in it."""

    path: str
    key: Key
    owner: Owner
    entry_uid: int


@dataclass
class Opened:
    """A source (or a file or directory in one) opened for reading; the caller closes `fd`."""

    fd: int
    st: os.stat_result
    path: str  # its real path: no symlinks, no dot-dot
    ancestors: list[Key]  # the directories of the real path
    searched: list[Hop] = field(default_factory=list)  # every directory searched to reach it


class _Walk:
    def __init__(self, trust: Trust, follow: bool) -> None:
        self.trust, self.follow = trust, follow
        self.stack: list[tuple[int, str, os.stat_result]] = []
        self.searched: list[Hop] = []
        self.links: list[tuple[str, int, int]] = []  # path, owner, components left at its target
        self.followed = 0

    def run(self, path: str) -> Opened:
        root = os.open("/", _OPEN_FLAGS | os.O_DIRECTORY)
        self.stack.append((root, "/", os.fstat(root)))
        parts = deque(_components(path))
        while parts:
            name = parts.popleft()
            if name == "..":
                if len(self.stack) > 1:
                    os.close(self.stack.pop()[0])
            elif name != ".":
                self._step(name, parts)
            self._reached(len(parts))
        fd, real, st = self.stack.pop()
        return Opened(fd, st, real, [_key(s) for _, _, s in self.stack], self.searched)

    def _step(self, name: str, parts: deque[str]) -> None:
        dir_fd, dir_path, dir_st = self.stack[-1]
        here = os.path.join(dir_path, name)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        self.searched.append(Hop(dir_path, _key(dir_st), owner_of(dir_fd, dir_st), st.st_uid))
        if stat.S_ISLNK(st.st_mode):
            if not self.follow:
                raise SourceChanged(f"{here}: became a symlink")
            self.followed += 1
            if self.followed > MAX_SYMLINKS:
                raise Untrusted(f"{here}: more than {MAX_SYMLINKS} symlinks")
            target = os.readlink(name, dir_fd=dir_fd)
            self.links.append((here, st.st_uid, len(parts)))
            if target.startswith("/"):
                while len(self.stack) > 1:
                    os.close(self.stack.pop()[0])
            parts.extendleft(reversed(_components(target)))
            return
        if parts and not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(20, "Not a directory", here)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise RamstageError(f"{here}: not a regular file or directory")
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
        opened = os.fstat(fd)
        self.stack.append((fd, here, opened))
        if _key(opened) != _key(st):
            raise SourceChanged(f"{here}: replaced while it was opened")

    def _reached(self, left: int) -> None:
        """A symlink's target is reached once the components it brought are used up."""
        target = Owner.of(self.stack[-1][2])
        while self.links and self.links[-1][2] == left:
            path, uid, _ = self.links.pop()
            check_symlink(path, uid, target, self.trust)

    def close(self) -> None:
        for fd, _, _ in self.stack:
            os.close(fd)
        self.stack.clear()


def _once(files: list[SourceFile]) -> tuple[SourceFile, ...]:
    """Files by relpath. A file whose inode came first at another path (a hard link, or a
    second symlink to one Hugging Face blob) is copied once: its later paths become hard links
    to that copy, where both get the same permissions."""
    first: dict[tuple[Key, Owner], str] = {}
    listed = []
    for file in sorted(files, key=lambda f: f.relpath):
        earlier = first.setdefault((file.identity[:2], file.owner), file.relpath)
        if earlier != file.relpath:
            file = SourceFile(file.relpath, file.path, file.identity, file.owner, same_as=earlier)
        listed.append(file)
    return tuple(listed)


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def open_source(
    path: str | Path, trust: Trust, source_owner: int | None = None, *, follow: bool = True
) -> Opened:
    """Opens a path by the trust rule: every directory searched, every symlink followed and
    the path's end are checked against `source_owner` (by default the end's own owner).
    follow=False: a real path, where any symlink means that it changed."""
    if not os.path.isabs(path):
        raise RamstageError(f"{path}: not an absolute path")
    walk = _Walk(trust, follow)
    try:
        opened = walk.run(str(path))
    finally:
        walk.close()
    try:
        owner = opened.st.st_uid if source_owner is None else source_owner
        for hop in opened.searched:
            check_writers(hop.path, hop.owner, owner, trust, entry_uid=hop.entry_uid)
        check_writers(opened.path, Owner.of(opened.st), owner, trust)
        if stat.S_ISREG(opened.st.st_mode):
            os.set_blocking(opened.fd, True)
    except BaseException:
        os.close(opened.fd)
        raise
    return opened


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    path: Path  # the real path, opened again to copy it
    identity: Identity
    owner: Owner  # what its copy gets
    same_as: str | None = None  # a hard link (or a second symlink) to this earlier file

    @property
    def size_bytes(self) -> int:
        return self.identity[2]


@dataclass(frozen=True)
class SourceDir:
    relpath: str  # "" for a directory source itself
    owner: Owner  # what its copy gets


@dataclass(frozen=True)
class SourceListing:
    kind: str  # "file" or "dir"
    name: str  # what the copy is called inside its generation: the source's base name
    owner_uid: int  # the source's owner, whom the trust rule measures every path against
    gate: Owner  # what the generation directory gets (access.gate)
    files: tuple[SourceFile, ...]
    dirs: tuple[SourceDir, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        """The bytes the copy takes: a file listed twice (hard links) is copied once."""
        return sum(f.size_bytes for f in self.files if f.same_as is None)

    def identities(self) -> tuple[tuple[str, Identity], ...]:
        """What tells one version of a source from another without reading it (restic's rule:
        a changed file changes its size, mtime or ctime), in the form manifests record it."""
        return tuple((f.relpath, f.identity) for f in self.files)


def list_source(source: Path, trust: Trust = NO_TRUST) -> SourceListing:
    """A file source, or every regular file below a directory source. A symlink inside a
    directory is followed only by the trust rule and while it stays inside the source (rsync's
    rule for modules) or, for a Hugging Face snapshot, in its cache repo's blobs/; a symlink
    that breaks the trust rule refuses the whole source. A directory whose every entry had to
    be skipped is refused too: an empty copy would break the application it serves."""
    opened = open_source(source, trust)
    try:
        owner = owner_of(opened.fd, opened.st)
        entrance = gate([hop.owner for hop in opened.searched])
        name = source.name or "source"
        if stat.S_ISREG(opened.st.st_mode):
            file = SourceFile(name, Path(opened.path), identity(opened.st), owner.read_only())
            return SourceListing("file", name, opened.st.st_uid, entrance, (file,))
        files, dirs, skipped = _Tree(opened, trust, _hub_blobs(opened, trust)).walk()
        if skipped and not files:
            raise RamstageError(
                f"{source}: nothing to stage, every entry was skipped: {skipped[0]}"
            )
        return SourceListing("dir", name, opened.st.st_uid, entrance, files, dirs, skipped)
    finally:
        os.close(opened.fd)


HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def _hub_blobs(snapshot: Opened, trust: Trust) -> Key | None:
    """The blobs/ directory that a Hugging Face hub snapshot's files lead to, where the source
    is one (CACHE/models--ORG--NAME/snapshots/REVISION, as huggingface_hub lays it out): each
    file there is a relative symlink into ../../blobs/."""
    snapshots = os.path.dirname(snapshot.path)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) != "snapshots" or not os.path.basename(repo).startswith(
        HUB_REPO_PREFIXES
    ):
        return None
    try:
        blobs = open_source(os.path.join(repo, "blobs"), trust, snapshot.st.st_uid)
    except FileNotFoundError:
        return None
    os.close(blobs.fd)
    return _key(blobs.st)


@dataclass
class _Dir:
    relpath: str
    fd: int
    path: str
    owner: Owner
    mirrored: frozenset[Key]  # directories a reader of the copy passes too: the gate's, and these
    extra: tuple[Owner, ...]  # directories a reader of the source passes that the copy has not


class _Tree:
    """Lists a directory source through descriptors, so a subdirectory swapped for a symlink
    while it is listed is never followed by mistake."""

    def __init__(self, root: Opened, trust: Trust, blobs: Key | None) -> None:
        self.root, self.trust, self.uid = root, trust, root.st.st_uid
        self.inside = {_key(root.st)} | ({blobs} if blobs else set())
        self.files: list[SourceFile] = []
        self.dirs: list[SourceDir] = []
        self.skipped: list[str] = []
        self.seen = {_key(root.st)}

    def walk(self) -> tuple[tuple[SourceFile, ...], tuple[SourceDir, ...], tuple[str, ...]]:
        mirrored = frozenset(h.key for h in self.root.searched) | {_key(self.root.st)}
        owner = owner_of(self.root.fd, self.root.st)
        pending = [_Dir("", os.dup(self.root.fd), self.root.path, owner, mirrored, ())]
        while pending:
            directory = pending.pop()
            self.dirs.append(
                SourceDir(directory.relpath, through(directory.owner, directory.extra))
            )
            try:
                pending.extend(self._entries(directory))
            finally:
                os.close(directory.fd)
        self.dirs.sort(key=lambda d: d.relpath)
        return _once(self.files), tuple(self.dirs), tuple(self.skipped)

    def _entries(self, directory: _Dir) -> list[_Dir]:
        subdirs: list[_Dir] = []
        prefix = directory.relpath + "/" if directory.relpath else ""
        for name in sorted(os.listdir(directory.fd)):
            relpath, here = prefix + name, os.path.join(directory.path, name)
            try:
                st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
                check_writers(
                    directory.path, directory.owner, self.uid, self.trust, entry_uid=st.st_uid
                )
                if stat.S_ISLNK(st.st_mode):
                    subdirs.extend(self._follow(directory, relpath, here))
                elif stat.S_ISDIR(st.st_mode):
                    subdirs.extend(self._descend(directory, relpath, here, name))
                elif stat.S_ISREG(st.st_mode):
                    check_writers(here, Owner.of(st), self.uid, self.trust)
                    owner = through(owner_of(here, st), directory.extra)
                    self.files.append(SourceFile(relpath, Path(here), identity(st), owner))
                else:
                    self.skipped.append(f"{relpath}: not a regular file")
            except (FileNotFoundError, NotADirectoryError, PermissionError) as error:
                self.skipped.append(f"{relpath}: {error.strerror}")
        return subdirs

    def _descend(self, directory: _Dir, relpath: str, here: str, name: str) -> list[_Dir]:
        fd = os.open(name, _OPEN_FLAGS | os.O_DIRECTORY, dir_fd=directory.fd)
        st = os.fstat(fd)
        if _key(st) in self.seen:
            os.close(fd)
            self.skipped.append(f"{relpath}: directory loop")
            return []
        self.seen.add(_key(st))
        mirrored = directory.mirrored | {_key(st)}
        return [_Dir(relpath, fd, here, owner_of(fd, st), mirrored, directory.extra)]

    def _follow(self, directory: _Dir, relpath: str, here: str) -> list[_Dir]:
        target = open_source(here, self.trust, self.uid)
        keep = False
        try:
            inside = not self.inside.isdisjoint(target.ancestors)
            if not inside or _key(target.st) in self.seen:
                why = "directory loop" if inside else "symlink leads outside the source"
                self.skipped.append(f"{relpath}: {why}")
                return []
            extra = directory.extra + tuple(
                hop.owner for hop in target.searched if hop.key not in directory.mirrored
            )
            owner = owner_of(target.fd, target.st)
            if stat.S_ISREG(target.st.st_mode):
                file = SourceFile(
                    relpath, Path(target.path), identity(target.st), through(owner, extra)
                )
                self.files.append(file)
                return []
            self.seen.add(_key(target.st))
            keep = True
            mirrored = directory.mirrored | {_key(target.st)}
            return [_Dir(relpath, target.fd, target.path, owner, mirrored, extra)]
        finally:
            if not keep:
                os.close(target.fd)
