"""The copy loop in C (copyloop.c through native.py): the ring's reads and copies without Python.

The CPU-target pipeline tests (test_fastload.py) run every checkpoint through it and through the
Python loop. Here: its CUDA side, driven by a fake driver of ctypes callbacks (a real GPU does
not fail on demand, and CI has none), and its read errors. scripts/test.sh sets
RAMSTAGE_TEST_COPYLOOP, so that a loop that was not built fails there instead of skipping.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ramstage.fastload import native
from ramstage.fastload.pipeline import Segment, plan_reads

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
    memory, events count their records and waits. Fails the call named `fail` with 700."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.records: dict[int, int] = {}
        self.waits: dict[int, int] = {}
        self.contexts: list[int] = []
        self.pushed = 0
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
        loop = native.CopyLoop([address + i * SLOT_BYTES for i in range(SLOTS)], cuda)
        loop.ready.value = SLOTS
        return loop

    def _status(self, name: str) -> int:
        return 700 if name == self.fail else 0

    def copy(self, target: int, source: int, nbytes: int, stream: int) -> int:
        assert stream == 0x5
        ctypes.memmove(target, source, nbytes)
        return self._status("copy")

    def record(self, event: int, stream: int) -> int:
        assert stream == 0x5
        if self.fail == "record":
            return 700
        self.records[event] = self.records.get(event, 0) + 1
        return 0

    def synchronize(self, event: int) -> int:
        self.waits[event] = self.waits.get(event, 0) + 1
        return self._status("synchronize")

    def set_context(self, context: int) -> int:
        self.contexts.append(context)
        return self._status("set_context")

    def push(self, context: int) -> int:
        assert context == 0xC0
        if self.fail == "push":
            return 700
        self.pushed += 1
        return 0

    def pop(self, context: Any) -> int:
        self.pushed -= 1
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
    loop.run(plan_reads(segments, SLOT_BYTES), {str(path): fd}, threads)
    return out


def test_on_a_gpu_every_recorded_copy_is_waited_for_and_the_callers_context_stays(
    data: tuple[bytes, int, Path],
) -> None:
    payload, fd, path = data
    driver = FakeDriver()
    out = copy(driver.loop(), path, fd, len(payload))
    assert bytes(out.numpy()) == payload
    assert sum(driver.records.values()) == -(-len(payload) // SLOT_BYTES)  # one per chunk
    assert driver.waits == driver.records  # before the slot's next read, or at the end
    assert set(driver.contexts) == {0xC0} and len(driver.contexts) == 3  # each thread's
    assert driver.pushed == 0  # the caller's own context back


@pytest.mark.parametrize("fail", ["copy", "record", "synchronize", "set_context", "push"])
def test_a_driver_error_stops_the_loop_and_says_which(
    data: tuple[bytes, int, Path], fail: str
) -> None:
    payload, fd, path = data
    driver = FakeDriver(fail)
    with pytest.raises(RuntimeError, match="CUDA driver error 700 while copying to the device"):
        copy(driver.loop(), path, fd, len(payload))
    assert driver.pushed == 0
    if fail != "synchronize":
        assert all(driver.waits.get(e, 0) == n for e, n in driver.records.items())


def test_a_file_shorter_than_its_plan_says_where_it_ends(data: tuple[bytes, int, Path]) -> None:
    payload, fd, path = data
    slot = ctypes.create_string_buffer(SLOT_BYTES)
    loop = native.CopyLoop([ctypes.addressof(slot)])
    loop.ready.value = 1
    with pytest.raises(EOFError, match=f"file ends at byte {len(payload)}, before the data"):
        copy(loop, path, fd, len(payload) + 10)


def test_a_read_error_gives_the_systems_error(tmp_path: Path) -> None:
    slot = ctypes.create_string_buffer(SLOT_BYTES)
    loop = native.CopyLoop([ctypes.addressof(slot)])
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

    def run(self: native.CopyLoop, chunks: Any, fds: Any, threads: int) -> None:
        ran.append(len(chunks))
        real(self, chunks, fds, threads)

    monkeypatch.setattr(native.CopyLoop, "run", run)
    want = {"w": torch.randn(64, 48), "b": torch.randn(48)}
    path = write_safetensors(tmp_path / "m.safetensors", want)
    loader = fastload.Loader(pipeline_on_cpu=True)
    try:
        assert_same(loader.load(path, "cpu", threads=2, ring_bytes=4 * SLOT_BYTES), want)
        assert ran == [4]  # 12480 bytes in reads of 4 KiB
        rows = fastload.Shard(1, 2, dims={"w": 1, "*": 0})
        got = loader.load(path, "cpu", threads=2, ring_bytes=4 * SLOT_BYTES, shard=rows)
        assert torch.equal(got["w"], want["w"][:, 24:]) and ran == [4]
    finally:
        loader.release()
