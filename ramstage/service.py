"""What systemd hears (sd_notify(3)) and how the daemon logs."""

from __future__ import annotations

import logging
import os
import sys

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


def setup_logging(system: System, debug: bool = False) -> None:
    """One line per event on stderr; under systemd that is the journal, which adds the time."""
    under_journal = "JOURNAL_STREAM" in system.environ
    fmt = "%(levelname)s %(message)s" if under_journal else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if debug else logging.INFO, format=fmt
    )
