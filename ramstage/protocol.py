"""The control socket's wire format (newline-delimited JSON, one request per connection) and
the client side of it, which turns socket errors into sentences that name the fix and tries
again, with backoff, while the daemon says it is busy."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

from ramstage.errors import (
    Busy,
    NoAnswer,
    NotRunning,
    PermissionDenied,
    RamstageError,
    UsageError,
    from_wire,
)

VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_REQUEST_BYTES = 64 << 10  # what the daemon reads of a request: names and flags, no more
COMMANDS = ("status", "stage", "evict", "verify", "reload")
BUSY_SECONDS = 10.0
FIRST_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 1.0


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except ValueError:
        raise UsageError("not a JSON message") from None
    except RecursionError:  # json nests by recursion: [[[… a thousand deep fits in 2 KiB
        raise UsageError("not a JSON message: nested too deep") from None
    if not isinstance(message, dict):
        raise UsageError("a message is a JSON object")
    return message


def read_message(sock: socket.socket) -> dict[str, Any]:
    """Reads one line, bounded in size; the socket's timeout bounds the time."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE_BYTES:
            raise UsageError(f"message longer than {MAX_MESSAGE_BYTES} bytes")
    return decode(data)


def request(
    path: Path, cmd: str, *, timeout: float = 10.0, busy_seconds: float = BUSY_SECONDS, **args: Any
) -> Any:
    """Sends one request and returns its result, or raises the error the daemon sent back.
    A daemon that turns the connection away (Busy) did nothing, so the request is sent again
    after a growing, jittered pause, for up to busy_seconds; then Busy says so."""
    deadline = time.monotonic() + busy_seconds
    backoff, tries = FIRST_BACKOFF_SECONDS, 0
    while True:
        tries += 1
        try:
            return _request_once(path, cmd, timeout, args)
        except Busy as busy:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Busy(
                    f"ramstage is busy ({busy.message}); gave up after {tries} tries in "
                    f"{busy_seconds:g}s: try again later"
                ) from None
            # Jitter, so that clients turned away together do not all come back together.
            time.sleep(min(left, backoff * random.uniform(0.5, 1.0)))
            backoff = min(2 * backoff, MAX_BACKOFF_SECONDS)


def _request_once(path: Path, cmd: str, timeout: float, args: dict[str, Any]) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(
                f"ramstage is not running: no daemon listening at {path} (systemctl start ramstage)"
            ) from None
        except PermissionError:
            raise PermissionDenied(
                f"cannot connect to {path}: permission denied (run as root or in group ramstage)"
            ) from None
        except BlockingIOError:
            # A socket with a timeout is non-blocking, and connect(2) to a Unix socket whose
            # listen backlog is full then fails with EAGAIN instead of waiting (unix(7)).
            raise Busy(f"its listen queue at {path} is full") from None
        # Turned away before it read the request, the answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(encode({"v": VERSION, "cmd": cmd, **args}))
        try:
            reply = read_message(sock)
        except socket.timeout:
            raise NoAnswer(f"no answer from ramstage within {timeout:g}s") from None
        except (UsageError, ConnectionResetError) as bad:
            # The daemon's own mistake (or its death mid-request), not the user's: exit 1.
            why = bad.message if isinstance(bad, UsageError) else "connection reset"
            raise RamstageError(
                f"no valid answer from ramstage at {path} ({why}); "
                "see its log (journalctl -u ramstage)"
            ) from None
    if reply.get("ok"):
        return reply.get("result")
    error = reply.get("error") or {}
    raise from_wire(str(error.get("type")), str(error.get("message")))
