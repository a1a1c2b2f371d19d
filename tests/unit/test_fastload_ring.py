"""The fast loader's host ring: prepared in the background, used slot by slot as it gets ready.

Without a GPU the slots are only faulted in (no page-locking); what is checked is that every
slot is handed over once, in order, backed by real pages, also where the kernel refuses
MADV_POPULATE_WRITE or preparing fails, and that a load runs before the ring is ready.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import logging
import os
import select
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ramstage import fastload, rings
from ramstage.fastload import hostring, native, pipeline, stream

pytestmark = pytest.mark.torch

SLOT_BYTES = 4 * hostring.PAGE_BYTES

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def resident_pages(slot: hostring.Slot) -> int:
    """How many of the slot's pages are backed by memory now (mincore)."""
    pages = len(slot.memory) // hostring.PAGE_BYTES
    vector = ctypes.create_string_buffer(pages)
    assert _libc.mincore(slot.tensor.data_ptr(), len(slot.memory), vector) == 0
    return sum(byte & 1 for byte in vector.raw)


def prepared(ring: hostring.HostRing) -> list[hostring.Slot]:
    """Prepares the ring and returns its slots in the order they were handed over."""
    handed: list[hostring.Slot] = []
    ring.prepare_all(handed.append, torch.device("cpu"))
    assert ring._preparer is not None
    ring._preparer.join()
    return handed


def test_every_slot_is_handed_over_once_in_order_and_backed_by_pages() -> None:
    ring = hostring.HostRing(6, SLOT_BYTES, cuda=False)
    try:
        assert all(resident_pages(slot) == 0 for slot in ring.slots)
        handed = prepared(ring)
        assert handed == ring.slots
        assert all(resident_pages(slot) == 4 for slot in handed)
    finally:
        ring.close()


def test_slots_are_faulted_in_by_writing_where_the_kernel_refuses_populate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hostring, "MADV_POPULATE_WRITE", -1)  # EINVAL, as before Linux 5.14
    ring = hostring.HostRing(2, SLOT_BYTES, cuda=False)
    try:
        assert all(resident_pages(slot) == 4 for slot in prepared(ring))
    finally:
        ring.close()


