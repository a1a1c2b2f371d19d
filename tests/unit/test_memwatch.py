"""The memory watcher in-process: its PSI trigger, systemd's pressure channel, the events it
posts."""

from __future__ import annotations

import base64
import queue
import socket
from pathlib import Path

import pytest
from conftest import wait_for

from ramstage.config import MemoryConfig, PsiTrigger
from ramstage.memwatch import PressureWatcher, psi_avg10, unprivileged_trigger_line
from ramstage.model import Pressure
from ramstage.system import System


def test_systemd_socket_channel_gets_the_write_data_and_its_messages_are_events(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "pressure.sock"
    server.bind(str(path))
    server.listen(1)
    events: queue.SimpleQueue[Pressure] = queue.SimpleQueue()
    line = b"some 200000 2000000\0"
    watcher = PressureWatcher(
        MemoryConfig(min_available_bytes=0, resume_available_bytes=0),
        System(
            environ={
                "MEMORY_PRESSURE_WATCH": str(path),
                "MEMORY_PRESSURE_WRITE": base64.b64encode(line).decode(),
            }
        ),
        events.put,
    )
    watcher.start()
    try:
        connection, _ = server.accept()
        assert connection.recv(100) == line
        assert "systemd" in {c.kind for c in watcher.channels.values()}
        connection.sendall(b"x")
        event = events.get(timeout=5)
        assert event.kind == "systemd"
        assert event.available_bytes > 0
        connection.close()  # the peer hanging up is a lost source, not an endless event
        wait_for(lambda: "systemd" not in {c.kind for c in watcher.channels.values()}, 5)
        assert all(e.kind != "systemd" for e in _drain(events))
        server.settimeout(30)
        again, _ = server.accept()  # tried again a few seconds later, and written to again
        assert again.recv(100) == line
        again.close()
    finally:
        watcher.stop()
        server.close()


def test_dev_null_turns_the_systemd_channel_off():
    watcher = PressureWatcher(
        MemoryConfig(min_available_bytes=0, resume_available_bytes=0),
        System(environ={"MEMORY_PRESSURE_WATCH": "/dev/null"}),
        lambda event: None,
    )
    watcher.start()
    try:
        assert "systemd" not in {c.kind for c in watcher.channels.values()}
    finally:
        watcher.stop()


@pytest.mark.root
def test_the_system_wide_psi_trigger_is_armed_and_avg10_read():
    watcher = PressureWatcher(
        MemoryConfig(min_available_bytes=0, resume_available_bytes=0),
        System(environ={}),
        lambda event: None,
    )
    watcher.start()
    try:
        assert [c.path for c in watcher.channels.values() if c.kind == "psi"] == [
            Path("/proc/pressure/memory")
        ]
    finally:
        watcher.stop()
    assert psi_avg10(System()) is not None
    assert psi_avg10(System(proc=Path("/nonexistent"))) is None


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        (PsiTrigger("some", 0.15, 1.0), "some 300000 2000000"),
        (PsiTrigger("full", 0.1, 2.0), "full 100000 2000000"),
        (PsiTrigger("some", 0.5, 3.0), "some 666667 4000000"),
        (PsiTrigger("some", 1.0, 10.0), "some 1000000 10000000"),
    ],
)
def test_unprivileged_trigger_keeps_the_stall_share_on_a_2s_multiple_window(trigger, expected):
    assert unprivileged_trigger_line(trigger) == expected


def _drain(events: queue.SimpleQueue[Pressure]) -> list[Pressure]:
    drained = []
    while not events.empty():
        drained.append(events.get())
    return drained
