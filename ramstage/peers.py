"""Who calls the control socket: their credentials (SO_PEERCRED and SO_PEERGROUPS, socket(7):
as of connect(2)), whether they are admins (root or the group ramstage), and the turns other
users' requests take."""

from __future__ import annotations

import grp
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

ADMIN_GROUP = "ramstage"
ADMIN_GROUP_SECONDS = 10.0
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
T = TypeVar("T")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gids: frozenset[int]


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    gids = {gid}
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        pass
    return Peer(pid, uid, frozenset(gids))


class AdminGroup:
    """Whether a peer is root or in the group ramstage. The group is looked up again every
    ADMIN_GROUP_SECONDS, not per connection: with NSS behind it (LDAP, sssd) a lookup can be
    slow, and a flood of connections would make as many."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._gid: int | None = None
        self._looked_at = float("-inf")

    def admits(self, peer: Peer) -> bool:
        if peer.uid == 0:
            return True
        if self._clock() - self._looked_at >= ADMIN_GROUP_SECONDS:
            try:
                self._gid = grp.getgrnam(ADMIN_GROUP).gr_gid
            except KeyError:
                self._gid = None
            self._looked_at = self._clock()
        return self._gid is not None and self._gid in peer.gids


class Turns(Generic[T]):
    """Waiting items in one queue per uid, taken in turn: one from each uid that has any, in
    the order the uids first came, so that one user's flood delays another by one item."""

    def __init__(self) -> None:
        self._queues: OrderedDict[int, deque[T]] = OrderedDict()
        self._changed = threading.Condition()
        self._closed = False

    def put(self, uid: int, item: T) -> None:
        with self._changed:
            self._queues.setdefault(uid, deque()).append(item)
            self._changed.notify()

    def take(self) -> T | None:
        """The next item, waiting for one; None once closed."""
        with self._changed:
            while not self._queues and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            uid, queue = next(iter(self._queues.items()))
            item = queue.popleft()
            if queue:
                self._queues.move_to_end(uid)
            else:
                del self._queues[uid]
            return item

    def take_alike(self, key: Callable[[T], object], value: object) -> list[T]:
        """Removes and returns, without waiting, every item whose key is value."""
        with self._changed:
            taken = []
            for uid, queue in list(self._queues.items()):
                taken += [item for item in queue if key(item) == value]
                kept = deque(item for item in queue if key(item) != value)
                if kept:
                    self._queues[uid] = kept
                else:
                    del self._queues[uid]
            return taken

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
