"""Copy one source into a partial generation, hashing while copying and checking the RAM copy.

Sources are opened read-only and read with read(2), never mapped: a source truncated under an
mmap raises SIGBUS, which cannot be handled usefully (invariant 4).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from threading import Event
from typing import Callable

from ramstage.digest import Hasher, combine, new_hasher
from ramstage.errors import RamstageError
from ramstage.manifest import Identity, Manifest, StagedFile
from ramstage.store import remove_tree

# Small enough that a chunk is still in the CPU caches when it is hashed, read back and
# compared: 1 MiB took 13% (sha256) to 28% (blake3) less CPU per GiB than 8 MiB
# (benchmarks/bench_stage.py).
CHUNK_BYTES = 1 << 20
ATTEMPTS = 3


class SourceChanged(RamstageError):
    """The source changed while it was read; the copy is discarded."""


class NoSpace(RamstageError):
    """The store has no room for the copy."""


class Cancelled(RamstageError):
    """Staging was called off (model removed, daemon stopping)."""


class DigestMismatch(RamstageError):
    """The source does not have the digest the config expects."""


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    path: Path
    identity: Identity

    @property
    def size_bytes(self) -> int:
        return self.identity[2]


@dataclass(frozen=True)
class SourceListing:
    kind: str  # "file" or "dir"
    files: tuple[SourceFile, ...]
    skipped: tuple[str, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def identities(self) -> tuple[tuple[str, Identity], ...]:
        """What tells one version of a source from another without reading it (restic's rule:
        a changed file changes its size, mtime or ctime), in the form manifests record it."""
        return tuple((f.relpath, f.identity) for f in self.files)


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def list_source(source: Path) -> SourceListing:
    """A file source, or every regular file below a directory source. A symlink inside a
    directory is followed only while it stays inside the source (rsync's rule for modules)."""
    st = os.stat(source)
    if stat.S_ISREG(st.st_mode):
        return SourceListing("file", (SourceFile(source.name, source, identity(st)),), ())
    if not stat.S_ISDIR(st.st_mode):
        raise RamstageError(f"{source}: not a regular file or directory")
    root = os.path.realpath(source)
    files: list[SourceFile] = []
    skipped: list[str] = []
    seen_dirs = {(st.st_dev, st.st_ino)}
    pending = [("", Path(root))]
    while pending:
        prefix, directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                relpath = prefix + entry.name
                path = Path(entry.path)
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if not _inside(real, root):
                        skipped.append(f"{relpath}: symlink leads outside the source")
                        continue
                    path = Path(real)
                try:
                    entry_st = os.stat(path)
                except OSError as error:
                    skipped.append(f"{relpath}: {error.strerror}")
                    continue
                if stat.S_ISDIR(entry_st.st_mode):
                    key = (entry_st.st_dev, entry_st.st_ino)
                    if key in seen_dirs:
                        skipped.append(f"{relpath}: directory loop")
                        continue
                    seen_dirs.add(key)
                    pending.append((relpath + "/", path))
                elif stat.S_ISREG(entry_st.st_mode):
                    files.append(SourceFile(relpath, path, identity(entry_st)))
                else:
                    skipped.append(f"{relpath}: not a regular file")
    files.sort(key=lambda f: f.relpath)
    return SourceListing("dir", tuple(files), tuple(skipped))


class _Progress:
    def __init__(self, total_bytes: int, report: Callable[[float], None]) -> None:
        self.total, self.done, self.report = max(total_bytes, 1), 0, report

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        self.report(min(self.done / self.total, 1.0))


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class _Copier:
    """Copies one file: the main thread reads and writes, one thread hashes the bytes read, and
    every chunk written is read back from the store and compared with them. So the RAM copy is
    checked against exactly the bytes that made the digest, at little more than the cost of cp.

    The read-back goes to whichever thread has less to do: blake3 hashes several times faster
    than memory copies, so its thread has room for the check; sha256 (1-2 GB/s) has none, and
    the check stays with the copy. Either way checking overlaps copying."""

    def __init__(self, algorithm: str, on_bytes: Callable[[int], None], cancel: Event) -> None:
        self.algorithm, self.on_bytes, self.cancel = algorithm, on_bytes, cancel
        self.buffers = [bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)]
        self.check = bytearray(CHUNK_BYTES)  # used by one thread only, as check_in_worker says
        self.check_in_worker = algorithm == "blake3"

    def copy(self, source: SourceFile, dst_fd: int, src_fd: int) -> str:
        hasher = new_hasher(self.algorithm)
        hashing: list[Future[None]] = []
        offset = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ramstage-hash") as pool:
            for index in itertools.count():
                if self.cancel.is_set():
                    raise Cancelled(f"{source.path}: staging cancelled")
                if len(hashing) == 2:
                    hashing.pop(0).result()  # the buffer about to be refilled is done with
                buffer = self.buffers[index % 2]
                count = os.readv(src_fd, [buffer])
                if count == 0:
                    break
                data = memoryview(buffer)[:count]
                if self.check_in_worker:
                    _write_all(dst_fd, data)
                    work = partial(
                        self._hash_and_check, hasher, source, dst_fd, offset, buffer, count
                    )
                    hashing.append(pool.submit(work))
                else:
                    hashing.append(pool.submit(hasher.update, data))
                    _write_all(dst_fd, data)
                    self._check(source, dst_fd, offset, buffer, count)
                offset += count
                self.on_bytes(count)
            for future in hashing:
                future.result()
        if offset != source.size_bytes:
            raise SourceChanged(f"{source.path}: size changed while reading")
        return f"{self.algorithm}:{hasher.hexdigest()}"

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
        # Comparing whole bytearrays is a memcmp; slicing copies, so only the last chunk does.
        read_back = os.preadv(dst_fd, [memoryview(self.check)[:count]], offset)
        same = (
            self.check == buffer if count == CHUNK_BYTES else self.check[:count] == buffer[:count]
        )
        if read_back != count or not same:
            raise RamstageError(f"{source.path}: the RAM copy differs from the bytes read")