def test_a_failure_while_preparing_still_hands_every_slot_over(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = hostring.fault_in

    def fault_in(slot: hostring.Slot) -> None:
        if slot is ring.slots[1]:
            raise OSError("no memory")
        real(slot)

    monkeypatch.setattr(hostring, "fault_in", fault_in)
    ring = hostring.HostRing(4, SLOT_BYTES, cuda=False)
    try:
        with caplog.at_level(logging.ERROR, logger="ramstage.fastload"):
            assert sorted(map(id, prepared(ring))) == sorted(map(id, ring.slots))
        assert "preparing the ring failed" in caplog.text
    finally:
        ring.close()


def test_closing_a_ring_stops_preparing_the_slots_not_yet_begun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ring closed while it is prepared (a load left to the plain loader closes the ring it
    made) waits only for the slots being faulted in, not for the whole ring."""
    real, go, faulted = hostring.fault_in, threading.Event(), []

    def fault_in(slot: hostring.Slot) -> None:
        faulted.append(slot)
        if slot is not ring.slots[0]:
            go.wait()  # each fault thread holds a slot until the ring is closing
        real(slot)

    monkeypatch.setattr(hostring, "fault_in", fault_in)
    ring = hostring.HostRing(16, SLOT_BYTES, cuda=False)
    ring.prepare_all(lambda slot: None, torch.device("cpu"))
    while len(faulted) < 1 + hostring.FAULT_WORKERS:  # slot 0 done, one held by each thread
        go.wait(0.01)
    closing = threading.Thread(target=ring.close)
    closing.start()
    while not ring._closing.is_set():
        closing.join(0.01)
    go.set()
    closing.join()
    assert len(faulted) == 1 + hostring.FAULT_WORKERS  # none after those
    assert not ring.slots  # unmapped


def test_a_load_runs_on_the_first_ready_slot_while_the_rest_are_still_prepared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the first slot is ready until the load has returned: every chunk goes through it."""
    loaded = threading.Event()
    real = hostring.HostRing._lock

    def lock(self: hostring.HostRing, slot: hostring.Slot) -> None:
        if slot is not self.slots[0]:
            loaded.wait(timeout=30)
        real(self, slot)

    monkeypatch.setattr(hostring.HostRing, "_lock", lock)
    state = {f"w{i}": torch.randn(1000 + i) for i in range(8)}
    torch.save(state, tmp_path / "m.pt")
    loader = fastload.Loader(pipeline_on_cpu=True)
    try:
        got = loader.load(tmp_path / "m.pt", "cpu", threads=3, ring_bytes=6 * SLOT_BYTES)
        assert not loaded.is_set()  # returned with five of the six slots still unprepared
        assert got.keys() == state.keys()
        assert all(torch.equal(got[name], tensor) for name, tensor in state.items())
    finally:
        loaded.set()
        loader.release()


@pytest.fixture
def ring_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A directory for the rings' files, as the daemon's rings tmpfs is."""
    directory = tmp_path / "rings"
    directory.mkdir()
    directory.chmod(0o1777)
    monkeypatch.setenv("RAMSTAGE_RINGS", str(directory))
    return directory


def test_a_ring_maps_a_ring_file_and_leaves_it_with_its_pages_for_the_next_process(
    ring_files: Path,
) -> None:
    ring = hostring.HostRing(6, SLOT_BYTES, cuda=False)
    try:
        prepared(ring)[0].memory[:12] = b"left in RAM!"
    finally:
        ring.close()
    (kept,) = ring_files.iterdir()
    assert b"left in RAM!" in kept.read_bytes()  # the slots are the file's pages
    again = hostring.HostRing(6, SLOT_BYTES, cuda=False)  # the next process's ring
    try:
        assert [p.stat().st_ino for p in ring_files.iterdir()] == [kept.stat().st_ino]
        assert prepared(again) == again.slots
    finally:
        again.close()


def test_a_load_through_a_ring_file_gives_what_the_plain_loader_gives(
    ring_files: Path, tmp_path: Path
) -> None:
    state = {f"w{i}": torch.randn(3000 + i) for i in range(8)}
    torch.save(state, tmp_path / "m.pt")
    for _ in range(2):  # a fresh ring file, then the same file again
        loader = fastload.Loader(pipeline_on_cpu=True)
        try:
            got = loader.load(tmp_path / "m.pt", "cpu", threads=3, ring_bytes=6 * SLOT_BYTES)
        finally:
            loader.release()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[name], tensor) for name, tensor in state.items())
    assert len(list(ring_files.iterdir())) == 1


def open_paths() -> set[str]:
    """What this process's descriptors are open on."""
    return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}


