"""Who holds a staged file: the processes with it open (/proc/PID/fd) or mapped (/proc/PID/maps).

Files are matched by (device, inode), which stays right after a generation is unlinked, when
the paths in /proc only say "(deleted)".
"""

from __future__ import annotations

import os
from pathlib import Path

FileKey = tuple[int, int]  # (st_dev, st_ino)


def _maps_keys(maps: Path) -> set[FileKey]:
    keys = set()
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and fields[4] != "0":
            major, _, minor = fields[3].partition(":")
            keys.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
    return keys


def holders(proc: Path, wanted: set[FileKey]) -> dict[FileKey, set[int]]:
    """Maps each wanted file that some process holds to the PIDs that hold it."""
    found: dict[FileKey, set[int]] = {}
    if not wanted:
        return found
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        pid = int(pid_dir.name)
        try:
            held = _maps_keys(pid_dir / "maps")
            for fd in os.scandir(pid_dir / "fd"):
                try:
                    st = os.stat(fd.path)
                except OSError:
                    continue
                held.add((st.st_dev, st.st_ino))
        except OSError:  # the process exited, or is not ours to look at
            continue
        for key in held & wanted:
            found.setdefault(key, set()).add(pid)
    return found
