"""The copy pipeline of the fast loader: file bytes -> reused host ring -> device storages.

Several threads read file chunks with os.preadv into slots of one host buffer that is allocated
once and reused (pinned for CUDA: allocating pinned memory costs ~0.6 s per GiB, so it must not
happen per load). Each slot's bytes are copied to the device on one CUDA stream without blocking
the thread; an event recorded after the copy guards the slot, so it is read into again only after
the device has taken its bytes.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

# Small gaps between segments (zip headers, alignment padding) are read along rather than
# starting a new read: one larger preadv is cheaper than two.
MAX_GAP_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096


@dataclass(frozen=True)
class Segment:
    """nbytes of file `source` at file_offset go to target[target_offset:] (a flat uint8 tensor)."""

    source: str
    file_offset: int
    nbytes: int
    target: torch.Tensor
    target_offset: int


@dataclass(frozen=True)
class Piece:
    chunk_offset: int
    target: torch.Tensor
    target_offset: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One read: nbytes of `source` at file_offset into one ring slot, then its pieces copied out."""

    source: str
    file_offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


def plan_chunks(segments: Sequence[Segment], chunk_bytes: int) -> list[Chunk]:
    """Packs segments, in file order, into reads of at most chunk_bytes; splits large segments."""
    chunks: list[Chunk] = []
    source, begin, end = "", 0, 0  # the open chunk (none while pieces is empty)
    pieces: list[Piece] = []

    def close() -> None:
        if pieces:
            chunks.append(Chunk(source, begin, end - begin, tuple(pieces)))
            pieces.clear()

    for segment in sorted(segments, key=lambda s: (s.source, s.file_offset)):
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


def read_exact(fd: int, buffer: memoryview, offset: int) -> None:
    while buffer:
        n = os.preadv(fd, [buffer], offset)
        if n == 0:
            raise EOFError(f"file ends at byte {offset}, before the data its header describes")
        buffer, offset = buffer[n:], offset + n


class _Slot:
    """One ring slot: a host tensor, a writable view of its memory, and (CUDA) its copy event."""

    def __init__(self, tensor: torch.Tensor, event: Any) -> None:
        self.tensor = tensor
        self.memory = memoryview((ctypes.c_ubyte * tensor.numel()).from_address(tensor.data_ptr()))
        self.event = event


class Ring:
    """Host slots, a thread pool and (CUDA) a copy stream, reused across loads until close()."""

    def __init__(self, device: torch.device, *, threads: int, ring_bytes: int) -> None:
        self.device = device
        self.threads = threads
        self.ring_bytes = ring_bytes
        slots = 2 * threads  # one being read by each thread, one whose copy is in flight
        self.chunk_bytes = max(ring_bytes // slots, MIN_CHUNK_BYTES)
        cuda = device.type == "cuda"
        self._host = torch.empty(slots * self.chunk_bytes, dtype=torch.uint8, pin_memory=cuda)
        self._stream = torch.cuda.Stream(device) if cuda else None
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for i in range(slots):
            part = self._host[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
            self._free.put(_Slot(part, torch.cuda.Event() if cuda else None))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ramstage-fastload")

    def matches(self, device: torch.device, threads: int, ring_bytes: int) -> bool:
        return (self.device, self.threads, self.ring_bytes) == (device, threads, ring_bytes)

    def run(self, segments: Sequence[Segment]) -> None:
        """Copies every segment into its target; returns once all bytes are on the device."""
        chunks = plan_chunks(segments, self.chunk_bytes)
        if not chunks:
            return
        fds = {source: os.open(source, os.O_RDONLY) for source in {c.source for c in chunks}}
        job = _Job(chunks)
        try:
            workers = min(self.threads, len(chunks))
            futures: list[Future[None]] = [
                self._pool.submit(self._work, job, fds) for _ in range(workers)
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

    def _work(self, job: _Job, fds: dict[str, int]) -> None:
        if self._stream is None:
            self._drain(job, fds)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._drain(job, fds)

    def _drain(self, job: _Job, fds: dict[str, int]) -> None:
        while (chunk := job.take()) is not None:
            slot = self._free.get()
            try:
                if slot.event is not None:
                    slot.event.synchronize()  # the slot's previous copy has left it
                read_exact(fds[chunk.source], slot.memory[: chunk.nbytes], chunk.file_offset)
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

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._stream is not None:
            self._stream.synchronize()


class _Job:
    """The chunks of one load, handed out to worker threads one at a time."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self._chunks = chunks
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
