"""The control socket's wire format (newline-delimited JSON, one request per connection) and
the client side of it, which turns socket errors into sentences that name the fix."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from ramstage.errors import NotRunning, PermissionDenied, RamstageError, UsageError, from_wire

VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
COMMANDS = ("status", "stage", "evict", "verify", "reload")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


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
    try:
        message = json.loads(data)
    except ValueError:
        raise UsageError("not a JSON message") from None
    if not isinstance(message, dict):
        raise UsageError("a message is a JSON object")
    return message


def request(path: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> Any:
    """Sends one request and returns its result, or raises the error the daemon sent back."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
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
        sock.sendall(encode({"v": VERSION, "cmd": cmd, **args}))
        try:
            reply = read_message(sock)
        except socket.timeout:
            raise RamstageError(f"no answer from ramstage within {timeout:g}s") from None
        except UsageError as bad:
            # The daemon's own mistake (or its death mid-request), not the user's: exit 1.
            raise RamstageError(
                f"no valid answer from ramstage at {path} ({bad.message}); "
                "see its log (journalctl -u ramstage)"
            ) from None
    finally:
        sock.close()
    if reply.get("ok"):
        return reply.get("result")
    error = reply.get("error") or {}
    raise from_wire(str(error.get("type")), str(error.get("message")))
