"""What systemd hears (sd_notify(3)) and how the daemon logs."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import sdnotify

from ramstage.system import System


class Notifier:
    def __init__(self, system: System) -> None:
        self.system = system
        self._notifier = sdnotify.SystemdNotifier()
        usec = system.environ.get("WATCHDOG_USEC")
        watchdog_pid = system.environ.get("WATCHDOG_PID")
        enabled = usec is not None and (watchdog_pid is None or int(watchdog_pid) == os.getpid())
        # systemd expects a keep-alive within WatchdogSec=; sending every half of it is the
        # convention sd_watchdog_enabled(3) recommends.
        self.watchdog_interval = int(usec) / 2e6 if enabled and usec else None
        self._last_watchdog = 0.0
        self._last_status = ""

    def send(self, *lines: str) -> None:
        self._notifier.notify("\n".join(lines))

    def status(self, line: str) -> None:
        if line != self._last_status:
            self._last_status = line
            self.send(f"STATUS={line}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload units match the reload to this message;
        # time.monotonic() is CLOCK_MONOTONIC on Linux, as systemd expects.
        self.send("RELOADING=1", f"MONOTONIC_USEC={int(self.system.monotonic() * 1e6)}")

    def watchdog(self) -> None:
        if self.watchdog_interval is None:
            return
        now = self.system.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = now
            self.send("WATCHDOG=1")


# syslog(3) priorities, which journald reads from a "<N>" prefix on each line (sd-daemon(3)).
SYSLOG_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """Every line carries its priority, so `journalctl -p warning` finds the warnings; a
    message of several lines is several journal entries, each with the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def journal_stream(system: System, stream: TextIO) -> bool:
    """Whether stream is the one systemd connected to the journal: $JOURNAL_STREAM is its
    "device:inode" (systemd.exec(5)); a stderr redirected elsewhere gets no prefixes."""
    expected = system.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except OSError:  # io.UnsupportedOperation too: a stream with no descriptor
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup_logging(system: System, debug: bool = False) -> None:
    """One line per event on stderr; under systemd that is the journal, which adds the time and
    reads each line's priority."""
    handler = logging.StreamHandler(sys.stderr)
    if journal_stream(system, sys.stderr):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
