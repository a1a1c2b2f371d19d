"""The copy loop in C (copyloop.c), where it was built: the same reads and copies as the ring's
Python loop (pipeline.Ring), with no Python and no GIL between one read and the next.

setup.py builds it as ramstage/fastload/_copyloop*.so where a C compiler is at hand; it is
loaded with ctypes, and without it the Python loop runs. On a warm load the Python loop spent
a few tenths of a millisecond of each 8 MiB chunk holding the GIL (issuing the chunk's copies,
taking the next), shared by 16 threads: the C loop took 100.0 ms for a 4 GiB .safetensors where
the Python loop took 120.8 and fastsafetensors' kept loader 107.2 (one H100,
docs/benchmarks.md, round eight).
"""

from __future__ import annotations

import array
import ctypes
import importlib.util
import logging
import os
from collections.abc import Sequence
from ctypes import c_int32, c_int64, c_uint64, c_void_p
from typing import Any, Callable

import torch

# cuda.h: CU_EVENT_DISABLE_TIMING, as torch's own events (spinning, not blocking, on a wait)
EVENT_FLAGS = 2
DRIVER_CALLS = (
    "cuMemcpyHtoDAsync_v2",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuCtxSetCurrent",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
)


class _Cuda(ctypes.Structure):
    _fields_ = [(name, c_void_p) for name in (*DRIVER_CALLS, "context", "stream", "events")]


class _Error(ctypes.Structure):
    _fields_ = [("kind", c_int64), ("code", c_int64), ("offset", c_int64)]


def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("ramstage.fastload._copyloop")
    if spec is None or spec.origin is None:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
        copy = library.rs_copy_segments
    except (OSError, AttributeError) as error:  # not loadable here (another machine's build)
        log.warning("fastload: the C copy loop %s cannot be used (%s)", spec.origin, error)
        return None
    copy.restype = c_int32
    copy.argtypes = (c_int32, c_void_p, c_int64, c_uint64, c_uint64, c_void_p, c_int64)
    copy.argtypes += (c_void_p, c_void_p, c_void_p)
    return library


log = logging.getLogger("ramstage.fastload")
LIBRARY = _library()


def ended(offset: int) -> EOFError:
    return EOFError(f"file ends at byte {offset}, before the data its header describes")


class CopyLoop:
    """The C loop over one ring's slots (their addresses, slot_bytes each) and, on a GPU, the
    driver's calls, the device's context, the copy stream and an event per slot. `ready`
    counts the slots handed over so far."""

    def __init__(
        self,
        slots: Sequence[int],
        slot_bytes: int,
        cuda: _Cuda | None = None,
        free: Callable[[], object] = object,
    ) -> None:
        self.ready = c_int32(0)
        self._slots = (c_uint64 * len(slots))(*slots)
        self._slot_bytes = slot_bytes
        self._cuda = cuda
        self._free = free

    def close(self) -> None:
        """Frees the events (not in a fork()'s child: Ring.close returns before)."""
        self._free()

    def run(self, segments: Sequence[Any], fds: dict[str, int], threads: int, max_gap: int) -> None:
        """Reads every segment (pipeline.Segment, at least one, none empty, sorted by file and
        offset) in reads of at most a slot, cut as pipeline.plan_chunks cuts them, and issues
        its copies; the caller synchronizes the stream."""
        assert LIBRARY is not None
        if not segments:
            raise ValueError("the C copy loop needs a segment")
        for s in segments:  # the C loop writes where it is told: a planning error must not
            if not 0 < s.nbytes <= s.target.numel() - s.target_offset:  # land elsewhere
                raise ValueError(f"a segment of {s.nbytes} bytes is empty or past its target")
        # copyloop.c's struct rs_segment, flat: (fd, file_offset, nbytes, target address).
        flat = array.array(
            "Q",
            [
                field
                for s in segments
                for field in (
                    fds[s.source],
                    s.file_offset,
                    s.nbytes,
                    s.target.data_ptr() + s.target_offset,
                )
            ],
        )
        error = _Error()
        cuda = None if self._cuda is None else ctypes.byref(self._cuda)
        reads = (flat.buffer_info()[0], len(segments), self._slot_bytes, max_gap)
        ring = (self._slots, len(self._slots), ctypes.byref(self.ready))
        if LIBRARY.rs_copy_segments(threads, *reads, *ring, cuda, ctypes.byref(error)) == 0:
            return
        if error.kind == 1:
            raise OSError(error.code, os.strerror(error.code))
        if error.kind == 2:
            raise ended(error.offset)
        raise RuntimeError(f"CUDA driver error {error.code} while copying to the device")


def available() -> bool:
    """Whether the C loop can copy here: built, and torch not ROCm's (its calls are CUDA's)."""
    return LIBRARY is not None and not torch.version.hip


def copy_loop(
    slots: Sequence[int], slot_bytes: int, device: torch.device, stream: Any
) -> CopyLoop | None:
    """The C loop for a ring, where it can copy (available()): on the CPU (the pipeline's
    tests), or on a CUDA device whose driver (libcuda.so.1) gives every call it needs; else
    None."""
    if not available():
        return None
    if device.type != "cuda":
        return CopyLoop(slots, slot_bytes)
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        calls = [ctypes.cast(getattr(driver, name), c_void_p) for name in DRIVER_CALLS]
    except (OSError, AttributeError):
        return None
    handle = c_void_p(stream.cuda_stream)
    made = stream_context_and_events(driver, handle, len(slots))
    if made is None:
        log.warning("fastload: the CUDA driver refused the C copy loop; copying with Python's")
        return None
    context, events, free = made
    cuda = _Cuda(*calls, context, handle, ctypes.cast(events, c_void_p))
    return CopyLoop(slots, slot_bytes, cuda, free)


def stream_context_and_events(
    driver: Any, stream: c_void_p, count: int
) -> tuple[c_void_p, Any, Callable[[], None]] | None:
    """The copy stream's context (the device's primary one, torch's) and `count` events made
    in it, with what frees them; None after any driver error. The context is pushed for each
    call, so the caller's own stays current."""
    context = c_void_p()
    if driver.cuStreamGetCtx(stream, ctypes.byref(context)) != 0 or not context.value:
        return None
    events = (c_void_p * count)()
    made = 0

    def in_context(calls: Callable[[], object]) -> bool:
        if driver.cuCtxPushCurrent_v2(context) != 0:
            return False
        try:
            calls()
        finally:
            driver.cuCtxPopCurrent_v2(ctypes.byref(c_void_p()))
        return True

    def make() -> None:
        nonlocal made
        event = c_void_p()
        while made < count and driver.cuEventCreate(ctypes.byref(event), EVENT_FLAGS) == 0:
            events[made] = event.value
            made += 1

    def destroy() -> None:
        for event in events[:made]:
            driver.cuEventDestroy_v2(c_void_p(event))

    def free() -> None:
        in_context(destroy)

    if not in_context(make) or made < count:
        free()
        return None
    return context, events, free
