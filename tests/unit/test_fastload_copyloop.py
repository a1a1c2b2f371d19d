"""The copy loop in C (copyloop.c through native.py): the ring's reads and copies without Python.

The CPU-target pipeline tests (test_fastload.py) run every checkpoint through it and through the
Python loop. Here: its CUDA side, driven by a fake driver of ctypes callbacks (a real GPU does
not fail on demand, and CI has none), and its read errors. scripts/test.sh sets
RAMSTAGE_TEST_COPYLOOP, so that a loop that was not built fails there instead of skipping.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ramstage.fastload import native, pipeline
from ramstage.fastload.pipeline import MAX_GAP_BYTES, Segment, plan_chunks

pytestmark = pytest.mark.torch

SLOTS, SLOT_BYTES = 4, 4096
STATUS = ctypes.c_int


@pytest.fixture(autouse=True)
def built() -> None:
    if native.LIBRARY is None:
        if os.environ.get("RAMSTAGE_TEST_COPYLOOP"):
            pytest.fail("the C copy loop was not built (setup.py needs a C compiler)")
        pytest.skip("the C copy loop was not built (no C compiler at install)")


class FakeDriver:
    """The driver calls the loop makes, as ctypes callbacks: copies are memmoves into host
    memory, events count their records and waits, and the streams and contexts it is given are
    kept for the test to check (an assert in a callback would not reach pytest). Fails the call
    named `fail` with 700."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.records: dict[int, int] = {}
        self.waits: dict[int, int] = {}
        self.contexts: list[int] = []
        self.streams: set[int] = set()
        self.pushed: list[int] = []
        self.used: list[tuple[int, int]] = []  # (slot copied from, slots ready then)
        self.calls: list[Any] = []  # (offset in the slot, target, nbytes) per copy, "record"
        self.copy_seconds = 0.0
        self.slots = (ctypes.c_char * (SLOTS * SLOT_BYTES))()
        self.events = (ctypes.c_void_p * SLOTS)(*range(0x100, 0x100 + SLOTS))
        self._calls = [
            ctypes.CFUNCTYPE(
                STATUS, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
            )(self.copy),
            ctypes.CFUNCTYPE(STATUS, ctypes.c_void_p, ctypes.c_void_p)(self.record),
            ctypes.CFUNCTYPE(STATUS, ctypes.c_void_p)(self.synchronize),
            ctypes.CFUNCTYPE(STATUS, ctypes.c_void_p)(self.set_context),
            ctypes.CFUNCTYPE(STATUS, ctypes.c_void_p)(self.push),
            ctypes.CFUNCTYPE(STATUS, ctypes.POINTER(ctypes.c_void_p))(self.pop),
        ]

    def loop(self) -> native.CopyLoop:
        calls = [ctypes.cast(call, ctypes.c_void_p) for call in self._calls]
        events = ctypes.cast(self.events, ctypes.c_void_p)
        cuda = native._Cuda(*calls, ctypes.c_void_p(0xC0), ctypes.c_void_p(0x5), events)
        address = ctypes.addressof(self.slots)
        loop = native.CopyLoop([address + i * SLOT_BYTES for i in range(SLOTS)], SLOT_BYTES, cuda)
        loop.ready.value = SLOTS
        self._ready = loop.ready
        return loop

    def _status(self, name: str) -> int:
        return 700 if name == self.fail else 0

    def copy(self, target: int, source: int, nbytes: int, stream: int) -> int:
        self.streams.add(stream)
        slot, offset = divmod(source - ctypes.addressof(self.slots), SLOT_BYTES)
        self.used.append((slot, self._ready.value))
        self.calls.append((offset, target, nbytes))
        ctypes.memmove(target, source, nbytes)
        time.sleep(self.copy_seconds)
        return self._status("copy")

    def record(self, event: int, stream: int) -> int:
        self.streams.add(stream)
        if self.fail == "record":
            return 700
        self.records[event] = self.records.get(event, 0) + 1
        self.calls.append("record")
        return 0

    def synchronize(self, event: int) -> int:
        self.waits[event] = self.waits.get(event, 0) + 1
        return self._status("synchronize")

    def set_context(self, context: int) -> int:
        self.contexts.append(context)
        return self._status("set_context")

    def push(self, context: int) -> int:
        if self.fail == "push":
            return 700
        self.pushed.append(context)
        return 0

    def pop(self, context: Any) -> int:
        self.pushed.pop()
        return 0


