"""The host side of the fast loader's ring: slots of one mapping, page-locked for CUDA.

The mapping is of a ring file kept in RAM from an earlier process where one can be claimed
(rings.py): its pages exist already, so faulting them in costs next to nothing. Else it is
fresh anonymous memory, which the kernel must zero first.

The mapping is aligned to and advised for huge pages (MADV_HUGEPAGE), which the driver locks
faster where the kernel grants them. Preparing a slot is faulting it in (the kernel zeroes its
pages), then registering it with cudaHostRegister. On a fresh process's first load the ring is
prepared in the background while the load runs: the readers use each slot as soon as it is
ready (pipeline.Ring), so copies start after the first slot rather than after the whole ring.

Measured on one H100 (docs/benchmarks.md, bench_gpu_first.py): zeroing was most of the cost
(512 MiB took one thread ~75 ms, registering it after that ~17 ms), and more threads did not
make it faster there, which is why the ring is small (fastload/__init__.py). Two threads fault
the slots in with madvise(MADV_POPULATE_WRITE), which holds no GIL (writing a byte of each page
would hold it while the kernel zeroes); one thread registers them in order, as registering
takes a driver lock that stalls the other threads' copies anyway.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable

import torch

from ramstage import rings

PAGE_BYTES = mmap.PAGESIZE
HUGE_PAGE_BYTES = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h; a no-op where transparent huge pages are off
MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14; older kernels refuse it (EINVAL)
MADV_DONTFORK = 10  # linux/mman.h: a child of fork() gets no copy of the mapping
# Threads faulting slots in at once, in slot order: 1, 2, 4 and 16 gave the same first loads
# on one H100 (docs/benchmarks.md, "What was tried"); two keep the next slot faulting in while
# one is registered, without more threads beside the readers.
FAULT_WORKERS = 2

log = logging.getLogger("ramstage.fastload")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class Slot:
    """One ring slot: its memory as a tensor and a writable view, and (CUDA) its copy event."""

    def __init__(self, address: int, nbytes: int, event: Any) -> None:
        array = (ctypes.c_ubyte * nbytes).from_address(address)
        self.tensor = torch.frombuffer(array, dtype=torch.uint8)
        self.memory = memoryview(array).cast("B")
        self.event = event
        self.locked = False


# The rings of this process not yet closed.
_open_rings: weakref.WeakSet[HostRing] = weakref.WeakSet()
# Held while a ring claims its file and maps it, and while it lets the file go: a fork() waits,
# so its child never copies a descriptor or a mapping not yet marked as the parent's.
_fork_lock = threading.RLock()
_generation = 0  # one more in each child of fork(): rings of an earlier one are its parent's


def _after_fork_in_child() -> None:
    """A child of fork() shares each ring file's open description with its parent, and with
    it the lock (flock(2) locks belong to the description): the child closes its copies, so
    the file is free once the parent lets go of it, not once every child (a data loader's
    workers, say) has exited. The child has no copy of the mapping (MADV_DONTFORK), and keeps
    each ring object for good: freeing its CUDA events there would call a driver that a forked
    child cannot use (PyTorch aborts the process)."""
    global _generation
    _generation += 1
    _fork_lock.release()  # taken before the fork, by this very thread
    for ring in list(_open_rings):
        ring._close_file()
        # A reference no one holds: a list of them would be emptied when the child exits.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(ring))


os.register_at_fork(
    before=_fork_lock.acquire,
    after_in_parent=_fork_lock.release,
    after_in_child=_after_fork_in_child,
)


class HostRing:
    """One mapping cut into slots; prepare_all() readies them in a background thread."""

    def __init__(self, slots: int, chunk_bytes: int, cuda: bool) -> None:
        self._cudart = torch.cuda.cudart() if cuda else None  # type: ignore[no-untyped-call]
        self._nbytes = slots * chunk_bytes + HUGE_PAGE_BYTES
        self._generation = _generation
        with _fork_lock:
            # A ring file kept from an earlier process (rings.py), else fresh anonymous memory.
            self._file = rings.claim(self._nbytes)
            prot, flags, fd = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, self._file
            if fd is None:
                flags, fd = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1
            address = _libc.mmap(None, self._nbytes, prot, flags, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                error = ctypes.get_errno()
                self._close_file()
                raise OSError(error, f"mmap of the {self._nbytes}-byte ring: {os.strerror(error)}")
            # A forked child would otherwise keep the ring file's pages (or copy-on-write
            # pinned memory) for as long as it lives, though it cannot use the ring.
            _libc.madvise(address, self._nbytes, MADV_DONTFORK)
            _open_rings.add(self)
        self._address: int = address
        start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        _libc.madvise(start, slots * chunk_bytes, MADV_HUGEPAGE)
        try:
            self.slots = [
                Slot(start + i * chunk_bytes, chunk_bytes, torch.cuda.Event() if cuda else None)  # type: ignore[no-untyped-call]
                for i in range(slots)
            ]
        except BaseException:  # the mapping and the ring file's lock go with the error
            _libc.munmap(address, self._nbytes)
            self._close_file()
            raise
        self._preparer: threading.Thread | None = None
        self._closing = threading.Event()  # close(): the slots not yet prepared stay as they are

    def prepare_all(self, hand_over: Callable[[Slot], None], device: torch.device) -> None:
        """Starts the thread that prepares the slots, FAULT_WORKERS faulting them in at once,
        and hands each over, in order, once it is locked."""

        def fault(slot: Slot) -> None:
            if not self._closing.is_set():
                fault_in(slot)

        def prepare() -> None:
            handed = 0
            try:
                # Registered in the device's context, as the copies are made (pipeline.Ring).
                device_context = torch.cuda.device(device) if self._cudart else nullcontext()
                with device_context, ThreadPoolExecutor(FAULT_WORKERS) as faults:
                    faulted = [faults.submit(fault, slot) for slot in self.slots]
                    for slot, done in zip(self.slots, faulted):
                        done.result()
                        if self._closing.is_set():
                            break
                        self._lock(slot)
                        hand_over(slot)
                        handed += 1
            except Exception:  # noqa: BLE001 - the slots stay usable, so the loads go on
                log.exception("fastload: preparing the ring failed; its slots are used as they are")
            finally:
                for slot in self.slots[handed:]:  # after an error: used unlocked, still right
                    hand_over(slot)

        self._preparer = threading.Thread(target=prepare, name="ramstage-fastload-lock")
        self._preparer.start()

    def _lock(self, slot: Slot) -> None:
        if self._cudart is None:
            return
        error = self._cudart.cudaHostRegister(slot.tensor.data_ptr(), slot.tensor.numel(), 0)
        if error != self._cudart.cudaError.success:
            # Copies from pageable memory are still right, only slower (the driver stages them).
            reason = self._cudart.cudaGetErrorString(error)
            log.warning("fastload: cannot page-lock a ring slot (%s); copying unlocked", reason)
            return
        slot.locked = True

    @property
    def inherited(self) -> bool:
        """Made before a fork() of which this process is the child: the parent's, not ours
        (no mapping, no preparing thread, no file here), so never to be closed here."""
        return self._generation != _generation

    def close(self) -> None:
        """Stops preparing (a ring closed at once, as after a load left to the plain loader,
        waits for at most the slots being faulted in), then frees everything."""
        self._closing.set()
        if self._preparer is not None:
            self._preparer.join()
        for slot in self.slots:
            if slot.locked and self._cudart is not None:
                self._cudart.cudaHostUnregister(slot.tensor.data_ptr())
        self.slots.clear()
        _libc.munmap(self._address, self._nbytes)
        _open_rings.discard(self)
        self._close_file()

    def _close_file(self) -> None:
        """Lets go of the ring file (its lock): the next process may claim it."""
        with _fork_lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None


def fault_in(slot: Slot) -> None:
    """Backs every page of the slot now: in the kernel, without the GIL, where
    MADV_POPULATE_WRITE exists; else by writing a byte of each page (holding the GIL)."""
    if _libc.madvise(slot.tensor.data_ptr(), len(slot.memory), MADV_POPULATE_WRITE) != 0:
        slot.memory[::PAGE_BYTES] = bytes(len(slot.memory[::PAGE_BYTES]))
