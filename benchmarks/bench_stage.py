"""Staging with verification against plain `cp`, into the same real tmpfs (run as root).

    .venv/bin/python benchmarks/bench_stage.py [--size-mib 1024] [--rounds 5]

Both sides read a source that is in the page cache (it is read once first), so the figure is
what verification costs on top of a copy. Runs alternate (cp, stage, cp, stage, …) so drift in
the machine hits both alike; the table shows medians. Targets: stage/cp <= 1.3 with sha256,
<= 1.1 with blake3.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ramstage.digest import available_algorithms
from ramstage.stager import stage_source
from ramstage.store import remove_tree

TARGETS = {"sha256": 1.3, "blake3": 1.1}


def write_source(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.writelines(offset.to_bytes(8, "little") + block[8:] for offset in range(0, size, 1 << 20))


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def time_cp(source: Path, store: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of cp into the store."""
    target = store / "cp" / source.name
    target.parent.mkdir()
    cpu, start = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    elapsed = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    remove_tree(target.parent)
    return elapsed


def time_stage(source: Path, store: Path, algorithm: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all threads) of a verified staging into the store."""
    generation = store / "gen"
    generation.mkdir()
    cpu, start = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    stage_source("bench", source, generation, algorithm)
    elapsed = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu
    remove_tree(generation)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--dir", default=None, help="where the source file goes (default: /var/tmp)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_stage.py mounts a tmpfs: run it as root", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    algorithms = [a for a in ("sha256", "blake3") if a in available_algorithms()]
    work = Path(tempfile.mkdtemp(prefix="ramstage-bench-", dir=args.dir or "/var/tmp"))
    store = work / "store"
    store.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={2 * size + (64 << 20)},noswap", "bench", str(store)],
        check=True,
    )
    try:
        source = work / "model.ckpt"
        write_source(source, size)
        with open(source, "rb") as f:  # into the page cache, for both sides alike
            while f.read(8 << 20):
                pass
        times: dict[str, list[tuple[float, float]]] = {"cp": [], **{a: [] for a in algorithms}}
        for _ in range(args.rounds):
            for algorithm in algorithms:
                times["cp"].append(time_cp(source, store))
                times[algorithm].append(time_stage(source, store, algorithm))
    finally:
        subprocess.run(["umount", str(store)], check=True)
        shutil.rmtree(work)
    print_table(times, size, args.rounds)
    return 0


def print_table(times: dict[str, list[tuple[float, float]]], size: int, rounds: int) -> None:
    """Wall-clock medians and their ratio to cp (the target), and CPU seconds: on a machine
    shared with other work the CPU ratio shows what the extra work costs regardless of load."""
    wall = {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(t[1] for t in runs) for name, runs in times.items()}
    print(
        f"{size >> 20} MiB, {rounds} rounds per algorithm, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'method':<14}{'wall s':>8}{'GB/s':>7}{'ratio':>7}{'target':>8}"
        f"{'cpu s':>8}{'cpu ratio':>10}  wall runs (s)"
    )
    for name, runs in times.items():
        label = name if name == "cp" else f"stage {name}"
        target = f"<= {TARGETS[name]}" if name in TARGETS else ""
        ratio = wall[name] / wall["cp"]
        verdict = "" if name == "cp" else ("  ok" if ratio <= TARGETS[name] else "  MISSED")
        print(
            f"{label:<14}{wall[name]:>8.3f}{size / wall[name] / 1e9:>7.2f}{ratio:>7.2f}"
            f"{target:>8}{cpu[name]:>8.3f}{cpu[name] / cpu['cp']:>10.2f}  "
            + " ".join(f"{t[0]:.2f}" for t in runs)
            + verdict
        )


if __name__ == "__main__":
    sys.exit(main())
