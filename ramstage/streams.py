"""One file's copy on two streams: each reads its chunks, writes them to the store, reads them
back and compares, and hashes them in the file's order, taking turns.

Sources are read with pread(2), never mapped: a source truncated under an mmap raises SIGBUS,
which cannot be handled usefully (invariant 4).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from functools import partial
from threading import Condition, Event, Lock
from typing import Callable

from ramstage.digest import Hasher, new_hasher
from ramstage.errors import Cancelled, RamstageError
from ramstage.sources import SourceChanged, SourceFile
from ramstage.threads import DaemonPool

# Small enough that a chunk is still in the CPU caches when it is hashed, read back and
# compared: 1 MiB took 13% (sha256) to 28% (blake3) less CPU per GiB than 8 MiB
# (benchmarks/bench_stage.py).
CHUNK_BYTES = 1 << 20
# Source pages read are dropped from the page cache as the copy goes (posix_fadvise(2)
# DONTNEED): the RAM copy replaces them, and a second copy in the cache is exactly the memory
# pressure ramstage exists to avoid. Every this many bytes, so no large model piles up first.
DROP_EVERY_BYTES = 64 << 20
# Reads are asked for this far ahead (posix_fadvise(2) WILLNEED starts them without waiting),
# so a slow disk keeps reading while a chunk is written and checked.
READ_AHEAD_BYTES = 32 << 20


class Aborted(Exception):
    """Another file of the same copy failed: this one stops too."""


class _Halted(Exception):
    """The other stream of the same file failed: this one stops too."""


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


class FileCopier:
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
            raise Aborted
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
