"""The copy pipeline of the fast loader: file bytes -> reused host ring -> device storages.

Several threads read file chunks with os.preadv into slots of one host ring that is kept between
loads. Each slot's bytes are copied to the device on one CUDA stream without blocking the thread;
an event recorded after the copy guards the slot, so it is read into again only after the device
has taken its bytes. Where it was built, that loop is C (native.py, copyloop.c), which holds no
GIL between reads and cuts the reads itself, by plan_chunks' rules; the Python loop here runs
without it and for rows gathered by numpy.

The ring's host memory (hostring.py) is faulted in and page-locked by a background thread
from the ring's creation on, and each slot goes to the readers as soon as it is locked, so a
fresh process's first load starts copying after one slot rather than after the whole ring.
Copies from pageable memory, or straight from the file's pages, were slower (docs/gpu.md).

A tensor-parallel rank's slice along an inner dim is rows, one every row_stride bytes
(Strided). Short rows with short gaps are gathered a slot's worth at a time from a read-only
shared mapping of the file (the staged pages) by numpy, whose strided copy is single-threaded
and releases the GIL (torch's CPU copy starts an OpenMP team in each reader thread): a rank
reads only its rows. Without numpy, preadv reads the rows' covering range, gaps into a
discarded buffer: 10x slower for 1 KiB rows 8 KiB apart. Long rows or gaps: a read per row.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from ramstage.fastload import native
from ramstage.fastload.hostring import PAGE_BYTES, HostRing, Slot
from ramstage.fastload.stream import copy_stream

try:
    import numpy
except ImportError:  # strided slices then read their covering range (read_rows)
    numpy = None  # type: ignore[assignment]

# Small gaps between segments (zip headers, alignment padding) are read along rather than
# starting a new read: one larger preadv is cheaper than two.
MAX_GAP_BYTES = 1 << 20
# Linux takes at most 1024 buffers per preadv (UIO_MAXIOV): a row and a gap each use one.
ROWS_PER_READ = 512


@dataclass(frozen=True)
class Segment:
    """nbytes of file `source` at file_offset go to target[target_offset:] (a flat uint8 tensor)."""

    source: str
    file_offset: int
    nbytes: int
    target: torch.Tensor
    target_offset: int


@dataclass(frozen=True)
class Strided:
    """`rows` runs of row_bytes, row_stride apart in `source` from file_offset, go side by side
    to target[target_offset:]: one rank's slice of a tensor along an inner dim."""

    source: str
    file_offset: int
    row_bytes: int
    rows: int
    row_stride: int
    target: torch.Tensor
    target_offset: int


# Pieces and chunks are named tuples, made in a third of a frozen dataclass's time: the Python
# loop plans hundreds of each for a 4 GiB load before its first read.
class Piece(NamedTuple):
    chunk_offset: int
    target: torch.Tensor
    target_offset: int
    nbytes: int


class Chunk(NamedTuple):
    """One read: nbytes of `source` at file_offset into one ring slot, then its pieces copied
    out. With a row_stride, nbytes are rows of row_bytes, one every row_stride bytes."""

    source: str
    file_offset: int
    nbytes: int
    pieces: tuple[Piece, ...]
    row_bytes: int = 0
    row_stride: int = 0


def split_rows(
    items: Sequence[Segment | Strided], chunk_bytes: int
) -> tuple[list[Segment], list[Chunk]]:
    """The segments, sorted by file and offset, and the chunks of gathered rows: rows that fit a
    slot with gaps worth reading along are gathered, a slot's worth per chunk; other rows
    become segments of their own."""
    segments = [item for item in items if isinstance(item, Segment)]
    chunks: list[Chunk] = []
    for item in items:
        if not isinstance(item, Strided):
            continue
        if item.row_bytes <= chunk_bytes and item.row_stride - item.row_bytes <= MAX_GAP_BYTES:
            chunks.extend(_gather_chunks(item, chunk_bytes))
            continue
        segments.extend(
            Segment(
                item.source,
                item.file_offset + row * item.row_stride,
                item.row_bytes,
                item.target,
                item.target_offset + row * item.row_bytes,
            )
            for row in range(item.rows)
        )
    segments.sort(key=lambda s: (s.source, s.file_offset))
    return [s for s in segments if s.nbytes], chunks


def _gather_chunks(item: Strided, chunk_bytes: int) -> list[Chunk]:
    per_chunk = chunk_bytes // item.row_bytes
    chunks = []
    for first in range(0, item.rows, per_chunk):
        nbytes = min(per_chunk, item.rows - first) * item.row_bytes
        target_offset = item.target_offset + first * item.row_bytes
        chunks.append(
            Chunk(
                item.source,
                item.file_offset + first * item.row_stride,
                nbytes,
                (Piece(0, item.target, target_offset, nbytes),),
                item.row_bytes,
                item.row_stride,
            )
        )
    return chunks


