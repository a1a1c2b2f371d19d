"""The one seam to the operating system: /proc readings (meminfo, mounts), the clock and
sleep, the environment, and mount(8).

Tests point `proc` at a mock-up, pass their own environment, or replace the clock to reach
corner cases (earlyoom's procdir_path); everything else uses the real thing.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MountEntry:
    mountpoint: Path
    fstype: str
    source: str
    options: frozenset[str]


class System:
    def __init__(
        self, proc: Path = Path("/proc"), environ: Mapping[str, str] | None = None
    ) -> None:
        self.proc = proc
        self.environ: Mapping[str, str] = os.environ if environ is None else environ

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        """Wall-clock time, for what people read (since when, staged at)."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def meminfo_bytes(self, field: str) -> int:
        for line in (self.proc / "meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == field:
                return int(value.split()[0]) * 1024
        raise KeyError(field)

    def available_bytes(self) -> int:
        return self.meminfo_bytes("MemAvailable")

    def mounts(self, pid: str = "self") -> list[MountEntry]:
        """Parses /proc/PID/mountinfo (proc(5)): fields, " - ", fstype, source, super options."""
        entries = []
        for line in (self.proc / pid / "mountinfo").read_bytes().splitlines():
            before, _, after = line.partition(b" - ")
            fields, tail = before.split(), [os.fsdecode(_unescape(f)) for f in after.split()]
            options = set(os.fsdecode(fields[5]).split(","))
            options |= set(tail[2].split(",") if len(tail) > 2 else ())
            mountpoint = os.fsdecode(_unescape(fields[4]))
            entries.append(MountEntry(Path(mountpoint), tail[0], tail[1], frozenset(options)))
        return entries

    def in_init_mount_namespace(self) -> bool:
        try:
            return os.readlink(self.proc / "self/ns/mnt") == os.readlink(self.proc / "1/ns/mnt")
        except PermissionError:
            # Some sandboxes hide PID 1's namespace links; mount IDs are unique across
            # namespaces, so equal sets of them mean the same namespace.
            return _mount_ids(self.proc / "self/mountinfo") == _mount_ids(self.proc / "1/mountinfo")

    def run_in_init_namespace(self, argv: list[str]) -> None:
        """Runs a mount command where every other process sees its result: a mount made in a
        sandboxed service's private namespace is invisible outside (systemd.exec(5),
        PrivateMounts=), while one made in PID 1's namespace propagates into the slave
        namespaces of sandboxed services, ours included."""
        if not self.in_init_mount_namespace():
            argv = ["nsenter", f"--mount={self.proc}/1/ns/mnt", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise OSError(f"{' '.join(argv)}: {result.stderr.strip() or 'failed'}")


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    """A mountinfo field as bytes: the kernel writes a space, tab, newline or backslash in a
    path as a backslash and three octal digits (fs/proc_namespace.c, mangle()), and every
    other byte as it is, UTF-8 or not."""
    return _OCTAL_ESCAPE.sub(lambda match: bytes([int(match.group(1), 8)]), field)


def _mount_ids(mountinfo: Path) -> set[bytes]:
    return {line.split(maxsplit=1)[0] for line in mountinfo.read_bytes().splitlines()}
