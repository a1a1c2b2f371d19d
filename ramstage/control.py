"""The control socket server: a thread that accepts requests and hands them to a handler.

Anyone may ask for status; stage, evict, verify and reload need uid 0 or the group ramstage,
checked with SO_PEERCRED and SO_PEERGROUPS (socket(7)) as of connect(2).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ramstage.errors import PermissionDenied, RamstageError, UsageError
from ramstage.protocol import COMMANDS, VERSION, encode, read_message

log = logging.getLogger(__name__)
READ_TIMEOUT_SECONDS = 5.0
MAX_CLIENTS = 16
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
ADMIN_GROUP = "ramstage"


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gids: frozenset[int]

    def is_admin(self) -> bool:
        if self.uid == 0:
            return True
        try:
            return grp.getgrnam(ADMIN_GROUP).gr_gid in self.gids
        except KeyError:
            return False


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    gids = {gid}
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        pass
    return Peer(pid, uid, frozenset(gids))


Handler = Callable[[str, dict[str, Any]], Any]


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path, self.handler = path, handler
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a daemon that was killed
        # Anyone may ask for status, so the socket is 0666; mutating commands are checked per
        # request. The umask makes bind(2) create it with that mode at once, with no chmod race.
        old_umask = os.umask(0o111)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old_umask)
        self._sock.listen(MAX_CLIENTS)
        self._thread = threading.Thread(target=self._serve, name="ramstage-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                conn.sendall(encode(_error(RamstageError("too many clients; try again"))))
                conn.close()
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(READ_TIMEOUT_SECONDS)
                try:
                    reply = {"ok": True, "result": self._dispatch(conn)}
                except RamstageError as error:
                    reply = _error(error)
                except socket.timeout:
                    return
                except Exception as error:  # a bug must not take the server down
                    log.exception("control request failed")
                    reply = _error(RamstageError(f"internal error: {error}"))
                conn.settimeout(READ_TIMEOUT_SECONDS)
                conn.sendall(encode(reply))
        except OSError:
            pass  # the client went away
        finally:
            self._slots.release()

    def _dispatch(self, conn: socket.socket) -> Any:
        message = read_message(conn)
        if message.get("v") != VERSION:
            raise UsageError(
                f"unsupported protocol version {message.get('v')!r}; expected {VERSION}"
            )
        cmd = message.pop("cmd", None)
        message.pop("v")
        if cmd not in COMMANDS:
            raise UsageError(f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
        peer = peer_of(conn)
        if cmd != "status" and not peer.is_admin():
            raise PermissionDenied(f"{cmd} needs root or membership of the group {ADMIN_GROUP}")
        conn.settimeout(None)  # the handler bounds its own wait
        return self.handler(cmd, message)


def _error(error: RamstageError) -> dict[str, Any]:
    return {"ok": False, "error": {"type": error.wire_type, "message": error.message}}
