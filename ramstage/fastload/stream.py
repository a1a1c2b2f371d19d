"""The fast loader's copy stream, made by the CUDA driver where it can be.

torch's first torch.cuda.Stream() in a process makes the device's whole pool of streams, which
took 2.7-3.8 ms of a fresh process's first load; the driver makes one stream in 0.2 ms
(docs/benchmarks.md, round seven). The driver is reached through ctypes (libcuda.so.1, which
every CUDA machine has); torch already initialised it.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Callable

import torch

# cuda.h: a stream that does not wait for the legacy default stream, as torch's own streams.
CU_STREAM_NON_BLOCKING = 1

log = logging.getLogger("ramstage.fastload")


def copy_stream(device: torch.device) -> tuple[torch.cuda.Stream, Callable[[], object]]:
    """The ring's copy stream, and what frees it: the driver's, else (ROCm, no libcuda.so.1,
    a driver error) one of torch's. Non-blocking either way: the copies do not wait for the
    default stream."""
    index = torch.cuda.current_device() if device.index is None else device.index
    try:
        driver = None if torch.version.hip else ctypes.CDLL("libcuda.so.1")
    except OSError:
        driver = None
    made = None if driver is None else driver_stream(driver, index)
    if made is None:
        return torch.cuda.Stream(device), lambda: None  # type: ignore[no-untyped-call]
    handle, free = made
    stream = torch.cuda.ExternalStream(handle, device=torch.device("cuda", index))  # type: ignore[no-untyped-call]
    return stream, free


def driver_stream(driver: Any, index: int) -> tuple[int, Callable[[], None]] | None:
    """A non-blocking stream in the device's primary context, the one torch uses, whatever
    context this thread has current (it is pushed for the call), and what frees it; None
    after any driver error. The context stays retained while the stream lives."""
    ordinal, context, handle = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    if driver.cuDeviceGet(ctypes.byref(ordinal), index) != 0:
        return None
    if driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), ordinal) != 0:
        return None
    made = False
    if driver.cuCtxPushCurrent_v2(context) == 0:
        made = driver.cuStreamCreate(ctypes.byref(handle), CU_STREAM_NON_BLOCKING) == 0
        driver.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    if not made:
        driver.cuDevicePrimaryCtxRelease_v2(ordinal)
        return None

    def free() -> None:
        error = driver.cuStreamDestroy_v2(handle)
        driver.cuDevicePrimaryCtxRelease_v2(ordinal)
        if error:
            log.warning("fastload: the copy stream was not destroyed (CUDA driver error %d)", error)

    return int(handle.value or 0), free
