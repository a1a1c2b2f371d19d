"""What a flood of `status` requests from an unprivileged user costs a staging.

Run as root (it mounts a real tmpfs): `.venv/bin/python benchmarks/bench_status_flood.py`.

1. Idle: the daemon's CPU time (utime+stime from /proc/PID/stat) as a share of one core over
   --idle-seconds with nothing to do, first with no client, then while --clients clients, run as
   uid 65534 (nobody), ask for status back to back (each sends its next request as soon as it
   has an answer, and again at once when told Busy); and the status answers they got per second.
2. Staging: a model of --size-mib is evicted and staged again, --rounds times with no other client
   and as many times under the same flood. Quiet and flooded stagings alternate, the first of
   each pair swapping, so that drift in the machine hits both alike. The table gives the
   medians of the stage request's wall time and of the daemon's CPU time during it, and the
   ratio flooded / quiet, of the medians and the median of the ratios of each pair. The issue's
   target: the flood costs at most 10% of the stage's time.

Each status walks /proc, so its cost grows with the processes on the machine: --processes idle
ones (sleep) are started first, as on a host running a few services with their workers.

To compare with another version of the daemon, run it with PYTHONPATH pointing at that
version's tree; the flood clients speak the wire protocol themselves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pressure import Bench, cpu_seconds, wait

from ramstage.protocol import request

M = 1 << 20
NOBODY = 65534

FLOOD = r"""
import json, socket, sys, threading
path, count = sys.argv[1], int(sys.argv[2])
answers, stop = {}, threading.Event()

def client(index):
    n = 0
    while not stop.is_set():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                s.sendall(b'{"v": 1, "cmd": "status"}\n')
                reply = json.loads(s.makefile("rb").readline())
            except (OSError, ValueError):
                continue
            if reply["ok"]:
                n += 1
    answers[index] = n

threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
print("flooding", flush=True)
sys.stdin.read()
stop.set()
for t in threads:
    t.join()
print(json.dumps(sum(answers.values())), flush=True)
"""


class Flood:
    def __init__(self, socket: Path, clients: int) -> None:
        self.process = subprocess.Popen(
            [
                *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
                *(sys.executable, "-c", FLOOD, str(socket), str(clients)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "flooding\n"
        self.started = time.monotonic()

    def stop(self) -> float:
        """Status answers per second while it ran."""
        out, _ = self.process.communicate(timeout=60)
        return int(out) / (time.monotonic() - self.started)


def idle_cost(bench: Bench, pid: int, seconds: float, clients: int) -> tuple[float, float]:
    """(daemon CPU share of one core, status answers per second) over `seconds` of a flood of
    `clients` with nothing staging."""
    flood = Flood(bench.socket, clients) if clients else None
    stat = Path(f"/proc/{pid}/stat")
    cpu, started = cpu_seconds(stat), time.perf_counter()
    time.sleep(seconds)
    share = (cpu_seconds(stat) - cpu) / (time.perf_counter() - started)
    return share, flood.stop() if flood else 0.0


def stage_once(bench: Bench, pid: int) -> tuple[float, float]:
    """(wall seconds, daemon CPU seconds) of one stage request, from an evicted model."""
    request(bench.socket, "evict", names=["m"])
    wait(lambda: bench.state() == "fallback", 60, "the eviction")
    stat = Path(f"/proc/{pid}/stat")
    cpu, started = cpu_seconds(stat), time.perf_counter()
    request(bench.socket, "stage", names=["m"], timeout=600)
    return time.perf_counter() - started, cpu_seconds(stat) - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size-mib", type=int, default=1024, help="the staged model")
    parser.add_argument("--clients", type=int, default=8, help="status clients in the flood")
    parser.add_argument("--processes", type=int, default=1000, help="idle processes to start")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    # Stopped early, it still cleans up (the idle processes, the daemon, the tmpfs) on the way
    # out; a shell's background job starts with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(args.processes)]
    root = Path(tempfile.mkdtemp(prefix="ramstage-flood-", dir="/var/tmp"))
    root.chmod(0o755)  # the flood runs as nobody and must reach the socket
    bench = Bench(root, args.size_mib * M)
    quiet: list[tuple[float, float]] = []
    flooded: list[tuple[float, float]] = []
    rates: list[float] = []
    try:
        bench.start()
        assert bench.process is not None
        wait(lambda: bench.state() == "staged", 300, "the first staging")
        idle = {
            n: idle_cost(bench, bench.process.pid, args.idle_seconds, n) for n in (0, args.clients)
        }
        for index in range(args.rounds):
            for with_flood in (False, True) if index % 2 == 0 else (True, False):
                if not with_flood:
                    quiet.append(stage_once(bench, bench.process.pid))
                    continue
                flood = Flood(bench.socket, args.clients)
                try:
                    time.sleep(0.5)  # under way before the copy starts
                    flooded.append(stage_once(bench, bench.process.pid))
                finally:
                    rates.append(flood.stop())
    finally:
        bench.stop()
        shutil.rmtree(root, ignore_errors=True)
        for process in sleepers:
            process.kill()
            process.wait()
    wall_q, wall_f = (statistics.median(w for w, _ in runs) for runs in (quiet, flooded))
    cpu_q, cpu_f = (statistics.median(c for _, c in runs) for runs in (quiet, flooded))
    print(
        f"stage of {args.size_mib} MiB, median of {args.rounds}; flood: {args.clients} clients;"
        f" {args.processes} idle processes"
    )
    print(f"idle, {args.idle_seconds:g} s: daemon CPU, share of a core; status answers per second")
    for clients, (share, rate) in idle.items():
        print(f"  {clients:>3} clients: {share:6.1%} {rate:8.1f}/s")
    print(f"{'':<22}{'stage wall':>12}{'daemon CPU':>12}{'status/s':>10}")
    print(f"{'no other client':<22}{wall_q:>10.2f} s{cpu_q:>10.2f} s{'-':>10}")
    flood_rate = statistics.median(rates)
    print(f"{'status flood':<22}{wall_f:>10.2f} s{cpu_f:>10.2f} s{flood_rate:>10.1f}")
    # Each flooded staging against the quiet one next to it: drift on a shared machine cancels.
    pairs = statistics.median(f / q for (f, _), (q, _) in zip(flooded, quiet))
    print(f"flooded / quiet: {wall_f / wall_q:.3f} of medians, {pairs:.3f} median of pairs")
    print("target: at most 1.10")
    print(json.dumps({"quiet": quiet, "flooded": flooded, "status_per_second": rates}))


if __name__ == "__main__":
    main()
