"""A FUSE file system of one directory holding one file, served from a thread of the test by
speaking the kernel's protocol on /dev/fuse directly (fuse(4), <linux/fuse.h>): no libfuse is
needed. It can be made to hang (stop answering, as a stopped server does), to leave reads
unanswered while answering the rest, to fail reads with EIO, or be disconnected (ENOTCONN from
then on, as when its server dies). Its file can be truncated, replaced (renamed over: a new
inode under the name, the old one still read through what has it open) or deleted and made
again, as on the server's side of a share."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import subprocess
import threading
from pathlib import Path

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino, size, blocks, a/m/ctime, nsecs, mode, nlink…
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry/attr valid (s, ns)
ATTR_OUT = struct.Struct("<QII")  # attr valid (s, ns), dummy
OPEN_OUT = struct.Struct("<QII")  # fh, open flags, padding
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, …
LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS, RELEASE = 1, 2, 3, 14, 15, 17, 18
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, INTERRUPT, BATCH_FORGET = 25, 26, 27, 28, 29, 36, 42
NO_REPLY = {FORGET, INTERRUPT, BATCH_FORGET}
ROOT, FILE = 1, 2  # node ids, and inode numbers
MTIME = 1_700_000_000

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class FuseServer:
    """Serves `name` holding `data` at `path` (mounted over it) until close()."""

    def __init__(self, path: Path, name: str, data: bytes, *, answer: bool = True) -> None:
        self.path, self.name = path, name
        self.files = {FILE: data}  # by node: what an open file reads, named or not
        self.named: int | None = FILE  # the node the name leads to; None: deleted
        self.answering = threading.Event()  # cleared: requests wait unanswered (a hung mount)
        self.eio = threading.Event()  # set: reads fail with EIO
        self.reads = 0
        self.read_limit: int | None = None  # reads past it wait unanswered until release_reads()
        self.held: list[bytes] = []
        self._stop = threading.Event()
        # Close-on-exec: a daemon started later must not keep the connection alive.
        self.fd: int | None = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if _libc.mount(b"ramstage-test", bytes(path), b"fuse.ramstage-test", 0, options) != 0:
            raise OSError(ctypes.get_errno(), "mount fuse", str(path))
        self.mounted = True
        if answer:
            self.answering.set()
        self.thread = threading.Thread(target=self._serve, name="fuse-server", daemon=True)
        self.thread.start()

    def hang(self) -> None:
        self.answering.clear()

    def answer(self) -> None:
        self.answering.set()

    def hold_reads(self, after: int = 0) -> None:
        """READ requests past the first `after` from now wait unanswered (a read that hangs)."""
        self.read_limit = self.reads + after

    def release_reads(self) -> None:
        self.read_limit = None  # the server's thread answers those held

    def truncate(self, size_bytes: int) -> None:
        assert self.named is not None
        self.files[self.named] = self.files[self.named][:size_bytes]

    def replace(self, data: bytes) -> None:
        """A new file renamed over the name (rename(2)); also makes it again after delete()."""
        self.named = max(self.files) + 1
        self.files[self.named] = data

    def delete(self) -> None:
        self.named = None

    def disconnect(self) -> None:
        """Every look fails with ENOTCONN from now on (and none waits any more)."""
        self._stop.set()
        self.answering.set()
        self.thread.join()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.disconnect()
        if self.mounted:
            subprocess.run(["umount", "--lazy", str(self.path)], check=True)
            self.mounted = False

    def _serve(self) -> None:
        assert self.fd is not None
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if self.held and self.read_limit is None:
                self._handle(self.held.pop(0))
            if not self.answering.wait(0.1) or not poller.poll(100):
                continue
            try:
                request = os.read(self.fd, (1 << 20) + 4096)
            except OSError as error:
                if error.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # interrupted by its caller meanwhile
                return
            self._handle(request)

    def _handle(self, request: bytes) -> None:
        _, opcode, unique, node, *_ = IN_HEADER.unpack_from(request)
        if opcode in NO_REPLY:
            return
        if opcode == READ and self.read_limit is not None and self.reads >= self.read_limit:
            self.held.append(request)
            return
        error, payload = self._answer(opcode, node, request[IN_HEADER.size :])
        reply = OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload
        with contextlib.suppress(OSError):  # ENOENT: its caller was interrupted meanwhile
            os.write(self.fd, reply)  # type: ignore[arg-type]

    def _answer(self, opcode: int, node: int, body: bytes) -> tuple[int, bytes]:
        """(-errno or 0, the reply's payload). Nothing is cached: every look asks."""
        if opcode == INIT:
            _, minor, readahead, _ = struct.unpack_from("<IIII", body)
            return 0, INIT_OUT.pack(
                7, min(minor, 31), readahead, 0, 16, 12, 128 << 10, 1, 0, 0, 0, 0
            )
        if opcode == LOOKUP:
            named = self.named
            if node != ROOT or body.rstrip(b"\0") != self.name.encode() or named is None:
                return -errno.ENOENT, b""
            return 0, ENTRY_OUT.pack(named, 0, 0, 0, 0, 0) + self._attr(named)
        if opcode == GETATTR:
            return 0, ATTR_OUT.pack(0, 0, 0) + self._attr(node)
        if opcode in (OPEN, OPENDIR):
            return 0, OPEN_OUT.pack(0, 0, 0)
        if opcode == READ:
            _, offset, size, *_ = READ_IN.unpack_from(body)
            self.reads += 1
            return (
                (-errno.EIO, b"")
                if self.eio.is_set()
                else (0, self.files[node][offset : offset + size])
            )
        if opcode == STATFS:
            return 0, bytes(80)
        if opcode in (RELEASE, FLUSH, RELEASEDIR, READDIR):
            return 0, b""
        return -errno.ENOSYS, b""

    def _attr(self, node: int) -> bytes:
        if node == ROOT:
            mode, size, nlink = 0o40755, 0, 2
        else:
            mode, size, nlink = 0o100644, len(self.files[node]), int(node == self.named)
        blocks = (size + 511) // 512
        return ATTR.pack(
            node, size, blocks, MTIME, MTIME, MTIME, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0
        )
