"""Watches memory and puts `Pressure` events on the daemon's queue; it decides nothing else.

Three sources, one thread blocked in poll(2):
- a system-wide PSI trigger on /proc/pressure/memory (psi.rst: write "some|full STALL WINDOW",
  then POLLPRI at most once per window while stalls exceed the threshold; POLLERR: gone, reopen);
- systemd's pressure channel, $MEMORY_PRESSURE_WATCH / $MEMORY_PRESSURE_WRITE (docs/PRESSURE.md:
  a PSI file, a FIFO or an AF_UNIX socket; "/dev/null" turns it off). It watches our own cgroup,
  which is where the tmpfs pages we wrote are charged; the system-wide trigger sees everyone
  else's stalls, which our tmpfs causes too;
- MemAvailable, read at every wake-up and at least every CHECK_INTERVAL_SECONDS, because PSI
  says nothing until reclaim already stalls, and a machine without swap can fall from plenty to
  the OOM killer without much stalling.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ramstage import units
from ramstage.config import MemoryConfig, PsiTrigger
from ramstage.model import Pressure
from ramstage.system import System

log = logging.getLogger(__name__)
CHECK_INTERVAL_SECONDS = 0.25
REOPEN_INTERVAL_SECONDS = 5.0  # a lost source is tried again this often, not in a busy loop
_FAILED = select.POLLERR | select.POLLHUP | select.POLLNVAL


@dataclass
class _Channel:
    kind: str
    path: Path
    fd: int
    mask: int  # POLLPRI on a PSI file; POLLIN on a FIFO or socket, whose data is discarded
    reopen: Callable[[], _Channel]


def psi_avg10(system: System) -> float | None:
    """The share of the last 10 s in which some task stalled on memory, in percent."""
    try:
        text = (system.proc / "pressure/memory").read_text()
    except OSError:
        return None  # a kernel without CONFIG_PSI, or booted with psi=0
    for line in text.splitlines():
        kind, _, fields = line.partition(" ")
        if kind == "some":
            return float(dict(f.split("=") for f in fields.split())["avg10"])
    return None


def unprivileged_trigger_line(psi: PsiTrigger) -> str:
    """The trigger with its window rounded up to a multiple of 2 s and its stall scaled alike:
    without CAP_SYS_RESOURCE the kernel (6.5+) accepts only such windows (psi.rst)."""
    window = max(2, math.ceil(psi.window_seconds / 2) * 2)
    stall = psi.stall_seconds * window / psi.window_seconds
    return PsiTrigger(psi.kind, stall, window).trigger_line()


def open_psi_trigger(path: Path, trigger_line: str) -> _Channel:
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # psi_write() turns the last byte it was given into the terminating NUL, so the line
        # carries its own (psi.rst's example writes strlen + 1 bytes).
        os.write(fd, trigger_line.encode() + b"\0")
    except OSError:
        os.close(fd)
        raise
    return _Channel("psi", path, fd, select.POLLPRI, lambda: open_psi_trigger(path, trigger_line))


def open_systemd_watch(path: Path, data: bytes) -> _Channel:
    """Opens $MEMORY_PRESSURE_WATCH as docs/PRESSURE.md says, by the kind of inode it is."""

    def reopen() -> _Channel:
        return open_systemd_watch(path, data)

    mode = os.stat(path).st_mode
    if stat.S_ISSOCK(mode):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            sock.sendall(data)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return _Channel("systemd", path, sock.detach(), select.POLLIN, reopen)
    if stat.S_ISFIFO(mode):
        # O_RDWR keeps a writer on the FIFO (fifo(7), Linux), so poll() does not report POLLHUP
        # in a loop once the sender closes. $MEMORY_PRESSURE_WRITE is not written into it: we
        # are the reader, and would only read our own bytes back as a false event.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return _Channel("systemd", path, fd, select.POLLIN, reopen)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if data:
            os.write(fd, data)
    except OSError:
        os.close(fd)
        raise
    return _Channel("systemd", path, fd, select.POLLPRI, reopen)


class PressureWatcher:
    def __init__(
        self,
        memory: MemoryConfig,
        system: System,
        post: Callable[[Pressure], None],
    ) -> None:
        self.memory, self.system, self.post = memory, system, post
        self.channels: dict[int, _Channel] = {}
        self.psi_trigger: str | None = None  # the trigger the kernel took, if any
        self._lost: list[_Channel] = []
        self._last_reopen = 0.0
        self._poller = select.poll()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller.register(self._wake_read, select.POLLIN)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ramstage-memory", daemon=True)

    def start(self) -> None:
        self._open_sources()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        os.write(self._wake_write, b"\0")
        self._thread.join(timeout=5)
        for channel in list(self.channels.values()):
            self._drop(channel)
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _open_sources(self) -> None:
        psi_path = self.system.proc / "pressure/memory"
        lines = [self.memory.psi.trigger_line(), unprivileged_trigger_line(self.memory.psi)]
        for number, line in enumerate(dict.fromkeys(lines)):
            try:
                self._add(open_psi_trigger(psi_path, line))
                self.psi_trigger = line
                if number:
                    log.warning(
                        "PSI trigger %r refused (no CAP_SYS_RESOURCE?); using %r", lines[0], line
                    )
                break
            except OSError as error:
                failure = error
        else:
            log.warning(
                "no PSI trigger on %s (%s); watching MemAvailable every %.2fs only",
                psi_path,
                failure,
                CHECK_INTERVAL_SECONDS,
            )
        watch = self.system.environ.get("MEMORY_PRESSURE_WATCH")
        if watch and watch != "/dev/null":
            try:
                data = base64.b64decode(
                    self.system.environ.get("MEMORY_PRESSURE_WRITE", ""), validate=True
                )
                self._add(open_systemd_watch(Path(watch), data))
            except (OSError, binascii.Error) as error:
                log.warning("cannot watch $MEMORY_PRESSURE_WATCH=%s: %s", watch, error)
        log.info(
            "watching memory: %s; MemAvailable every %.2fs against floor %s, resume %s,"
            " cooldown %.1fs",
            ", ".join(f"{c.kind} {c.path}" for c in self.channels.values()) or "no PSI",
            CHECK_INTERVAL_SECONDS,
            units.size(self.memory.min_available_bytes),
            units.size(self.memory.resume_available_bytes),
            self.memory.effective_cooldown_seconds,
        )

    def _add(self, channel: _Channel) -> None:
        self.channels[channel.fd] = channel
        self._poller.register(channel.fd, channel.mask)

    def _drop(self, channel: _Channel) -> None:
        self._poller.unregister(channel.fd)
        del self.channels[channel.fd]
        os.close(channel.fd)

    def _run(self) -> None:
        log.info("memory watcher running as thread %d", threading.get_native_id())
        while not self._stopping.is_set():
            for fd, flags in self._poller.poll(CHECK_INTERVAL_SECONDS * 1000):
                channel = self.channels.get(fd)
                if channel is not None:
                    self._ready(channel, flags)
            available = self.system.available_bytes()
            if available < self.memory.min_available_bytes:
                self.post(Pressure("floor", available))
            if self._lost and self.system.monotonic() - self._last_reopen > REOPEN_INTERVAL_SECONDS:
                self._reopen_lost()

    def _ready(self, channel: _Channel, flags: int) -> None:
        event, ended = bool(flags & channel.mask), False
        if event and channel.mask == select.POLLIN:
            event, ended = _discard(channel.fd)
        if event:
            self.post(Pressure(channel.kind, self.system.available_bytes()))
        if ended or flags & _FAILED:
            # PSI: the trigger's source is gone (psi.rst); a socket: the peer hung up.
            log.warning("lost the %s pressure source %s", channel.kind, channel.path)
            self._last_reopen = self.system.monotonic()
            self._drop(channel)
            self._lost.append(channel)

    def _reopen_lost(self) -> None:
        self._last_reopen = self.system.monotonic()
        lost, self._lost = self._lost, []
        for channel in lost:
            try:
                self._add(channel.reopen())
                log.info("reopened the %s pressure source %s", channel.kind, channel.path)
            except OSError:
                self._lost.append(channel)


def _discard(fd: int) -> tuple[bool, bool]:
    """Reads and drops what is queued (any data is an event): (got data, the other end closed)."""
    got = False
    try:
        while os.read(fd, 4096):
            got = True
        return got, True
    except BlockingIOError:
        return got, False
