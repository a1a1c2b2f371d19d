"""Copy one source into a partial generation, hashing while copying and checking the RAM copy.

Sources are opened read-only and read with read(2), never mapped: a source truncated under an
mmap raises SIGBUS, which cannot be handled usefully (invariant 4).
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import stat
import time
from collections.abc import Mapping
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from threading import Event, Lock
from typing import Callable

import xxhash

from ramstage.access import NO_TRUST, Owner, Trust
from ramstage.crew import Crew
from ramstage.digest import Hasher, combine, new_hasher
from ramstage.errors import RamstageError
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
from ramstage.threads import DaemonPool

# Small enough that a chunk is still in the CPU caches when it is hashed, read back and
# compared: 1 MiB took 13% (sha256) to 28% (blake3) less CPU per GiB than 8 MiB
# (benchmarks/bench_stage.py).
CHUNK_BYTES = 1 << 20
ATTEMPTS = 3
# Source pages read are dropped from the page cache as the copy goes (posix_fadvise(2)
# DONTNEED): the RAM copy replaces them, and a second copy in the cache is exactly the memory
# pressure ramstage exists to avoid. Every this many bytes, so no large model piles up first.
DROP_EVERY_BYTES = 64 << 20
# Reads are asked for this far ahead (posix_fadvise(2) WILLNEED starts them without waiting),
# so a slow disk keeps reading while a chunk is written and checked.
READ_AHEAD_BYTES = 32 << 20


class NoSpace(RamstageError):
    """The store has no room for the copy."""


class Cancelled(RamstageError):
    """Staging was called off (model removed, daemon stopping)."""


class DigestMismatch(RamstageError):
    """The source does not have the digest the config expects."""


class _Aborted(Exception):
    """Another file of the same copy failed: this one stops too."""


class _Progress:
    def __init__(self, total_bytes: int, report: Callable[[int, int], None]) -> None:
        self.total, self.done, self.report = total_bytes, 0, report
        self.lock = Lock()  # the files of one model copy on several threads

    def __call__(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            done = self.done
        self.report(done, self.total)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class _Copier:
    """Copies one file: the main thread reads and writes, one thread hashes the bytes read, and
    every chunk written is read back from the store and compared with them. So the RAM copy is
    checked against exactly the bytes that made the digest, at little more than the cost of cp.

    The read-back goes to whichever thread has less to do: xxh3 and blake3 hash several times
    faster than memory copies, so their thread has room for the check; sha256 (1-2 GB/s) has
    none, and the check stays with the copy. Either way checking overlaps copying."""

    def __init__(
        self,
        algorithm: str,
        on_bytes: Callable[[int], None],
        cancel: Event,
        abort: Event,
        *,
        step: Callable[[str], None],
    ) -> None:
        self.algorithm, self.on_bytes, self.cancel, self.abort = algorithm, on_bytes, cancel, abort
        self.step = step  # System.step, the crash hook
        self.buffers = [bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)]
        self.mapped: mmap.mmap | None = None  # the copy being written, to check it
        self.check_in_worker = algorithm in ("xxh3", "blake3")

    def copy(self, source: SourceFile, dst_fd: int, src_fd: int) -> str:
        hasher = new_hasher(self.algorithm)
        hashing: list[Future[None]] = []
        os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
        os.posix_fadvise(src_fd, 0, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
        if source.size_bytes:
            self.mapped = mmap.mmap(dst_fd, source.size_bytes, prot=mmap.PROT_READ)
        try:
            return self._copy(source, dst_fd, src_fd, hasher, hashing)
        finally:
            if self.mapped is not None:
                self.mapped.close()
                self.mapped = None

    def _copy(
        self,
        source: SourceFile,
        dst_fd: int,
        src_fd: int,
        hasher: Hasher,
        hashing: list[Future[None]],
    ) -> str:
        offset = dropped = 0
        with DaemonPool(1, "ramstage-hash") as pool:
            for index in itertools.count():
                self._stop_if_asked(source)
                if offset - dropped >= DROP_EVERY_BYTES:
                    os.posix_fadvise(src_fd, dropped, offset - dropped, os.POSIX_FADV_DONTNEED)
                    dropped = offset
                if len(hashing) == 2:
                    hashing.pop(0).result()  # the buffer about to be refilled is done with
                ahead = offset + READ_AHEAD_BYTES
                os.posix_fadvise(src_fd, ahead, CHUNK_BYTES, os.POSIX_FADV_WILLNEED)
                buffer = self.buffers[index % 2]
                count = os.readv(src_fd, [buffer])
                if count == 0:
                    break
                if offset + count > source.size_bytes:
                    raise SourceChanged(f"{source.path}: grew while it was read")
                hashing.append(self._put(pool, hasher, source, dst_fd, offset, buffer, count))
                offset += count
                self.on_bytes(count)
            for future in hashing:
                future.result()
        os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if offset != source.size_bytes:
            raise SourceChanged(f"{source.path}: size changed while reading")
        return f"{self.algorithm}:{hasher.hexdigest()}"

    def _stop_if_asked(self, source: SourceFile) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"{source.path}: staging cancelled")
        if self.abort.is_set():
            raise _Aborted

    def _put(
        self,
        pool: DaemonPool,
        hasher: Hasher,
        source: SourceFile,
        dst_fd: int,
        offset: int,
        buffer: bytearray,
        count: int,
    ) -> Future[None]:
        """Writes one chunk; returns the hashing (and, where it has room, the checking) of it."""
        data = memoryview(buffer)[:count]
        if self.check_in_worker:
            _write_all(dst_fd, data)
            work = partial(self._hash_and_check, hasher, source, dst_fd, offset, buffer, count)
            return pool.submit(work)
        hashing = pool.submit(hasher.update, data)
        _write_all(dst_fd, data)
        self._check(source, dst_fd, offset, buffer, count)
        return hashing

    def _hash_and_check(
        self,
        hasher: Hasher,
        source: SourceFile,
        dst_fd: int,
        offset: int,
        buffer: bytearray,
        count: int,
    ) -> None:
        hasher.update(memoryview(buffer)[:count])
        self._check(source, dst_fd, offset, buffer, count)

    def _check(
        self, source: SourceFile, dst_fd: int, offset: int, buffer: bytearray, count: int
    ) -> None:
        """The chunk as it now is in the store against the bytes read, while both are still in
        the CPU caches: xxh3 of each, straight from the store's pages (mmap, no copy) at tens of
        GB/s with the GIL released, where a read-back and memcmp took three times as long."""
        assert self.mapped is not None
        written = memoryview(self.mapped)[offset : offset + count]
        try:
            same = xxhash.xxh3_128_digest(written) == xxhash.xxh3_128_digest(
                memoryview(buffer)[:count]
            )
        finally:
            written.release()
        if not same:
            raise RamstageError(f"{source.path}: the RAM copy differs from the bytes read")


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


def _copy_file(copier: _Copier, source: SourceFile, target: Path, src_fd: int) -> StagedFile:
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
    new_copier: Callable[[Event], _Copier],
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
        if error is not None and not isinstance(error, _Aborted):
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
    copier: _Copier,
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
                partial(_Copier, algorithm, progress, cancel, step=step),
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
