"""Who holds a staged file or a source: the processes with it open (/proc/PID/fd) or mapped
(/proc/PID/maps).

Files are matched by (device, inode), which stays right after a generation is unlinked, when
the paths in /proc only say "(deleted)".
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

FileKey = tuple[int, int]  # (st_dev, st_ino)
# <linux/stat.h>, <fcntl.h>: struct statx is 256 bytes; stx_ino at 32, stx_dev_major at 136.
_AT_FDCWD, _AT_STATX_DONT_SYNC, _STATX_INO = -100, 0x4000, 0x100
_STATX_SIZE, _STX_INO, _STX_DEV_MAJOR = 256, 32, 136
_libc = ctypes.CDLL(None, use_errno=True)
_libc.statx.argtypes = [
    ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
]  # fmt: skip


class Mapping(NamedTuple):
    start: int  # the address range
    end: int
    offset: int  # into the file
    key: FileKey


def mappings(maps: Path) -> Iterator[Mapping]:
    """The file-backed mappings a /proc/PID/maps lists (proc(5): address range, permissions,
    offset, device major:minor, inode, path); the ramstage.fastload client reads its own."""
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and fields[4] != "0":
            start, _, end = fields[0].partition("-")
            major, _, minor = fields[3].partition(":")
            key = (os.makedev(int(major, 16), int(minor, 16)), int(fields[4]))
            yield Mapping(int(start, 16), int(end, 16), int(fields[2], 16), key)


def _maps_keys(maps: Path) -> set[FileKey]:
    return {mapping.key for mapping in mappings(maps)}


def _cached_key(path: str) -> FileKey:
    """The file's (device, inode) as the kernel has it cached: statx(2) with
    AT_STATX_DONT_SYNC asks no FUSE or network server, so a file held open on a hung mount
    cannot block the caller (stat(2) of /proc/PID/fd/N would ask its server)."""
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(_AT_FDCWD, os.fsencode(path), _AT_STATX_DONT_SYNC, _STATX_INO, buffer) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), path)
    (inode,) = struct.unpack_from("<Q", buffer, _STX_INO)
    major, minor = struct.unpack_from("<II", buffer, _STX_DEV_MAJOR)
    return os.makedev(major, minor), inode


def _descriptors(pid_dir: Path) -> Iterator[tuple[FileKey, str]]:
    """(file key, descriptor number) for each open file of one process."""
    for fd in os.scandir(pid_dir / "fd"):
        try:
            key = _cached_key(fd.path)
        except OSError:
            continue
        yield key, fd.name


def _processes(proc: Path) -> Iterator[tuple[int, Path]]:
    for pid_dir in proc.iterdir():
        if pid_dir.name.isdigit():
            yield int(pid_dir.name), pid_dir


def holders(proc: Path, wanted: set[FileKey]) -> dict[FileKey, set[int]]:
    """Maps each wanted file that some process holds open or mapped to the PIDs that do."""
    found: dict[FileKey, set[int]] = {}
    if not wanted:
        return found
    for pid, pid_dir in _processes(proc):
        try:
            held = _maps_keys(pid_dir / "maps") | {key for key, _ in _descriptors(pid_dir)}
        except OSError:  # the process exited, or is not ours to look at
            continue
        for key in held & wanted:
            found.setdefault(key, set()).add(pid)
    return found


def writers(proc: Path, wanted: set[FileKey]) -> set[int]:
    """The PIDs that hold one of the wanted files open for writing (the flags in fdinfo, proc(5)):
    inotify cannot tell a writer that pauses from one that has finished."""
    found = set()
    for pid, pid_dir in _processes(proc):
        try:
            for key, fd in _descriptors(pid_dir):
                if key in wanted and _writable(pid_dir / "fdinfo" / fd):
                    found.add(pid)
        except OSError:
            continue
    return found


def _writable(fdinfo: Path) -> bool:
    for line in fdinfo.read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    return False