@pytest.fixture
def data(tmp_path: Path) -> Iterator[tuple[bytes, int, Path]]:
    payload = os.urandom(SLOTS * SLOT_BYTES * 5 + 123)
    path = tmp_path / "data"
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    yield payload, fd, path
    os.close(fd)


def copy(loop: native.CopyLoop, path: Path, fd: int, nbytes: int, threads: int = 3) -> Any:
    """The file's first nbytes through the loop into a tensor, in pieces of 1000 bytes."""
    out = torch.zeros(nbytes, dtype=torch.uint8)
    segments = [
        Segment(str(path), at, min(1000, nbytes - at), out, at) for at in range(0, nbytes, 1000)
    ]
    run(loop, segments, {str(path): fd}, threads)
    return out


def run(loop: native.CopyLoop, segments: list[Segment], fds: dict[str, int], threads: int) -> None:
    loop.run(segments, fds, threads, MAX_GAP_BYTES)


def test_on_a_gpu_every_recorded_copy_is_waited_for_and_the_callers_context_stays(
    data: tuple[bytes, int, Path],
) -> None:
    payload, fd, path = data
    driver = FakeDriver()
    out = copy(driver.loop(), path, fd, len(payload))
    assert bytes(out.numpy()) == payload
    assert sum(driver.records.values()) == -(-len(payload) // SLOT_BYTES)  # one per chunk
    assert driver.waits == driver.records  # before the slot's next read, or at the end
    assert driver.streams == {0x5}
    assert driver.contexts == [0xC0, 0xC0]  # made current in each started thread
    assert driver.pushed == []  # pushed for the caller, who works too, and popped


def test_the_c_loop_cuts_its_reads_as_the_python_plan_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neighbours share a read, small gaps are read along, long segments are split, and a
    large gap, another file, an overlap or the slot's end starts a new read (segments sorted
    by file and offset): one thread issues, read by read, the copies of Python's plan, each
    read's ended by its event."""
    max_gap = 64  # below a slot, so that a gap alone starts a new read
    monkeypatch.setattr(pipeline, "MAX_GAP_BYTES", max_gap)
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(os.urandom(20000))
    second.write_bytes(os.urandom(30000))
    layout = [  # (file, file offset, nbytes)
        (first, 0, 100),
        (first, 164, 250),  # a gap of max_gap: read along
        (first, 414, 9000),  # longer than a slot: split
        (first, 9000, 20),  # before the last one's end (a storage twice): a new read
        (first, 9084, 10),  # a gap of max_gap: read along
        (first, 9194, 10),  # a gap of 100: a new read
        (first, 12000, 4090),  # a new read, 6 bytes short of a slot
        (first, 16096, 10),  # a small gap, but at the slot's end: a new read
        (second, 16106, 100),  # where the last ended, in another file: a new read
        (second, 16206 + SLOT_BYTES, 100),  # a gap a slot long: a new read
    ]
    out = torch.zeros(sum(n for _, _, n in layout), dtype=torch.uint8)
    targets = itertools.accumulate((n for _, _, n in layout), initial=0)
    segments = [Segment(str(f), at, n, out, to) for (f, at, n), to in zip(layout, targets)]
    fds = {str(f): os.open(f, os.O_RDONLY) for f in (first, second)}
    try:
        driver = FakeDriver()
        driver.loop().run(segments, fds, 1, max_gap)
    finally:
        for fd in fds.values():
            os.close(fd)
    chunks = plan_chunks(segments, SLOT_BYTES)
    assert len(chunks) == 9  # the long one in three
    base = out.data_ptr()
    plan = [[(p.chunk_offset, base + p.target_offset, p.nbytes) for p in c.pieces] for c in chunks]
    reads: list[list[Any]] = [[]]  # the copies between one event and the next
    for call in driver.calls:
        if call == "record":
            reads.append([])
        else:
            reads[-1].append(call)
    assert reads == [*plan, []]
    assert bytes(out.numpy()) == b"".join(f.read_bytes()[at : at + n] for f, at, n in layout)


