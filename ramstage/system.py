"""The one seam to the operating system: /proc readings (meminfo, mounts), /sys (whether a disk
spins, whether a balloon reports free pages), the CPUs, the clock and sleep, the environment,
mount(8) and systemctl(1), and the test-only crash hook.

Tests point `proc` or `sysfs` at a mock-up, pass their own environment, or replace the clock
to reach corner cases (earlyoom's procdir_path); everything else uses the real thing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CRASH_AT = "RAMSTAGE_CRASH_AT"


@dataclass(frozen=True)
class MountEntry:
    mountpoint: Path
    fstype: str
    source: str
    options: frozenset[str]


class System:
    def __init__(
        self,
        proc: Path = Path("/proc"),
        environ: Mapping[str, str] | None = None,
        sysfs: Path = Path("/sys"),
    ) -> None:
        self.proc, self.sysfs = proc, sysfs
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        crash_at = self.environ.get(CRASH_AT)
        self._crash_at = int(crash_at) if crash_at else None
        self._steps = 0
        self._steps_lock = threading.Lock()

    def step(self, what: str) -> None:
        """Called before every change to the store or the links (a file written, a rename, an
        unlink, a link flip). Test-only: with RAMSTAGE_CRASH_AT=k the process logs each step
        and SIGKILLs itself at the k-th, before it is taken (docs/reliability.md, "Crash
        matrix"). Unset, it costs one comparison."""
        if self._crash_at is None:
            return
        with self._steps_lock:
            self._steps += 1
            number = self._steps
            # Straight to stderr, unbuffered: the line must be out before the kill.
            os.write(2, f"ramstage crash hook: step {number}: {what}\n".encode())
            if number == self._crash_at:
                os.kill(os.getpid(), signal.SIGKILL)

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

    def cores(self) -> int:
        """The CPUs this process may run on (its affinity, as a cpuset or taskset leaves it)."""
        return len(os.sched_getaffinity(0))

    def spinning_disk(self, path: Path) -> int | None:
        """The device `path` is on, if that is a rotational disk (sysfs queue/rotational: of the
        device, or of the disk a partition is on); None for SSD and NVMe, and for tmpfs, FUSE
        and network file systems, which have no block device (major 0)."""
        try:
            device = os.stat(path).st_dev
        except OSError:
            return None  # the copy's own look says what is wrong
        block = self.sysfs / "dev/block" / f"{os.major(device)}:{os.minor(device)}"
        for queue in (block / "queue", block / ".." / "queue"):  # the kernel resolves ..
            try:
                rotational = (queue / "rotational").read_text().strip() == "1"
            except OSError:
                continue
            return device if rotational else None
        return None

    def reports_free_pages(self) -> bool:
        """Whether this is a VM whose virtio balloon hands free memory back to the host (free
        page reporting, feature bit 5 in sysfs: one character per bit). The host then takes
        back free 2 MiB blocks, exactly what a huge page is allocated from."""
        for device in (self.sysfs / "bus/virtio/devices").glob("*"):
            try:
                driver = os.readlink(device / "driver")
                features = (device / "features").read_text()
            except OSError:
                continue
            if Path(driver).name == "virtio_balloon" and features[5:6] == "1":
                return True
        return False

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

    def queued_job(self, unit: str) -> str | None:
        """The type of the job systemd runs or has queued for `unit` (`restart`, `start`,
        `stop`, ...), or None: systemctl list-jobs prints JOB UNIT TYPE STATE."""
        try:
            result = subprocess.run(
                ["systemctl", "list-jobs", "--no-legend", "--plain", unit],
                capture_output=True,
                text=True,
                check=False,
            )
        except FileNotFoundError:
            return None  # no systemd here: nothing queued
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] == unit:
                return fields[2]
        return None


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    """A mountinfo field as bytes: the kernel writes a space, tab, newline or backslash in a
    path as a backslash and three octal digits (fs/proc_namespace.c, mangle()), and every
    other byte as it is, UTF-8 or not."""
    return _OCTAL_ESCAPE.sub(lambda match: bytes([int(match.group(1), 8)]), field)


def _mount_ids(mountinfo: Path) -> set[bytes]:
    return {line.split(maxsplit=1)[0] for line in mountinfo.read_bytes().splitlines()}
