"""Emulated devices and RAM tiers for load_devices.py; every piece is undone on the way out.

- a loop device with direct I/O (so the loop adds no second page cache) holding an ext4 file
  system, read through cgroup v1 blkio throttles that emulate an HDD, a SATA SSD and an NVMe SSD;
- the real ramstage daemon staging the model into a real tmpfs;
- vmtouch locking the same source file in the page cache;
- plain tmpfs mounts with chosen options (huge=).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

BLKIO = Path("/sys/fs/cgroup/blkio")


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def drop_caches() -> None:
    """Writes dirty pages back, then drops the page cache (mlocked and tmpfs pages stay)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextmanager
def loop_filesystem(image: Path, size_bytes: int, mountpoint: Path) -> Iterator[str]:
    """An ext4 file system on a fresh loop device; yields the device path."""
    with open(image, "wb") as f:
        f.truncate(size_bytes)
    device = run("losetup", "--find", "--show", "--direct-io=on", str(image))
    try:
        run("mkfs.ext4", "-q", "-F", device)
        mountpoint.mkdir(parents=True, exist_ok=True)
        run("mount", device, str(mountpoint))
        try:
            yield device
        finally:
            run("umount", str(mountpoint))
    finally:
        run("losetup", "--detach", device)


@contextmanager
def throttles(device: str, rates: dict[str, float]) -> Iterator[dict[str, Path]]:
    """One blkio cgroup per label, throttling reads from `device` to its rate in bytes/s."""
    if not (BLKIO / "blkio.throttle.read_bps_device").exists():
        raise SystemExit(f"needs cgroup v1 blkio at {BLKIO} (on cgroup v2 hosts use io.max)")
    rdev = os.stat(device).st_rdev
    groups: dict[str, Path] = {}
    try:
        for index, (label, rate) in enumerate(rates.items()):
            group = BLKIO / f"ramstage-bench-{os.getpid()}-{index}"
            group.mkdir()
            groups[label] = group
            (group / "blkio.throttle.read_bps_device").write_text(
                f"{os.major(rdev)}:{os.minor(rdev)} {int(rate)}\n"
            )
        yield groups
    finally:
        for group in groups.values():
            group.rmdir()  # the workers in it have exited, so it is empty


@contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", options, "ramstage-bench", str(mountpoint))
    try:
        yield mountpoint
    finally:
        run("umount", str(mountpoint))


@contextmanager
def staged_by_daemon(workdir: Path, name: str, source: Path, options: str) -> Iterator[Path]:
    """The real daemon staging `source`; yields its config once `name` is staged. With
    `options`, the store's tmpfs is mounted here first with them, and the daemon adopts it as
    it adopts its own mount after a restart (same source name, FS_NAME); without, the daemon
    mounts it as it does by default. The daemon unmounts it when it stops."""
    from ramstage import client
    from ramstage.tmpfs import FS_NAME

    workdir.mkdir()
    store = workdir / "store"
    if options:
        store.mkdir()
        run("mount", "-t", "tmpfs", "-o", f"size=2G,{options}", FS_NAME, str(store))
    config = workdir / "ramstage.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"path": str(store), "size": "2G", "mount": True},
                "links_dir": str(workdir / "links"),
                "socket": str(workdir / "control.sock"),
                "memory": {"min_available": "1G", "resume_available": "2G"},
                "models": [{"name": name, "source": str(source)}],
            }
        )
    )
    with open(workdir / "daemon.log", "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ramstage", "daemon", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client.wait_staged(name, 300, config=config)
        yield config
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        if os.path.ismount(store):
            run("umount", str(store))


@contextmanager
def vmtouch_locked(path: Path, timeout: float = 120.0) -> Iterator[None]:
    """`vmtouch -l` in the foreground: reads the file, mlocks its pages and holds them until it
    is killed. Ready once the process has the whole file locked (VmLck in its status)."""
    if shutil.which("vmtouch") is None:
        raise SystemExit("vmtouch is not installed (apt-get install vmtouch)")
    locker = subprocess.Popen(["vmtouch", "-q", "-l", str(path)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while _locked_bytes(locker.pid) < path.stat().st_size:
            if locker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vmtouch did not lock {path} (exit status {locker.poll()})")
            time.sleep(0.05)
        yield
    finally:
        locker.terminate()
        locker.wait()


def _locked_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def copy_preallocated(source: Path, target: Path) -> None:
    """Copies as ramstage's copier does: the whole size reserved first. On a tmpfs with
    huge=within_size that is what gets huge pages; appending (cp) stays on 4 KiB pages,
    because each new page lies beyond i_size when it is allocated."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        os.posix_fallocate(dst.fileno(), 0, os.fstat(src.fileno()).st_size)
        shutil.copyfileobj(src, dst, 8 << 20)


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages are divided among the processes that map them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/meminfo")