@pytest.mark.parametrize("fail", ["copy", "record", "synchronize", "set_context", "push"])
def test_a_driver_error_stops_the_loop_and_says_which(
    data: tuple[bytes, int, Path], fail: str
) -> None:
    payload, fd, path = data
    driver = FakeDriver(fail)
    with pytest.raises(RuntimeError, match="CUDA driver error 700 while copying to the device"):
        copy(driver.loop(), path, fd, len(payload))
    assert driver.pushed == []
    if fail != "synchronize":
        assert all(driver.waits.get(e, 0) == n for e, n in driver.records.items())


def test_a_file_shorter_than_its_plan_says_where_it_ends(data: tuple[bytes, int, Path]) -> None:
    payload, fd, path = data
    slot = ctypes.create_string_buffer(SLOT_BYTES)
    loop = native.CopyLoop([ctypes.addressof(slot)], SLOT_BYTES)
    loop.ready.value = 1
    with pytest.raises(EOFError, match=f"file ends at byte {len(payload)}, before the data"):
        copy(loop, path, fd, len(payload) + 10)


def test_a_read_error_gives_the_systems_error(tmp_path: Path) -> None:
    slot = ctypes.create_string_buffer(SLOT_BYTES)
    loop = native.CopyLoop([ctypes.addressof(slot)], SLOT_BYTES)
    loop.ready.value = 1
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: read(2) gives EISDIR
    try:
        with pytest.raises(IsADirectoryError):
            copy(loop, tmp_path, fd, 100)
    finally:
        os.close(fd)


def test_a_ring_copies_with_the_c_loop_and_gathered_rows_with_the_python_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_fastload import assert_same, write_safetensors

    from ramstage import fastload

    ran: list[int] = []
    real = native.CopyLoop.run

    def run(self: native.CopyLoop, segments: Any, *args: Any, **options: Any) -> None:
        ran.append(len(segments))
        real(self, segments, *args, **options)

    def python_threads() -> int:
        return sum(t.name.startswith("ramstage-fastload_") for t in threading.enumerate())

    monkeypatch.setattr(native.CopyLoop, "run", run)
    want = {"w": torch.randn(64, 48), "b": torch.randn(48)}
    path = write_safetensors(tmp_path / "m.safetensors", want)
    loader = fastload.Loader(pipeline_on_cpu=True)
    before = python_threads()
    try:
        assert_same(loader.load(path, "cpu", threads=2, ring_bytes=4 * SLOT_BYTES), want)
        assert ran == [2]  # both tensors
        assert python_threads() == before  # the C loop's own threads, started and joined
        rows = fastload.Shard(1, 2, dims={"w": 1, "*": 0})
        got = loader.load(path, "cpu", threads=2, ring_bytes=4 * SLOT_BYTES, shard=rows)
        assert torch.equal(got["w"], want["w"][:, 24:]) and ran == [2]
        assert python_threads() == before + 2  # the ring's pool, started for the rows
    finally:
        loader.release()


