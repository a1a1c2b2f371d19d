"""What systemd hears: the sd_notify messages, captured on a NOTIFY_SOCKET datagram socket."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from conftest import wait_for, write_random

from ramstage.errors import ConfigError


class NotifySocket:
    """Plays systemd's side of sd_notify(3): a datagram socket that records every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            self.messages.extend(data.decode().splitlines())

    def index(self, message: str, after: int = -1) -> int:
        """The position of the first line that starts with message, after position `after`."""
        return next(
            i for i, line in enumerate(self.messages) if i > after and line.startswith(message)
        )

    def seen(self, message: str, after: int = -1) -> bool:
        return any(i > after and line.startswith(message) for i, line in enumerate(self.messages))

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_ready_status_watchdog_reload_and_stop(tmp_path, make_daemon, notify):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}])
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    daemon.wait_state("m", "staged")
    ready = wait_for(lambda: notify.seen("READY=1") and notify.index("READY=1"))
    wait_for(lambda: notify.seen("STATUS=1/1 models staged"))
    assert all(line != "STATUS=" for line in notify.messages)
    # Keep-alives come from the loop at half of WatchdogSec=, again and again.
    wait_for(lambda: sum(line == "WATCHDOG=1" for line in notify.messages) >= 3)

    daemon.process.send_signal(signal.SIGHUP)
    reloading = wait_for(lambda: notify.seen("RELOADING=1", ready) and notify.index("RELOADING=1"))
    assert notify.seen("MONOTONIC_USEC=", reloading)
    wait_for(lambda: notify.seen("READY=1", reloading))

    assert daemon.stop(signal.SIGTERM) == 0
    assert notify.seen("STOPPING=1", reloading)


def test_a_refused_reload_still_says_ready_again(tmp_path, make_daemon, notify):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}])
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path)})
    daemon.wait_state("m", "staged")
    daemon.config["models"][0]["name"] = "../x"
    daemon.write_config()
    assert daemon.cli("reload").returncode == 2
    reloading = notify.index("RELOADING=1")
    wait_for(lambda: notify.seen("READY=1", reloading))


def test_no_watchdog_messages_without_watchdog_usec(tmp_path, make_daemon, notify):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}])
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path)})
    daemon.wait_state("m", "staged")
    assert daemon.stop(signal.SIGTERM) == 0
    assert notify.seen("STOPPING=1")
    assert "WATCHDOG=1" not in notify.messages


@pytest.mark.root
def test_ready_staged_waits_for_the_copy_and_extends_the_start_timeout(
    tmp_path, make_daemon, notify
):
    source = write_random(tmp_path / "big.ckpt", 768 << 20)
    daemon = make_daemon([{"name": "big", "source": str(source)}], mount=True, ready="staged")
    # A short watchdog interval makes the loop tick often while the copy runs.
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000"})
    daemon.wait_state("big", "staged", timeout=120)
    ready = wait_for(lambda: notify.seen("READY=1") and notify.index("READY=1"))
    extend = notify.index("EXTEND_TIMEOUT_USEC=")
    assert extend < ready
    assert int(notify.messages[extend].partition("=")[2]) > 0
    assert notify.index("STATUS=0/1 models staged") < ready


def test_ready_links_does_not_wait_for_copies(tmp_path, make_daemon, notify):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}], ready="links")
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path)})
    daemon.wait_state("m", "staged")
    ready = notify.index("READY=1")
    assert notify.index("STATUS=0/1 models staged") < ready
    assert not notify.seen("EXTEND_TIMEOUT_USEC=")


# Files that once crashed the loader (non-string keys, OverflowError, UnicodeDecodeError,
# RecursionError) or took minutes (billion laughs); the first two still name the socket.
CRASHING_CONFIGS = {
    "non-string keys": "store: {{1: 2}}\n3: x\nsocket: {socket}\n",
    "huge size": "store: {{size: {nines}G}}\nsocket: {socket}\n",
    "invalid UTF-8": "models: [{{name: m, source: /ssd/\udcff}}]\n",
    "deep nesting": "[" * 1_000_000,
    "billion laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
}


def wait_reloaded_and_ready(notify: NotifySocket, before: int, context: Callable[[], str]) -> None:
    """Waits for RELOADING=1 after position `before`, then for READY=1 after it."""
    reloading = wait_for(
        lambda: notify.seen("RELOADING=1", before) and notify.index("RELOADING=1", before)
    )
    wait_for(lambda: notify.seen("READY=1", reloading), context=context)


@pytest.mark.parametrize("how", ["sighup", "socket", "cli"])
def test_a_reload_of_any_file_answers_and_says_ready_again(tmp_path, make_daemon, notify, how):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}])
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path)})
    staged = daemon.wait_state("m", "staged")
    good = daemon.config_path.read_text()
    for name, template in CRASHING_CONFIGS.items():
        text = template.format(socket=daemon.socket, nines="9" * 400)
        daemon.config_path.write_bytes(text.encode(errors="surrogateescape"))
        before = len(notify.messages) - 1
        if how == "sighup":
            daemon.process.send_signal(signal.SIGHUP)
        elif how == "socket":
            with pytest.raises(ConfigError):
                daemon.request("reload")
        elif "{socket}" in template:  # else the CLI cannot tell where the daemon listens
            result = daemon.cli("reload")
            assert (result.returncode, result.stderr.count("Traceback")) == (2, 0), name
            assert "ramstage: the config has problems:" in result.stderr
        else:
            continue
        wait_reloaded_and_ready(notify, before, context=lambda: daemon.log())
        assert daemon.process.poll() is None
    daemon.config_path.write_text(good)
    daemon.request("reload")
    assert daemon.model("m")["generation"] == staged["generation"]
    refused = 5 if how != "cli" else 2
    assert daemon.log().count("reload refused, keeping the running config") == refused
