"""Copy one source into a partial generation, hashing while copying and checking the RAM copy.

Each file is copied by a streams.FileCopier; this module opens the listed files by the trust
rule, gives the copies their owners, shares unchanged files already in RAM, and retries a
source that changes underneath.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import Mapping
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from threading import Event, Lock
from typing import Callable

from ramstage.access import NO_TRUST, Owner, Trust
from ramstage.crew import Crew
from ramstage.digest import combine
from ramstage.errors import Cancelled, RamstageError
from ramstage.hub import check_blob
from ramstage.manifest import CopyKey, Manifest, StagedFile
from ramstage.sources import (
    SourceChanged,
    SourceFile,
    SourceListing,
    identity,
    list_source,
    open_source,
)
from ramstage.store import link_copy, remove_tree
from ramstage.streams import Aborted, FileCopier

ATTEMPTS = 3


class NoSpace(RamstageError):
    """The store has no room for the copy."""


class DigestMismatch(RamstageError):
    """The source does not have the digest the config expects."""


class _Progress:
    def __init__(self, total_bytes: int, report: Callable[[int, int], None]) -> None:
        self.total, self.done, self.report = total_bytes, 0, report
        self.lock = Lock()  # the files of one model copy on several threads

    def __call__(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            done = self.done
        self.report(done, self.total)


def _set_owner(fd: int, owner: Owner) -> None:
    """Gives a copy its source's owner, group and (read-only) mode: set the mode first, while
    the copy is still ours. An unprivileged store cannot give files away; then the copy stays
    ramstage's (who could read the source anyway), and loses its group bits unless ramstage
    is in that group too."""
    os.fchmod(fd, owner.mode)
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) == (owner.uid, owner.gid):
        return
    try:
        os.fchown(fd, owner.uid, owner.gid)
    except PermissionError:
        try:
            os.fchown(fd, -1, owner.gid)
        except PermissionError:
            os.fchmod(fd, owner.mode & ~0o070)


def _open_listed(source: SourceFile, listing: SourceListing, trust: Trust) -> int:
    """Opens the very file that was listed, by its real path and the trust rule again."""
    opened = open_source(source.path, trust, listing.owner_uid, follow=False)
    if identity(opened.st)[:2] != source.identity[:2]:
        os.close(opened.fd)
        raise SourceChanged(f"{source.path}: replaced since it was listed")
    return opened.fd


def _copy_file(copier: FileCopier, source: SourceFile, target: Path, src_fd: int) -> StagedFile:
    before = os.fstat(src_fd)
    if not stat.S_ISREG(before.st_mode):
        raise RamstageError(f"{source.path}: not a regular file")
    copier.step(f"write {target}")
    dst_fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if before.st_size:
            try:
                # Reserve every page first: a copy that cannot fit fails now, not halfway.
                os.posix_fallocate(dst_fd, 0, before.st_size)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise NoSpace(f"{source.path}: no room in the store") from None
                raise
        digest = copier.copy(
            SourceFile(source.relpath, source.path, identity(before), source.owner), dst_fd, src_fd
        )
        _set_owner(dst_fd, source.owner)
    finally:
        os.close(dst_fd)
    check_blob(source.path, digest)
    after = os.fstat(src_fd)
    now = os.lstat(source.path)
    if identity(before) != identity(after) or identity(after) != identity(now):
        raise SourceChanged(f"{source.path}: changed while it was copied")
    return StagedFile(
        source.relpath, before.st_size, digest, identity(before), source.owner.as_tuple()
    )


def _copy_all(
    listing: SourceListing,
    generation: Path,
    trust: Trust,
    run_files: Callable[..., list[Future[StagedFile]]],
    new_copier: Callable[[Event], FileCopier],
    copies: Mapping[CopyKey, tuple[Path, str]],
) -> tuple[StagedFile, ...]:
    """Copies every file on the copy workers, then gives the directories and gate their owners."""
    base = generation / listing.name if listing.kind == "dir" else generation
    for path in [base, *(base / d.relpath for d in listing.dirs)]:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    abort = Event()
    firsts = [source for source in listing.files if source.same_as is None]
    futures = run_files(
        [partial(_copy_one, new_copier(abort), s, listing, base, trust, copies) for s in firsts],
        stop=abort,
    )
    for future in futures:
        error = future.exception()
        if error is not None and not isinstance(error, Aborted):
            raise error
    if len(futures) < len(firsts):
        raise Cancelled(f"{listing.name}: staging cancelled")  # while waiting for a worker
    staged = {file.relpath: file for file in (f.result() for f in futures)}
    for source in listing.files:
        if source.same_as is not None:
            os.link(base / source.same_as, base / source.relpath)
            first = staged[source.same_as]
            staged[source.relpath] = StagedFile(
                source.relpath, first.size_bytes, first.digest, first.identity, first.access
            )
    # Directories last and deepest first: once a directory is its source's, ramstage may no
    # longer be able to write in it; the generation directory itself becomes the gate.
    for directory in sorted(listing.dirs, key=lambda d: d.relpath.count("/"), reverse=True):
        _seal(base / directory.relpath if directory.relpath else base, directory.owner)
    _seal(generation, listing.gate)
    return tuple(staged[source.relpath] for source in listing.files)


def _copy_one(
    copier: FileCopier,
    source: SourceFile,
    listing: SourceListing,
    base: Path,
    trust: Trust,
    copies: Mapping[CopyKey, tuple[Path, str]],
) -> StagedFile:
    src_fd = _open_listed(source, listing, trust)
    try:
        # The same source file, unchanged, already copied with the same access: shared.
        now, access = identity(os.fstat(src_fd)), source.owner.as_tuple()
        known = copies.get((now, access, copier.algorithm))
        if known and link_copy(*known, base / source.relpath, access, now[2]):
            copier.on_bytes(now[2])
            return StagedFile(source.relpath, now[2], known[1], now, access)
        return _copy_file(copier, source, base / source.relpath, src_fd)
    finally:
        os.close(src_fd)


def _seal(directory: Path, owner: Owner) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _set_owner(fd, owner)
    finally:
        os.close(fd)


def stage_source(
    name: str,
    source: Path,
    generation: Path,
    algorithm: str,
    *,
    trust: Trust = NO_TRUST,
    workers: int = 1,
    run_files: Callable[..., list[Future[StagedFile]]] | None = None,  # the daemon's Crew.run_all
    on_progress: Callable[[int, int], None] = lambda done_bytes, total_bytes: None,
    cancel: Event | None = None,
    expected_digest: str | None = None,
    copies: Mapping[CopyKey, tuple[Path, str]] | None = None,  # Generations.copies()
    sleep: Callable[[float], None] = time.sleep,  # System.sleep, in the daemon
    step: Callable[[str], None] = lambda what: None,  # System.step, in the daemon
) -> Manifest:
    """Fills the empty directory `generation` with a verified copy of `source` that no one
    can read who could not read the source, retrying a bounded number of times if the source
    changes underneath, and returns its manifest."""
    cancel = cancel or Event()
    for attempt in itertools.count(1):
        listing = list_source(source, trust)
        progress = _Progress(listing.size_bytes, on_progress)
        try:
            files = _copy_all(
                listing,
                generation,
                trust,
                partial(run_files or Crew(workers).run_all, cancel, tick=partial(progress, 0)),
                partial(FileCopier, algorithm, progress, cancel, step=step),
                copies or {},
            )
            break
        except (SourceChanged, FileNotFoundError):
            # A file listed a moment ago that is gone now is a change too.
            if attempt == ATTEMPTS:
                raise SourceChanged(f"{source}: kept changing while it was copied") from None
            remove_tree(generation)  # and again, from an empty directory
            generation.mkdir(mode=0o700)
            sleep(0.2 * 2**attempt)
    entries = [f"{f.relpath} {f.size_bytes} {f.digest}" for f in files]
    digest = files[0].digest if listing.kind == "file" else combine(algorithm, entries)
    if expected_digest and digest != expected_digest:
        raise DigestMismatch(f"digest mismatch: expected {expected_digest}, source has {digest}")
    return Manifest(
        name=name,
        source=str(source),
        kind=listing.kind,
        digest=digest,
        files=files,
        skipped=listing.skipped,
        root=listing.name if listing.kind == "dir" else "",
        gate=listing.gate.as_tuple(),
        dirs=tuple((d.relpath, *d.owner.as_tuple()) for d in listing.dirs),
    )