def test_a_load_whose_threads_could_not_start_leaves_the_next_a_fresh_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool that failed to start one of its threads miscounts its idle ones, and a second
    start on it waited forever, holding the loader's lock: the load with gathered rows that
    could not start the Python loop's threads fails, and the next one starts a fresh pool."""
    from conftest import wait_for
    from test_fastload import write_safetensors
    from test_fastload_ring import refuse_the_second_reader

    from ramstage import fastload

    want = {"w": torch.randn(64, 48), "b": torch.randn(48)}
    path = write_safetensors(tmp_path / "m.safetensors", want)
    rows = fastload.Shard(1, 2, dims={"w": 1, "*": 0})
    options: dict[str, Any] = {"threads": 2, "ring_bytes": 4 * SLOT_BYTES}
    loader = fastload.Loader(pipeline_on_cpu=True)
    loader.load(path, "cpu", **options)  # the ring, made for a whole load: no Python threads
    refuse_the_second_reader(monkeypatch)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        loader.load(path, "cpu", shard=rows, **options)
    readers = [t for t in threading.enumerate() if t.name.startswith("ramstage-fastload_")]
    wait_for(lambda: not any(t.is_alive() for t in readers), timeout=10)  # the pool went
    got: list[dict[str, Any]] = []
    retry = threading.Thread(
        target=lambda: got.append(loader.load(path, "cpu", shard=rows, **options)), daemon=True
    )
    retry.start()
    retry.join(timeout=30)
    assert not retry.is_alive(), "the load after a failed start waits forever"
    loader.release()
    assert torch.equal(got[0]["w"], want["w"][:, 24:])


def test_slots_handed_over_during_a_run_are_used_as_they_come(
    data: tuple[bytes, int, Path],
) -> None:
    """A fresh process's first load starts before the ring is prepared: the loop starts with
    no slot, and uses each as `ready` counts it."""
    payload, fd, path = data
    driver = FakeDriver()
    driver.copy_seconds = 0.002  # pieces of 1000 bytes: 4-5 copies a chunk
    loop = driver.loop()
    loop.ready.value = 0

    def hand_over() -> None:
        for count in range(1, SLOTS + 1):
            time.sleep(0.01)
            loop.ready.value = count

    preparing = threading.Thread(target=hand_over)
    preparing.start()
    try:
        out = copy(loop, path, fd, len(payload))
    finally:
        preparing.join()
    assert bytes(out.numpy()) == payload
    assert all(slot < ready for slot, ready in driver.used)
    assert len({slot for slot, _ in driver.used}) > 1  # the later ones too, once ready


class FakeContextDriver:
    """The driver calls that make and free the C loop's events, in the copy stream's context."""

    def __init__(self, fail_at: int = -1) -> None:
        self.fail_at, self.made, self.current = fail_at, set(), [0xAA]

    def cuStreamGetCtx(self, stream: Any, context: Any) -> int:
        assert stream.value == 0x5
        context._obj.value = 0xC0
        return 0

    def cuCtxPushCurrent_v2(self, context: Any) -> int:
        self.current.append(context.value)
        return 0

    def cuCtxPopCurrent_v2(self, context: Any) -> int:
        self.current.pop()
        return 0

    def cuEventCreate(self, event: Any, flags: int) -> int:
        if len(self.made) == self.fail_at or self.current[-1] != 0xC0 or flags != 2:
            return 1
        event._obj.value = 0x100 + len(self.made)
        self.made.add(event._obj.value)
        return 0

    def cuEventDestroy_v2(self, event: Any) -> int:
        assert self.current[-1] == 0xC0
        self.made.remove(event.value)
        return 0


def test_the_events_are_made_in_the_streams_context_and_freed_there() -> None:
    driver = FakeContextDriver()
    made = native.stream_context_and_events(driver, ctypes.c_void_p(0x5), SLOTS)
    assert made is not None
    context, events, free = made
    assert context.value == 0xC0 and list(events) == [0x100 + i for i in range(SLOTS)]
    assert driver.current == [0xAA]  # the caller's context current again
    free()
    assert driver.made == set() and driver.current == [0xAA]


def test_an_event_the_driver_refuses_frees_those_made_and_gives_no_loop() -> None:
    driver = FakeContextDriver(fail_at=2)
    assert native.stream_context_and_events(driver, ctypes.c_void_p(0x5), SLOTS) is None
    assert driver.made == set() and driver.current == [0xAA]
