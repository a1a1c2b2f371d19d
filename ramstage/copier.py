"""Copy one source into a partial generation, hashing while copying and checking the RAM copy.

Sources are opened read-only and read with pread(2), never mapped: a source truncated under an
mmap raises SIGBUS, which cannot be handled usefully (invariant 4).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import time
from collections.abc import Mapping
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from threading import Condition, Event, Lock
from typing import Callable

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


class _Halted(Exception):
    """The other stream of the same file failed: this one stops too."""


class _Progress:
    def __init__(self, total_bytes: int, report: Callable[[int, int], None]) -> None:
        self.total, self.done, self.report = total_bytes, 0, report
        self.lock = Lock()  # the files of one model copy on several threads

    def __call__(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            done = self.done
        self.report(done, self.total)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_all(source: SourceFile, fd: int, data: memoryview, offset: int) -> None:
    """Fills `data` from `offset`: a read may return less than asked (FUSE with direct_io),
    and only the end of the file, before the size listed, is a change."""
    while data:
        count = os.preadv(fd, [data], offset)
        if count == 0:
            raise SourceChanged(f"{source.path}: size changed while reading")
        data, offset = data[count:], offset + count


class _Turns:
    """The streams of one file hash their chunks in the file's order, taking turns, and write
    one at a time: the kernel takes the file's inode lock for each write anyway, and a stream
    waiting there spins on its core while the other writes. Waiting on `writing` sleeps: runs
    slowed by the host (page faults on this VM) used 1.15x their wall time in CPU, not 1.7x."""

    def __init__(self, hasher: Hasher, src_fd: int) -> None:
        self.hasher, self.src_fd = hasher, src_fd
        self.hashed = self.dropped = 0  # chunks hashed; bytes dropped from the page cache
        self.turn, self.writing = Condition(), Lock()
        self.halt = False  # a stream failed: the others stop

    def hash(self, index: int, data: memoryview) -> None:
        with self.turn:
            while self.hashed != index:
                if self.halt:
                    raise _Halted
                self.turn.wait()
            self.hasher.update(data)
            self.hashed += 1
            self.turn.notify_all()
            # Every chunk up to this one is copied, checked and hashed.
            done = self.hashed * CHUNK_BYTES
            if done - self.dropped >= DROP_EVERY_BYTES:
                dropping = done - self.dropped
                os.posix_fadvise(self.src_fd, self.dropped, dropping, os.POSIX_FADV_DONTNEED)
                self.dropped = done

    def stop(self) -> None:
        with self.turn:
            self.halt = True
            self.turn.notify_all()


class _Copier:
    """Copies one file on two streams, the calling thread and one helper, each every other
    chunk: it reads the chunk, writes it, reads it back from the store and compares it with the
    bytes read, then hashes it when its turn comes. So the RAM copy is checked against exactly
    the bytes that made the digest, each chunk's work stays on one core while the chunk is in
    its caches, and one file copies on two cores (one stream is bound by its core's memory
    copies, as cp is)."""

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

    def copy(self, source: SourceFile, dst_fd: int, src_fd: int) -> str:
        hasher = new_hasher(self.algorithm)
        os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
        os.posix_fadvise(src_fd, 0, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
        turns = _Turns(hasher, src_fd)
        stream = partial(self._stream, source, dst_fd, src_fd, turns)
        with DaemonPool(1, "ramstage-stream") as pool:
            other = pool.submit(stream, 1)
            with contextlib.suppress(_Halted):  # the other stream failed: raised below
                stream(0)
            other.result()
        os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if os.pread(src_fd, 1, source.size_bytes):
            raise SourceChanged(f"{source.path}: grew while it was read")
        return f"{self.algorithm}:{hasher.hexdigest()}"

    def _stream(
        self, source: SourceFile, dst_fd: int, src_fd: int, turns: _Turns, first: int
    ) -> None:
        buffer, written = bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)
        try:
            for index in itertools.count(first, 2):
                offset = index * CHUNK_BYTES
                if offset >= source.size_bytes:
                    return
                self._stop_if_asked(source, turns)
                ahead = offset + READ_AHEAD_BYTES
                os.posix_fadvise(src_fd, ahead, CHUNK_BYTES, os.POSIX_FADV_WILLNEED)
                count = min(CHUNK_BYTES, source.size_bytes - offset)
                data = memoryview(buffer)[:count]
                _read_all(source, src_fd, data, offset)
                with turns.writing:
                    _write_all(dst_fd, data, offset)
                self._check(source, dst_fd, offset, data, written)
                self.on_bytes(count)  # copied and checked; its hash may wait for the other stream
                turns.hash(index, data)
        except BaseException:
            turns.stop()
            raise

    def _stop_if_asked(self, source: SourceFile, turns: _Turns) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"{source.path}: staging cancelled")
        if self.abort.is_set():
            raise _Aborted
        if turns.halt:
            raise _Halted

    @staticmethod
    def _check(
        source: SourceFile, dst_fd: int, offset: int, data: memoryview, written: bytearray
    ) -> None:
        """Reads the chunk back from the store and compares it with the bytes read, on the
        same core while both are in its caches: read(2) and memcmp took 0.12 s per GiB, where
        hashing both sides through a mapping of the store took 0.18 s (each of its 4 KiB pages
        a TLB miss)."""
        count = len(data)
        read = os.preadv(dst_fd, [memoryview(written)[:count]], offset)
        same = written == data if count == CHUNK_BYTES else written[:count] == data
        if read != count or not same:
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
