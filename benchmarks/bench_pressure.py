"""How fast ramstage gives RAM back, and what watching memory costs when nothing happens.

Run as root (it mounts a real tmpfs): `.venv/bin/python benchmarks/bench_pressure.py`.

1. Response: a model of --size is staged; this process then allocates (and touches) memory until
   MemAvailable reads under a floor set --margin below the reading at the start of each round,
   and times from that reading to (a) the link pointing at the source and (b) the store's usage
   having dropped by the copy. The floor is only seen by the daemon at its next look, so the
   figure includes the watcher's check interval.
2. Idle: with nothing happening, utime+stime of the watcher thread (and of the whole daemon)
   over --idle seconds, from /proc/PID/task/TID/stat, as a share of one core.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ramstage.protocol import request
from ramstage.system import System

M = 1 << 20
CHUNK = 32 * M


def write_source(path: Path, size: int) -> None:
    block = os.urandom(M)
    with open(path, "wb") as f:
        f.writelines(i.to_bytes(8, "little") + block[8:] for i in range(size // M))


def wait(predicate, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return value


class Bench:
    def __init__(self, root: Path, size: int) -> None:
        self.root, self.size = root, size
        self.source = root / "model.ckpt"
        self.store = root / "store"
        self.link = root / "models" / "m"
        self.socket = root / "control.sock"
        self.config_path = root / "ramstage.yaml"
        self.config = {
            "store": {"path": str(self.store), "size": str(size + 64 * M), "mount": True},
            "links_dir": str(root / "models"),
            "socket": str(self.socket),
            "memory": {"min_available": "256M", "resume_available": "512M", "cooldown": "1s"},
            "models": [{"name": "m", "source": str(self.source)}],
        }
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self) -> None:
        write_source(self.source, self.size)
        self.write_config()
        self.log = open(self.root / "daemon.log", "wb")  # noqa: SIM115 (lives as long as the daemon)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ramstage", "daemon", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait(self.socket.exists, 30, "the control socket")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)
        self.log.close()
        subprocess.run(["umount", "--lazy", str(self.store)], capture_output=True, check=False)

    def state(self) -> str:
        status = request(self.socket, "status")
        return str(status["models"][0]["state"])

    def set_floor(self, floor: int, resume: int) -> None:
        self.config["memory"].update(min_available=str(floor), resume_available=str(resume))
        self.write_config()
        request(self.socket, "reload")

    def store_used(self) -> int:
        st = os.statvfs(self.store)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def response_round(self, margin: int, system: System) -> tuple[float, float]:
        wait(lambda: self.state() == "staged", 120, "the model to be staged")
        used = self.store_used()
        available = system.available_bytes()
        floor = available - margin
        self.set_floor(floor, available - 128 * M)
        held, crossed_at = [], None
        while crossed_at is None:
            block = bytearray(CHUNK)
            block[::4096] = b"\1" * (CHUNK // 4096)  # touch every page
            held.append(block)
            if system.available_bytes() < floor:
                crossed_at = time.monotonic()
            elif len(held) * CHUNK > margin + 2 * self.size:
                raise SystemExit(
                    "MemAvailable never crossed the floor: is something freeing memory?"
                )
        wait(lambda: os.readlink(self.link) == str(self.source), 10, "link on source", 0.001)
        linked = time.monotonic()
        wait(lambda: self.store_used() <= used - self.size * 9 // 10, 10, "RAM freed", 0.001)
        freed = time.monotonic()
        del held
        self.set_floor(256 * M, 512 * M)
        return linked - crossed_at, freed - crossed_at

    def watcher_tid(self) -> int:
        text = (self.root / "daemon.log").read_text()
        return int(re.findall(r"memory watcher running as thread (\d+)", text)[-1])


def cpu_seconds(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size-mib", type=int, default=512, help="the staged model")
    parser.add_argument("--margin-mib", type=int, default=1024, help="floor below MemAvailable")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measured")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts a tmpfs")
    system = System()
    with tempfile.TemporaryDirectory(prefix="ramstage-bench-pressure-") as tmp:
        bench = Bench(Path(tmp), args.size_mib * M)
        bench.start()
        try:
            rounds = [bench.response_round(args.margin_mib * M, system) for _ in range(args.rounds)]
            wait(lambda: bench.state() == "staged", 120, "the model to be staged")
            assert bench.process is not None
            pid, tid = bench.process.pid, bench.watcher_tid()
            time.sleep(2)  # let the restage settle
            thread_stat = Path(f"/proc/{pid}/task/{tid}/stat")
            process_stat = Path(f"/proc/{pid}/stat")
            t0, thread0, process0 = (
                time.monotonic(),
                cpu_seconds(thread_stat),
                cpu_seconds(process_stat),
            )
            time.sleep(args.idle)
            elapsed = time.monotonic() - t0
            thread_cpu = cpu_seconds(thread_stat) - thread0
            process_cpu = cpu_seconds(process_stat) - process0
        finally:
            bench.stop()
    linked = [r[0] for r in rounds]
    freed = [r[1] for r in rounds]
    print(
        f"response to MemAvailable crossing the floor ({args.rounds} rounds, "
        f"{args.size_mib} MiB model, floor {args.margin_mib} MiB below the reading)"
    )
    print(f"{'':24}{'median':>10}{'min':>10}{'max':>10}{'target':>10}")
    for label, values in (("link on source (s)", linked), ("store usage freed (s)", freed)):
        print(
            f"{label:24}{statistics.median(values):>10.3f}{min(values):>10.3f}"
            f"{max(values):>10.3f}{'<= 1':>10}"
        )
    print()
    print(f"idle cost over {elapsed:.0f} s (share of one core)")
    print(f"{'watcher thread':24}{100 * thread_cpu / elapsed:>9.3f}%{'<= 0.5%':>10}")
    print(f"{'whole daemon':24}{100 * process_cpu / elapsed:>9.3f}%")
    print(f"{'ratio to target':24}{thread_cpu / elapsed / 0.005:>10.3f}")


if __name__ == "__main__":
    main()
