"""Ring files: the fast loader's page-locked host ring, kept in RAM between processes.

A fresh process's first load used to spend 40-60 ms making its 256 MiB ring: the kernel
zeroes fresh memory at about 7 GB/s (docs/benchmarks.md). A ring that is a file on a huge-page
tmpfs keeps its pages when the process ends, so the next process maps pages that exist: 0.2 ms
instead of 50 for 256 MiB, then the same page-locking as before (one H200).

The daemon mounts that tmpfs beside the store (store.rings: its size, huge=always, mode 1777
like /tmp). Each process of a user claims one file named UID.N there, 0600, held with flock(2)
while the process uses it; a file someone else planted under that name is passed over. The
daemon deletes the files no process holds when memory runs short, before any model; a process
that finds no file to claim makes its ring of fresh memory as before.

The boundary is the uid: processes of one uid share their ring files as they share everything
else that uid owns (pods that run as one uid on a node too, which is why the Kubernetes config
turns the rings off). Nothing here imports torch: the daemon prunes, the fast loader
(fastload/hostring.py) claims.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

DEFAULT_DIRECTORY = Path("/run/ramstage/rings")
SOURCE = "ramstage-rings"  # the tmpfs's source field, as the store's is "ramstage"
FILES_PER_USER = 8  # rings one user's processes hold at once (workers of one job)
INODES = 1024  # the tmpfs's nr_inodes: a user cannot fill it with names the daemon must walk
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # no planted link, FIFO or tty


def directory() -> Path:
    """Where clients look for ring files: $RAMSTAGE_RINGS, else the default store's neighbour."""
    return Path(os.environ.get("RAMSTAGE_RINGS") or DEFAULT_DIRECTORY)


def claim(nbytes: int) -> int | None:
    """An open descriptor of a ring file of exactly nbytes, every byte allocated, locked for
    this process until it is closed; None where there is no ring directory (a sticky one that
    everyone may write, root's or this user's: never the bare mountpoint an unmount leaves),
    every name of this user is taken or not the user's own, or the tmpfs is full."""
    uid = os.getuid()
    try:
        dir_fd = os.open(directory(), os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(dir_fd)
        if stat.S_IMODE(st.st_mode) != 0o1777 or st.st_uid not in (0, uid):
            return None
        for index in range(FILES_PER_USER):
            fd = _claim_one(dir_fd, f"{uid}.{index}", uid, nbytes)
            if fd is not None:
                return fd
        return None
    except _Full:
        return None
    finally:
        os.close(dir_fd)


def _claim_one(dir_fd: int, name: str, uid: int, nbytes: int) -> int | None:
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError:  # a symbolic link, or a file of another user's that is not ours to open
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
            raise _PassOver
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by another process: next name
        if os.fstat(fd).st_nlink == 0:
            raise _PassOver  # pruned between the open and the lock
        if st.st_size > nbytes:
            os.ftruncate(fd, nbytes)
        _allocate(fd, nbytes)
    except (OSError, _PassOver):
        os.close(fd)
        return None
    except _Full:
        os.close(fd)
        raise
    return fd


def _allocate(fd: int, nbytes: int) -> None:
    """Every page of the file allocated now (a page the tmpfs could not give later would be
    SIGBUS), once: allocating a kept file's pages again took 0.5 s for 258 MiB on this VM.
    Raises _Full, without trying, where the tmpfs has not room for what is missing."""
    st = os.fstat(fd)
    missing = nbytes - st.st_blocks * 512
    if missing <= 0 and st.st_size == nbytes:
        return
    fs = os.fstatvfs(fd)
    if missing > fs.f_bavail * fs.f_frsize:
        raise _Full
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise _Full from None
        raise


class _PassOver(Exception):
    """This name is not a ring file this process can use."""


class _Full(Exception):
    """The tmpfs has no room for this ring: no other name would have any either."""


def prune(path: Path) -> int:
    """Deletes the ring files in `path` that no process holds; returns the bytes freed. A
    process mapping a deleted file keeps its pages until it lets go of them."""
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return 0
    freed = 0
    try:
        for name in _names(dir_fd):
            try:
                fd = os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st = os.fstat(fd)
                now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(name, dir_fd=dir_fd)
                    freed += st.st_blocks * 512
            except OSError:  # held (BlockingIOError), or gone meanwhile
                continue
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    return freed


def _names(dir_fd: int) -> list[str]:
    try:
        return os.listdir(dir_fd)
    except OSError:  # the tmpfs unmounted under us: nothing to free there
        return []