def test_a_child_of_fork_neither_holds_nor_maps_nor_frees_the_parents_ring_but_keeps_it(
    ring_files: Path, tmp_path: Path
) -> None:
    state = {f"w{i}": torch.randn(3000 + i) for i in range(4)}
    torch.save(state, tmp_path / "m.pt")
    settings = {"threads": 2, "ring_bytes": 6 * SLOT_BYTES}
    loader = fastload.Loader(pipeline_on_cpu=True)
    loader.load(tmp_path / "m.pt", "cpu", **settings)
    (parents,) = ring_files.iterdir()
    report_r, report_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what it holds and maps, then loads on its own; waits to exit
        code = 1
        try:
            os.close(report_r)
            os.close(done_w)
            held = open_paths()
            mapped = Path("/proc/self/maps").read_text()
            unmapped: list[int] = []
            munmap = hostring._libc.munmap
            hostring._libc.munmap = lambda address, n: (
                unmapped.append(address) or munmap(address, n)
            )
            address = loader._ring._host._address  # type: ignore[union-attr]
            # Kept for good: a CUDA ring's events cannot be freed in a forked child.
            kept = weakref.ref(loader._ring._host)  # type: ignore[union-attr]
            loader.release()  # the parent's ring: nothing of it to free here
            gc.collect()
            got = loader.load(tmp_path / "m.pt", "cpu", **settings)  # on a ring of its own
            same = all(torch.equal(got[name], tensor) for name, tensor in state.items())
            facts = (str(parents) in held, str(parents) in mapped, address in unmapped)
            os.write(report_w, repr((*facts, kept() is not None, same)).encode())
            os.read(done_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(done_r)
    reported = False
    try:
        # A child that went on with the parent's ring would wait forever for its dead threads.
        reported = bool(select.select([report_r], [], [], 60)[0])
        assert reported, "the child's load did not finish"
        report = os.read(report_r, 100).decode()
        # Neither held, mapped nor unmapped by the child, but kept; its own load right.
        assert report == "(False, False, False, True, True)", report or "the child failed"
        loader.release()
        # With the child still running, the parent's file is free: no copy of its lock is left.
        assert parents.name in {p.name for p in ring_files.iterdir()}
        probe = os.open(parents, os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        os.close(done_w)  # the child exits
        if not reported:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(report_r)
        loader.release()
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_fork_while_a_ring_claims_its_file_waits_and_the_child_holds_nothing(
    ring_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    claiming = threading.Event()
    allocate = rings._allocate

    def slow_allocate(fd: int, nbytes: int) -> None:  # the file is open and locked meanwhile
        claiming.set()
        time.sleep(0.5)
        allocate(fd, nbytes)

    monkeypatch.setattr(rings, "_allocate", slow_allocate)
    made: list[hostring.HostRing] = []
    maker = threading.Thread(target=lambda: made.append(hostring.HostRing(6, SLOT_BYTES, False)))
    maker.start()
    claiming.wait()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what it holds, and never returns into pytest
        try:
            held = any(str(ring_files) in path for path in open_paths())
            os.write(report_w, repr(held).encode())
        finally:
            os._exit(0)
    os.close(report_w)
    try:
        assert os.read(report_r, 10) == b"False"  # the fork waited for the claim, then let go
    finally:
        os.waitpid(pid, 0)
        os.close(report_r)
        maker.join()
        for ring in made:
            ring.close()


@pytest.mark.parametrize(
    ("c_loop", "rows", "readers"),
    [(False, False, 3), (True, True, 3), (True, False, 0)],
    ids=["python-loop", "c-loop-rows", "c-loop"],
)
def test_a_ring_starts_its_readers_before_it_prepares_the_slots(
    monkeypatch: pytest.MonkeyPatch, c_loop: bool, rows: bool, readers: int
) -> None:
    """Threads started while slots are faulted in and page-locked start slowly and hold the
    preparation up, so the Python loop's readers are all running before the preparation
    begins: for the Python loop, and for a sharded load's rows; the C loop starts its own."""
    if c_loop and native.LIBRARY is None:
        pytest.skip("the C copy loop was not built (no C compiler at install)")
    monkeypatch.setattr(native, "available", lambda: c_loop)
    readers_at_start: list[int] = []
    real = hostring.HostRing.prepare_all

    def prepare_all(self: hostring.HostRing, *args: Any) -> None:
        names = [thread.name for thread in threading.enumerate()]
        readers_at_start.append(sum(name.startswith("ramstage-fastload_") for name in names))
        real(self, *args)

    monkeypatch.setattr(hostring.HostRing, "prepare_all", prepare_all)
    ring = pipeline.Ring(torch.device("cpu"), threads=3, ring_bytes=6 * SLOT_BYTES, rows=rows)
    try:
        assert readers_at_start == [readers]
    finally:
        ring.close()


def refuse_the_second_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread.start fails for the second reader thread of a ring's pool, inside the pool's
    submit, as where the process may start no more threads (root, which runs the tests, is
    not held to RLIMIT_NPROC, so no limit makes it real here)."""
    real_start = threading.Thread.start
    readers: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("ramstage-fastload_"):
            readers.append(self.name)
            if len(readers) == 2:
                raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)


def test_a_ring_whose_threads_cannot_start_fails_and_frees_its_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the process may start no more threads, creating the ring raises that error, the
    thread already started returns (no_thread_leaks checks), and the ring's mapping is freed."""
    monkeypatch.setattr(native, "available", lambda: False)  # the loop whose threads start here
    real_close = hostring.HostRing.close
    closed: list[hostring.HostRing] = []

    def close(self: hostring.HostRing) -> None:
        closed.append(self)
        real_close(self)

    refuse_the_second_reader(monkeypatch)
    monkeypatch.setattr(hostring.HostRing, "close", close)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        pipeline.Ring(torch.device("cpu"), threads=3, ring_bytes=6 * SLOT_BYTES)
    assert len(closed) == 1


def test_reserving_device_memory_gives_way_where_none_is_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def empty(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "empty", empty)
    fastload._reserve(torch.device("cuda:0"), 1 << 30)  # no error: tensors come one by one


class FakeDriver:
    """The CUDA driver's entry points that the copy stream uses, failing at `fail`: driver
    errors a real GPU does not give on demand. Counts what must stay balanced."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail, self.calls = fail, []
        self.retained = self.pushed = self.streams = 0

    def _result(self, name: str) -> int:
        self.calls.append(name)
        return 999 if name == self.fail else 0

    def cuDeviceGet(self, ordinal: Any, index: int) -> int:
        ordinal._obj.value = index
        return self._result("cuDeviceGet")

    def cuDevicePrimaryCtxRetain(self, context: Any, ordinal: Any) -> int:
        error = self._result("cuDevicePrimaryCtxRetain")
        if not error:
            context._obj.value, self.retained = 0x1000 + ordinal.value, self.retained + 1
        return error

    def cuDevicePrimaryCtxRelease_v2(self, ordinal: Any) -> int:
        self.retained -= 1
        return self._result("cuDevicePrimaryCtxRelease_v2")

    def cuCtxPushCurrent_v2(self, context: Any) -> int:
        error = self._result("cuCtxPushCurrent_v2")
        self.pushed += not error
        return error

    def cuCtxPopCurrent_v2(self, context: Any) -> int:
        self.pushed -= 1
        return self._result("cuCtxPopCurrent_v2")

    def cuStreamCreate(self, handle: Any, flags: int) -> int:
        assert (flags, self.pushed) == (stream.CU_STREAM_NON_BLOCKING, 1)  # in the context
        error = self._result("cuStreamCreate")
        if not error:
            handle._obj.value, self.streams = 0x2000, self.streams + 1
        return error

    def cuStreamDestroy_v2(self, handle: Any) -> int:
        self.streams -= 1
        return self._result("cuStreamDestroy_v2")


def test_the_copy_stream_is_made_in_the_devices_primary_context_and_freed_with_it(caplog):
    driver = FakeDriver()
    made = stream.driver_stream(driver, 1)
    assert made is not None and made[0] == 0x2000
    assert (driver.retained, driver.pushed, driver.streams) == (1, 0, 1)  # kept while it lives
    made[1]()
    assert (driver.retained, driver.streams) == (0, 0)
    driver.fail = "cuStreamDestroy_v2"
    driver.retained, driver.streams = 1, 1
    with caplog.at_level(logging.WARNING, logger="ramstage.fastload"):
        made[1]()
    assert "the copy stream was not destroyed (CUDA driver error 999)" in caplog.text


@pytest.mark.parametrize(
    "fail", ["cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxPushCurrent_v2", "cuStreamCreate"]
)
def test_a_driver_error_gives_no_stream_and_leaves_the_context_as_it_was(fail):
    driver = FakeDriver(fail)
    assert stream.driver_stream(driver, 0) is None  # the ring then takes one of torch's
    assert (driver.retained, driver.pushed, driver.streams) == (0, 0, 0)
