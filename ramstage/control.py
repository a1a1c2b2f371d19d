"""The control socket server.

One thread does all the socket work, non-blocking (selectors), so a client that connects and
then sends or reads slowly holds only its own connection, and only until its deadline: the
whole request must arrive within REQUEST_SECONDS of accept, the whole answer be taken within
ANSWER_SECONDS. Requests themselves run in other threads.

Who asks is read at accept, with SO_PEERCRED and SO_PEERGROUPS (socket(7): the credentials as
of connect(2)), before the connection counts against anything:
- root and the group ramstage (admins) have a budget of connections of their own and a thread
  per request, so no other user can crowd them out;
- every other uid may hold CONNECTIONS_PER_UID connections (all of them together
  PUBLIC_CONNECTIONS); more are told Busy at once, and clients try again later. Their requests
  (status is all they may ask) run one at a time, taking turns between uids, with rests that
  keep them under PUBLIC_SHARE of a core however often they ask: each status walks /proc.
  Identical requests waiting together get one answer.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Callable

from ramstage.errors import Busy, PermissionDenied, RamstageError, UsageError
from ramstage.peers import ADMIN_GROUP, AdminGroup, Peer, Turns, peer_of
from ramstage.protocol import COMMANDS, MAX_REQUEST_BYTES, VERSION, decode, encode

log = logging.getLogger(__name__)
REQUEST_SECONDS = 5.0
ANSWER_SECONDS = 10.0
BACKLOG = 1024  # the kernel caps it at net.core.somaxconn; a full backlog is EAGAIN to clients
ADMIN_CONNECTIONS = 64
CONNECTIONS_PER_UID = 8
PUBLIC_CONNECTIONS = 128
PUBLIC_SHARE = 0.05
MAX_REST_SECONDS = 2.0
PUBLIC_WAIT_SECONDS = 10.0  # the client's default timeout: after that nobody waits for it
ACCEPTS_PER_ROUND = 64  # then reads and writes get their turn

Handler = Callable[[str, dict[str, Any]], Any]


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Peer
    admin: bool
    deadline: float | None
    inbox: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None
    closed: bool = False


_ACCEPT, _WAKE = "accept", "wake"


def _refuse_if_answered(path: Path) -> None:
    """A socket that accepts a connection belongs to a live daemon (one from before the lock
    files, say): taking it over would cut that daemon off from every client."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # ECONNREFUSED: nobody listens, the file is a dead daemon's
    raise RamstageError(f"another process listens on {path}; stop it or choose another socket")


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path, self.handler = path, handler
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            _refuse_if_answered(path)
            path.unlink()  # left by a daemon that was killed
        # Anyone may ask for status, so the socket is 0666; mutating commands are checked per
        # request. The umask makes bind(2) create it with that mode at once, with no chmod race.
        old_umask = os.umask(0o111)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old_umask)
        self._sock.listen(BACKLOG)
        self._sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._answers: SimpleQueue[tuple[_Connection, bytes]] = SimpleQueue()
        self._deadlines: list[tuple[float, int, _Connection]] = []
        self._order = itertools.count()
        self._admins = AdminGroup()
        self._admin_open = 0
        self._public_open: Counter[int] = Counter()
        self._turns: Turns[tuple[float, _Connection, bytes]] = Turns()
        self._closing = threading.Event()
        self._io = threading.Thread(target=self._serve, name="ramstage-control", daemon=True)
        self._public = threading.Thread(
            target=self._serve_public, name="ramstage-control-public", daemon=True
        )

    def start(self) -> None:
        self._selector.register(self._sock, selectors.EVENT_READ, _ACCEPT)
        self._selector.register(self._wake_in, selectors.EVENT_READ, _WAKE)
        self._io.start()
        self._public.start()

    def close(self) -> None:
        self._closing.set()
        self._turns.close()
        self._wake()
        if self._io.is_alive():
            self._io.join(timeout=2)
        for sock in (self._sock, self._wake_in, self._wake_out):
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # ---- the socket thread ----------------------------------------------------------------

    def _serve(self) -> None:
        while not self._closing.is_set():
            timeout = (
                max(0.0, self._deadlines[0][0] - time.monotonic()) if self._deadlines else None
            )
            for key, events in self._selector.select(timeout):
                try:
                    self._ready(key.data, events)
                except Exception:  # a bug must not take the server down for everyone
                    log.exception("control socket: unexpected error")
                    if isinstance(key.data, _Connection):
                        self._drop(key.data)
            self._expire()
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, _Connection):
                self._drop(key.data)
        self._selector.close()

    def _ready(self, what: object, events: int) -> None:
        if what == _ACCEPT:
            self._accept()
        elif what == _WAKE:
            with contextlib.suppress(BlockingIOError):
                self._wake_in.recv(4096)
            self._take_answers()
        elif isinstance(what, _Connection) and events & selectors.EVENT_READ:
            self._read(what)
        elif isinstance(what, _Connection):
            self._write(what)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as error:  # EMFILE and the like: the backlog keeps them waiting
                log.warning("control socket: cannot accept: %s", error)
                return
            sock.setblocking(False)
            try:
                peer = peer_of(sock)
            except OSError:
                sock.close()
                continue
            self._admit(sock, peer)

    def _admit(self, sock: socket.socket, peer: Peer) -> None:
        admin = self._admins.admits(peer)
        if admin and self._admin_open >= ADMIN_CONNECTIONS:
            busy = f"{self._admin_open} admin connections already open"
        elif not admin and self._public_open[peer.uid] >= CONNECTIONS_PER_UID:
            busy = f"{self._public_open[peer.uid]} connections from uid {peer.uid} already open"
        elif not admin and sum(self._public_open.values()) >= PUBLIC_CONNECTIONS:
            busy = f"{PUBLIC_CONNECTIONS} connections from users already open"
        else:
            busy = ""
        if busy:
            # A short answer fits in the socket's send buffer, so this never blocks.
            with contextlib.suppress(OSError):
                sock.send(encode(_error(Busy(busy))))
            sock.close()
            return
        if admin:
            self._admin_open += 1
        else:
            self._public_open[peer.uid] += 1
        conn = _Connection(sock, peer, admin, deadline=None)
        self._set_deadline(conn, REQUEST_SECONDS)
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        conn.inbox += chunk
        if len(conn.inbox) > MAX_REQUEST_BYTES:
            self._selector.unregister(conn.sock)
            too_long = UsageError(f"message longer than {MAX_REQUEST_BYTES} bytes")
            self._start_writing(conn, encode(_error(too_long)))
        elif chunk and b"\n" not in chunk:
            return
        elif not conn.inbox:
            self._drop(conn)  # gone without asking
        else:
            self._selector.unregister(conn.sock)
            conn.deadline = None  # the request's own handler bounds its time
            request = bytes(conn.inbox)
            if conn.admin:
                threading.Thread(target=self._run, args=(conn, request), daemon=True).start()
            else:
                self._turns.put(conn.peer.uid, (time.monotonic(), conn, request))

    def _start_writing(self, conn: _Connection, answer: bytes) -> None:
        """Starts writing an answer to a connection no longer in the selector."""
        conn.outbox = memoryview(answer)
        self._set_deadline(conn, ANSWER_SECONDS)
        self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        assert conn.outbox is not None
        try:
            conn.outbox = conn.outbox[conn.sock.send(conn.outbox) :]
        except BlockingIOError:
            return
        except OSError:
            conn.outbox = conn.outbox[:0]  # the client went away
        if not conn.outbox:
            self._drop(conn)

    def _take_answers(self) -> None:
        while True:
            try:
                conn, answer = self._answers.get_nowait()
            except Empty:
                return
            self._start_writing(conn, answer)

    def _set_deadline(self, conn: _Connection, seconds: float) -> None:
        conn.deadline = time.monotonic() + seconds
        heapq.heappush(self._deadlines, (conn.deadline, next(self._order), conn))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, conn = heapq.heappop(self._deadlines)
            if conn.closed or conn.deadline != deadline:
                continue  # answered, or given a new deadline since
            if conn.outbox is None:
                with contextlib.suppress(OSError):
                    late = UsageError(f"no complete request within {REQUEST_SECONDS:g}s")
                    conn.sock.send(encode(_error(late)))
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        if conn.closed:
            return
        with contextlib.suppress(KeyError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        conn.closed = True
        if conn.admin:
            self._admin_open -= 1
        else:
            self._public_open[conn.peer.uid] -= 1
            if not self._public_open[conn.peer.uid]:
                del self._public_open[conn.peer.uid]

    def _wake(self) -> None:
        # Full: a wake-up is pending anyway. Closed: the server is shutting down.
        with contextlib.suppress(OSError):
            self._wake_out.send(b"\0")

    # ---- request threads ------------------------------------------------------------------

    def _serve_public(self) -> None:
        while (item := self._turns.take()) is not None:
            request = item[2]
            # Requests alike get one answer, computed after all of them came: a flood of status
            # requests costs one walk of /proc, and none gets an answer older than itself.
            batch = [item, *self._turns.take_alike(itemgetter(2), request)]
            now = time.monotonic()
            late = [conn for queued_at, conn, _ in batch if now - queued_at > PUBLIC_WAIT_SECONDS]
            for conn in late:
                gone = Busy(f"waited over {PUBLIC_WAIT_SECONDS:g}s for its turn")
                self._send(conn, encode(_error(gone)))
            waiting = [conn for _, conn, _ in batch if conn not in late]
            if not waiting:
                continue
            cpu = time.thread_time()
            answer = self._reply(waiting[0], request)
            for conn in waiting:
                self._send(conn, answer)
            # Rest in proportion to the CPU time that took, so that these requests use at most
            # PUBLIC_SHARE of a core: the cost follows the machine (a /proc walk takes longer
            # with more processes), not a guess. Where one walk is very slow (thousands of
            # processes), the cap keeps users' wait short and the share grows to c / (c + cap).
            rest = (time.thread_time() - cpu) * (1 / PUBLIC_SHARE - 1)
            if self._closing.wait(min(rest, MAX_REST_SECONDS)):
                return

    def _run(self, conn: _Connection, request: bytes) -> None:
        self._send(conn, self._reply(conn, request))

    def _reply(self, conn: _Connection, request: bytes) -> bytes:
        try:
            return encode({"ok": True, "result": self._dispatch(conn, request)})
        except RamstageError as error:
            return encode(_error(error))
        except Exception as error:  # a bug must not take the server down
            log.exception("control request failed")
            return encode(_error(RamstageError(f"internal error: {error}")))

    def _send(self, conn: _Connection, answer: bytes) -> None:
        self._answers.put((conn, answer))
        self._wake()

    def _dispatch(self, conn: _Connection, request: bytes) -> Any:
        message = decode(request)
        if message.get("v") != VERSION:
            raise UsageError(
                f"unsupported protocol version {message.get('v')!r}; expected {VERSION}"
            )
        cmd = message.pop("cmd", None)
        message.pop("v")
        if cmd not in COMMANDS:
            raise UsageError(f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
        if cmd != "status" and not conn.admin:
            raise PermissionDenied(f"{cmd} needs root or membership of the group {ADMIN_GROUP}")
        return self.handler(cmd, message)


def _error(error: RamstageError) -> dict[str, Any]:
    return {"ok": False, "error": {"type": error.wire_type, "message": error.message}}