def _copy_file(copier: _Copier, source: SourceFile, generation: Path) -> StagedFile:
    src_fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(src_fd)
        if not stat.S_ISREG(before.st_mode):
            raise RamstageError(f"{source.path}: not a regular file")
        source = SourceFile(source.relpath, source.path, identity(before))
        target = generation / source.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
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
            digest = copier.copy(source, dst_fd, src_fd)
            os.fchmod(dst_fd, 0o444)
        finally:
            os.close(dst_fd)
        after = os.fstat(src_fd)
        now = os.stat(source.path)
    finally:
        os.close(src_fd)
    if identity(before) != identity(after) or identity(after) != identity(now):
        raise SourceChanged(f"{source.path}: changed while it was copied")
    return StagedFile(source.relpath, before.st_size, digest, identity(before))


def _clear(generation: Path) -> None:
    remove_tree(generation)
    generation.mkdir(mode=0o755)


def stage_source(
    name: str,
    source: Path,
    generation: Path,
    algorithm: str,
    *,
    on_progress: Callable[[float], None] = lambda fraction: None,
    cancel: Event | None = None,
    expected_digest: str | None = None,
) -> Manifest:
    """Fills the empty directory `generation` with a verified copy of `source`, retrying a
    bounded number of times if the source changes underneath, and returns its manifest."""
    cancel = cancel or Event()
    for attempt in itertools.count(1):
        listing = list_source(source)
        copier = _Copier(algorithm, _Progress(listing.size_bytes, on_progress), cancel)
        try:
            files = tuple(_copy_file(copier, f, generation) for f in listing.files)
            break
        except (SourceChanged, FileNotFoundError):
            # A file listed a moment ago that is gone now is a change too.
            if attempt == ATTEMPTS:
                raise SourceChanged(f"{source}: kept changing while it was copied") from None
            _clear(generation)
            time.sleep(0.2 * 2**attempt)
    if listing.kind == "file":
        digest = files[0].digest
    else:
        digest = combine(algorithm, [f"{f.relpath} {f.size_bytes} {f.digest}" for f in files])
    if expected_digest and digest != expected_digest:
        raise DigestMismatch(f"digest mismatch: expected {expected_digest}, source has {digest}")
    return Manifest(
        name=name,
        source=str(source),
        kind=listing.kind,
        digest=digest,
        files=files,
        skipped=listing.skipped,
    )