def plan_chunks(segments: Sequence[Segment], chunk_bytes: int) -> list[Chunk]:
    """Packs segments (sorted by file and offset, as split_rows gives them) into reads of at
    most chunk_bytes; splits large segments. The C loop cuts its reads the same way."""
    chunks: list[Chunk] = []
    source, begin, end = "", 0, 0  # the open chunk (none while pieces is empty)
    pieces: list[Piece] = []

    def close() -> None:
        if pieces:
            chunks.append(Chunk(source, begin, end - begin, tuple(pieces)))
            pieces.clear()

    for segment in segments:  # sorted by file and offset (split_rows)
        done = 0
        while done < segment.nbytes:
            start = segment.file_offset + done
            fits = (
                bool(pieces)
                and segment.source == source
                and end <= start <= end + MAX_GAP_BYTES
                and start < begin + chunk_bytes
            )
            if not fits:
                close()
                source, begin = segment.source, start
            n = min(segment.nbytes - done, begin + chunk_bytes - start)
            pieces.append(Piece(start - begin, segment.target, segment.target_offset + done, n))
            end = start + n
            done += n
    close()
    return chunks


def read_exact(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Fills the (non-empty) buffers in turn from the file's bytes at offset."""
    first = 0
    while first < len(buffers):
        n = os.preadv(fd, buffers[first:], offset)
        if n == 0:
            raise native.ended(offset)
        offset += n
        while first < len(buffers) and n >= len(buffers[first]):
            n -= len(buffers[first])
            first += 1
        if n:
            buffers[first] = buffers[first][n:]


def gather_rows(mapped: Any, memory: memoryview, chunk: Chunk) -> None:
    """The chunk's rows side by side into memory, from `mapped` (a numpy view of the file)."""
    shape = (chunk.nbytes // chunk.row_bytes, chunk.row_bytes)
    rows = numpy.lib.stride_tricks.as_strided(
        mapped[chunk.file_offset :], shape, (chunk.row_stride, 1), writeable=False
    )
    numpy.copyto(numpy.frombuffer(memory, numpy.uint8, chunk.nbytes).reshape(shape), rows)


def read_rows(fd: int, memory: memoryview, chunk: Chunk, gap: memoryview) -> None:
    """The chunk's rows side by side into memory; the bytes between them into gap, unread."""
    rows, gap_bytes = chunk.nbytes // chunk.row_bytes, chunk.row_stride - chunk.row_bytes
    for first in range(0, rows, ROWS_PER_READ):
        buffers = []
        for row in range(first, min(first + ROWS_PER_READ, rows)):
            if row > first:
                buffers.append(gap[:gap_bytes])
            buffers.append(memory[row * chunk.row_bytes : (row + 1) * chunk.row_bytes])
        read_exact(fd, buffers, chunk.file_offset + first * chunk.row_stride)


class Ring:
    """Host slots, a thread pool and (CUDA) a copy stream, reused across loads until close()."""

    def __init__(
        self, device: torch.device, *, threads: int, ring_bytes: int, rows: bool = False
    ) -> None:
        self.device = device
        self.threads = threads
        self.ring_bytes = ring_bytes
        slots = 2 * threads  # one being read by each thread, one whose copy is in flight
        self.chunk_bytes = max(ring_bytes // slots // PAGE_BYTES * PAGE_BYTES, PAGE_BYTES)
        cuda = device.type == "cuda"
        self._host = HostRing(slots, self.chunk_bytes, cuda)
        self._stream: torch.cuda.Stream | None = None
        self._loop: native.CopyLoop | None = None
        self._free_stream: Callable[[], object] = lambda: None
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None  # for the Python loop (_threads)
        self._gaps = threading.local()  # per thread: a cache-sized buffer written by each core
        try:
            if cuda:
                self._stream, self._free_stream = copy_stream(device)
            addresses = [slot.tensor.data_ptr() for slot in self._host.slots]
            self._loop = native.copy_loop(addresses, self.chunk_bytes, device, self._stream)
            if self._loop is None or rows:  # the C loop starts its own; gathered rows use these
                self._threads()
            self._host.prepare_all(self._hand_over, device)  # in the background, from now on
        except BaseException:  # no stream or no thread: free the ring's memory now
            self._free_all(wait=False)
            raise

    def matches(self, device: torch.device, threads: int, ring_bytes: int) -> bool:
        mine = (self.device, self.threads, self.ring_bytes)
        return not self._host.inherited and mine == (device, threads, ring_bytes)

    def run(self, items: Sequence[Segment | Strided]) -> None:
        """Copies every segment into its target; returns once all bytes are on the device."""
        segments, gathered = split_rows(items, self.chunk_bytes)
        sources = {s.source for s in segments} | {c.source for c in gathered}
        if not sources:
            return
        fds = {source: os.open(source, os.O_RDONLY) for source in sources}
        try:
            if self._loop is not None and not gathered:  # all of it in C, chunks cut there
                # The most reads the segments can make: one each, and one per slot's worth.
                reads = len(segments) + sum(s.nbytes for s in segments) // self.chunk_bytes
                self._loop.run(segments, fds, min(self.threads, reads), MAX_GAP_BYTES)
                return
            pool = self._threads()
            chunks = plan_chunks(segments, self.chunk_bytes) + gathered
            workers = min(self.threads, len(chunks))
            # The views keep their mappings; both go with the job (an error's traceback may
            # hold a view, so an explicit close could fail with BufferError over the real one).
            job = _Job(chunks, _map_strided_sources(chunks, fds))
            futures: list[Future[None]] = [
                pool.submit(self._work, job, fds) for _ in range(workers)
            ]
            for future in futures:
                future.exception()  # wait for all before raising: slots must be back first
            for future in futures:
                future.result()
        finally:
            if self._stream is not None:
                self._stream.synchronize()
            for fd in fds.values():
                os.close(fd)

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:  # or a start failed: a fresh pool then
            self._pool = _started_pool(self.threads)
        return self._pool

    def _hand_over(self, slot: Slot) -> None:
        self._free.put(slot)
        if self._loop is not None:
            self._loop.ready.value += 1  # slots come in order: the C loop may use this one too

    def _work(self, job: _Job, fds: dict[str, int]) -> None:
        if self._stream is None:
            self._drain(job, fds)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._drain(job, fds)

    def _drain(self, job: _Job, fds: dict[str, int]) -> None:
        while (chunk := job.take()) is not None:
            slot = self._free.get()  # prepared slots arrive from the ring's preparing thread
            try:
                if slot.event is not None:
                    slot.event.synchronize()  # the slot's previous copy has left it
                if chunk.row_stride and chunk.source in job.mapped:
                    gather_rows(job.mapped[chunk.source], slot.memory, chunk)
                elif chunk.row_stride:
                    read_rows(fds[chunk.source], slot.memory, chunk, self._gap())
                else:
                    read_exact(fds[chunk.source], [slot.memory[: chunk.nbytes]], chunk.file_offset)
                for p in chunk.pieces:
                    source = slot.tensor[p.chunk_offset : p.chunk_offset + p.nbytes]
                    target = p.target[p.target_offset : p.target_offset + p.nbytes]
                    target.copy_(source, non_blocking=slot.event is not None)
                if slot.event is not None:
                    slot.event.record(self._stream)
            except BaseException:
                job.fail()
                raise
            finally:
                self._free.put(slot)

    def _gap(self) -> memoryview:
        gap: memoryview | None = getattr(self._gaps, "buffer", None)
        if gap is None:
            gap = self._gaps.buffer = memoryview(bytearray(MAX_GAP_BYTES))
        return gap

    def close(self) -> None:
        if self._host.inherited:  # a fork()'s child has none of its threads, stream or slots,
            return  # and the ring's address may be another mapping's there by now
        self._free_all(wait=True)

    def _free_all(self, *, wait: bool) -> None:
        """Frees the threads, the C loop's events, the stream and the host memory; with wait,
        after the threads' last copies have left."""
        with contextlib.ExitStack() as after:  # each runs, last first, whatever raises
            after.callback(self._host.close)
            after.callback(self._free_stream)
            if self._loop is not None:
                after.callback(self._loop.close)
            if self._pool is not None:
                self._pool.shutdown(wait=wait)
            if wait and self._stream is not None:
                self._stream.synchronize()


def _started_pool(threads: int) -> ThreadPoolExecutor:
    """A pool with every thread started at once (16 threads: 2-4 ms), before the ring is
    prepared: for the Python loop, or the rows a sharded load gathers (the C loop starts its
    own). Started one by one as work came, while slots were page-locked, they came up 2-6 ms
    apart, the preparing thread's pool waiting behind concurrent.futures' module-wide lock:
    the first read came 10-40 ms after the load began (one H200)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="ramstage-fastload")
    started = threading.Barrier(threads + 1)
    try:
        for _ in range(threads):
            pool.submit(started.wait)  # each waits, so each submit starts a thread
        started.wait()
    except BaseException:  # the threads already started return; the pool goes with them
        started.abort()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


def _map_strided_sources(chunks: list[Chunk], fds: dict[str, int]) -> dict[str, Any]:
    """numpy views of read-only shared mappings of the files that strided chunks gather from."""
    if numpy is None:
        return {}
    sources = {chunk.source for chunk in chunks if chunk.row_stride}
    return {
        source: numpy.frombuffer(mmap.mmap(fds[source], 0, prot=mmap.PROT_READ), numpy.uint8)
        for source in sources
    }


class _Job:
    """The chunks of one load, handed out to worker threads one at a time; `mapped`: numpy
    views of the files that strided chunks gather from."""

    def __init__(self, chunks: list[Chunk], mapped: dict[str, Any]) -> None:
        self._chunks = chunks
        self.mapped = mapped
        self._next = 0
        self._failed = False
        self._lock = threading.Lock()

    def take(self) -> Chunk | None:
        with self._lock:
            if self._failed or self._next == len(self._chunks):
                return None
            self._next += 1
            return self._chunks[self._next - 1]

    def fail(self) -> None:
        with self._lock:
            self._failed = True
