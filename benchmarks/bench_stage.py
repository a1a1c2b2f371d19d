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
        for offset in range(0, size, 1 << 20):
            f.write(offset.to_bytes(8, "little") + block[8:])


def time_cp(source: Path, store: Path) -> float:
    target = store / "cp" / source.name
    target.parent.mkdir()
    start = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    elapsed = time.perf_counter() - start
    remove_tree(target.parent)
    return elapsed


def time_stage(source: Path, store: Path, algorithm: str) -> float:
    generation = store / "gen"
    generation.mkdir()
    start = time.perf_counter()
    stage_source("bench", source, generation, algorithm)
    elapsed = time.perf_counter() - start
    remove_tree(generation)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the source file goes (default: /var/tmp)")
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
        times: dict[str, list[float]] = {"cp": [], **{a: [] for a in algorithms}}
        for _ in range(args.rounds):
            for algorithm in algorithms:
                times["cp"].append(time_cp(source, store))
                times[algorithm].append(time_stage(source, store, algorithm))
    finally:
        subprocess.run(["umount", str(store)], check=True)
        shutil.rmtree(work)

    cp = statistics.median(times["cp"])
    print(f"{args.size_mib} MiB, {args.rounds} rounds per algorithm, {os.cpu_count()} CPUs")
    print(f"{'method':<16}{'median s':>10}{'GB/s':>8}{'ratio':>8}{'target':>8}  runs (s)")
    print(f"{'cp':<16}{cp:>10.3f}{size / cp / 1e9:>8.2f}{1.0:>8.2f}{'':>8}  "
          + " ".join(f"{t:.3f}" for t in times["cp"]))
    for algorithm in algorithms:
        median = statistics.median(times[algorithm])
        ratio = median / cp
        verdict = "ok" if ratio <= TARGETS[algorithm] else "MISSED"
        print(
            f"{'stage ' + algorithm:<16}{median:>10.3f}{size / median / 1e9:>8.2f}{ratio:>8.2f}"
            f"{'<= ' + str(TARGETS[algorithm]):>8}  "
            + " ".join(f"{t:.3f}" for t in times[algorithm])
            + f"  {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
