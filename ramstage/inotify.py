"""The kernel's inotify (inotify(7)), read directly: one instance and one thread for every watch.

watchdog was the first choice, but Debian 12's python3-watchdog (2.2.1) opens one inotify
instance per watched directory, and fs.inotify.max_user_instances is 128: a daemon with 150
models in 150 directories died at start. It also reports a queue overflow only in a log line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x002, 0x004, 0x008
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x040, 0x080, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# What a change to a source can look like; opening and reading it (our own copies) cannot.
CHANGES = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
    | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
)  # fmt: skip
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: bytes  # the entry in the watched directory, b"" for the directory itself

    @property
    def kind(self) -> str:
        """watchdog's words for it, which the rest of ramstage speaks."""
        if self.mask & (IN_CREATE | IN_MOVED_TO):
            return "created"
        if self.mask & (IN_DELETE | IN_DELETE_SELF):
            return "deleted"
        if self.mask & (IN_MOVED_FROM | IN_MOVE_SELF):
            return "moved"
        return "modified"


def _check(result: int) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return result


class Inotify:
    """One inotify instance. Reads block in `events` until there are some or `close` is
    called from another thread (a pipe wakes the reader)."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.closed = False

    def add_watch(self, path: str, mask: int = CHANGES) -> int:
        """ENOSPC: fs.inotify.max_user_watches is reached."""
        flags = mask | IN_ONLYDIR
        return _check(_libc.inotify_add_watch(self.fd, os.fsencode(path), flags))

    def rm_watch(self, wd: int) -> None:
        try:
            _check(_libc.inotify_rm_watch(self.fd, wd))
        except OSError as error:
            if error.errno != errno.EINVAL:  # gone already: its directory was deleted
                raise

    def events(self) -> Iterator[Event]:
        poller = select.poll()
        for fd in (self.fd, self._wake_read):
            poller.register(fd, select.POLLIN)
        while not self.closed:
            poller.poll()
            if self.closed:
                return
            try:
                data = os.read(self.fd, 256 * 1024)
            except BlockingIOError:
                continue
            yield from _parse(data)

    def close(self) -> None:
        self.closed = True
        os.write(self._wake_write, b"x")

    def release(self) -> None:
        """Closes the descriptors, once the reader has returned."""
        for fd in (self.fd, self._wake_read, self._wake_write):
            os.close(fd)


def _parse(data: bytes) -> Iterator[Event]:
    offset = 0
    while offset < len(data):
        wd, mask, _, length = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        yield Event(wd, mask, data[start : start + length].rstrip(b"\0"))
        offset = start + length
