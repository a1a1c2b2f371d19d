"""Staging with verification against plain `cp` and `dd`, side by side in one run (as root).

    .venv/bin/python benchmarks/bench_stage.py [--rounds 5] [--cases file,dir,throttled,cache]
        [--workers 2] [--huge never|within_size]

- file: a 1 GiB file, `cp` against staging with each checksum, into the same real tmpfs;
- dir: a 16-shard directory (4 GiB), `cp` run 2-wide (`xargs -P2`) against staging with
  `staging.workers` 2 (or each of --workers);
- throttled: a 256 MiB file on a loop device read through a 150 MB/s blkio throttle, `dd`
  against staging (each in the throttled cgroup, the page cache dropped before each run);
- cache: how much the page cache (Cached - Shmem) grew by staging the 4 GiB directory from a
  cold cache (the source's pages are dropped as they are copied).

For file and dir the source is read into the page cache before every run (staging drops it),
so both sides read from RAM and the figure is what verification costs on top of a copy. Runs
alternate (cp, stage, cp, stage, ...) so drift in the machine hits both alike; the tables show
medians and their ratio to cp or dd, and CPU seconds (all threads) with their ratio.
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
from collections.abc import Callable
from functools import partial
from pathlib import Path

from testbed import drop_caches, loop_filesystem, meminfo_bytes, throttles

from ramstage.copier import stage_source
from ramstage.digest import available_algorithms
from ramstage.store import remove_tree

# blake3 is measured beside the others; its issue sets it no target.
FILE_TARGETS: dict[str, float | None] = {"xxh3": 1.1, "sha256": 1.3, "blake3": None}
DIR_TARGET, THROTTLED_TARGET, CACHE_TARGET, CPU_TARGET = 1.1, 1.05, 0.05, 1.3
SHARDS, THROTTLE_BYTES_PER_S = 16, 150_000_000
Sample = tuple[float, float]  # wall seconds, CPU seconds


def write_source(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.writelines(offset.to_bytes(8, "little") + block[8:] for offset in range(0, size, 1 << 20))


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def timed(action: Callable[[], object]) -> Sample:
    cpu, start = cpu_seconds(), time.perf_counter()
    action()
    return time.perf_counter() - start, cpu_seconds() - cpu


def stage_into(store: Path, source: Path, algorithm: str, workers: int = 1) -> Callable[[], object]:
    def action() -> None:
        generation = store / "gen"
        generation.mkdir(mode=0o700)
        stage_source("bench", source, generation, algorithm, workers=workers)

    return action


def empty(store: Path) -> None:
    for entry in store.iterdir():
        remove_tree(entry)


def file_case(work: Path, store: Path, rounds: int) -> dict[str, list[Sample]]:
    source = work / "model.ckpt"
    write_source(source, 1 << 30)
    algorithms = [a for a in FILE_TARGETS if a in available_algorithms()]
    times: dict[str, list[Sample]] = {"cp": [], **{a: [] for a in algorithms}}
    for _ in range(rounds):
        for algorithm in algorithms:
            for name, action in (
                ("cp", lambda: subprocess.run(["cp", str(source), str(store)], check=True)),
                (algorithm, stage_into(store, source, algorithm)),
            ):
                warm([source])
                times[name].append(timed(action))
                empty(store)
    source.unlink()
    return times


def dir_case(work: Path, store: Path, rounds: int, workers: list[int]) -> dict[str, list[Sample]]:
    source = work / "shards"
    for index in range(SHARDS):
        write_source(source / f"model-{index:05d}-of-{SHARDS:05d}.safetensors", 256 << 20)
    shards = sorted(source.iterdir())
    command = f"cd {source} && ls | xargs -P2 -I{{}} cp {{}} {store}/"
    runs: list[tuple[str, Callable[[], object]]] = [
        ("cp -P2", lambda: subprocess.run(["sh", "-c", command], check=True))
    ]
    runs += [(f"xxh3, {n} workers", stage_into(store, source, "xxh3", workers=n)) for n in workers]
    times: dict[str, list[Sample]] = {name: [] for name, _ in runs}
    for _ in range(rounds):
        for name, action in runs:
            warm(shards)
            times[name].append(timed(action))
            empty(store)
    return times


def cache_case(work: Path, store: Path) -> tuple[float, float]:
    """Staging the 4 GiB directory from a cold cache: how much Cached - Shmem grew, and how
    much of the sources stayed in the page cache (fincore), each as a fraction of its size.
    The first counts every process on the machine; the second is ramstage's own part."""
    drop_caches()
    before = meminfo_bytes("Cached") - meminfo_bytes("Shmem")
    stage_into(store, work / "shards", "xxh3", workers=2)()
    growth = meminfo_bytes("Cached") - meminfo_bytes("Shmem") - before
    shards = sorted(str(p) for p in (work / "shards").iterdir())
    resident = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *shards],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    empty(store)
    size = SHARDS * (256 << 20)
    return growth / size, sum(map(int, resident)) / size


STAGE_IN_CHILD = """
import resource, sys, time
from pathlib import Path
from ramstage.copier import stage_source
start = time.perf_counter()
stage_source("bench", Path(sys.argv[1]), Path(sys.argv[2]), "xxh3")
usage = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
"""


def throttled_case(work: Path, store: Path, rounds: int) -> dict[str, list[Sample]]:
    """dd and staging, each in a child that joins the throttled cgroup first. The staging child
    times itself, from its call to its return: Python's start is not the copy's."""
    times: dict[str, list[Sample]] = {"dd": [], "xxh3": []}
    with loop_filesystem(work / "disk.img", 512 << 20, work / "disk") as device:
        source = work / "disk" / "model.ckpt"
        write_source(source, 256 << 20)
        with throttles(device, {"disk": THROTTLE_BYTES_PER_S}) as groups:
            join = f"echo $$ > {groups['disk']}/cgroup.procs && exec"
            dd = f"{join} dd if={source} of={store}/dd bs=1M status=none"
            stage = f"{join} {sys.executable} -c '{STAGE_IN_CHILD}' {source} {store}/gen"
            for _ in range(rounds):
                drop_caches()
                times["dd"].append(timed(partial(subprocess.run, ["sh", "-c", dd], check=True)))
                empty(store)
                drop_caches()
                (store / "gen").mkdir(mode=0o700)
                result = subprocess.run(
                    ["sh", "-c", stage], check=True, capture_output=True, text=True
                )
                wall, cpu = map(float, result.stdout.split())
                times["xxh3"].append((wall, cpu))
                empty(store)
    return times


def medians(times: dict[str, list[Sample]], field: int) -> dict[str, float]:
    """Each method's median wall (field 0) or CPU (field 1) seconds."""
    return {name: statistics.median(t[field] for t in runs) for name, runs in times.items()}


def print_table(
    title: str, times: dict[str, list[Sample]], size: int, targets: dict[str, float | None]
) -> None:
    base = next(iter(times))
    wall, cpu = medians(times, 0), medians(times, 1)
    print(f"\n{title}")
    print(
        f"{'method':<18}{'wall s':>8}{'MB/s':>8}{'ratio':>7}{'target':>8}{'cpu s':>8}"
        f"{'cpu ratio':>10}  runs (s)"
    )
    for name, runs in times.items():
        ratio = wall[name] / wall[base]
        target = targets.get(name)
        verdict = "" if target is None else ("  ok" if ratio <= target else "  MISSED")
        print(
            f"{name:<18}{wall[name]:>8.3f}{size / wall[name] / 1e6:>8.0f}{ratio:>7.2f}"
            f"{'<= ' + str(target) if target else '':>8}{cpu[name]:>8.3f}"
            f"{cpu[name] / cpu[base]:>10.2f}  " + " ".join(f"{t[0]:.2f}" for t in runs) + verdict
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default="file,dir,cache,throttled")
    parser.add_argument("--dir", default="/var/tmp", help="where the sources go")
    parser.add_argument(
        "--huge",
        default="never",
        choices=("never", "within_size"),
        help="the store's huge= option (never: see 'Staging into a huge-page store' in "
        "docs/benchmarks.md)",
    )
    parser.add_argument(
        "--workers", default="2", help="dir: staging.workers values to run, as 1,2,4"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_stage.py mounts a tmpfs and a loop device: run it as root", file=sys.stderr)
        return 2
    cases = set(args.cases.split(","))
    work = Path(tempfile.mkdtemp(prefix="ramstage-bench-", dir=args.dir))
    store = work / "store"
    store.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size=5G,noswap,huge={args.huge}", "bench", str(store)],
        check=True,
    )
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} at the start, store huge={args.huge}")
    try:
        if "file" in cases:
            times = file_case(work, store, args.rounds)
            print_table("1 GiB file, stage / cp", times, 1 << 30, FILE_TARGETS)
            cpu = medians(times, 1)
            ratio = cpu["xxh3"] / cpu["cp"]
            verdict = "ok" if ratio <= CPU_TARGET else "MISSED"
            print(f"CPU seconds per GiB, xxh3 over cp's: {ratio:.2f} (<= {CPU_TARGET}) {verdict}")
        if cases & {"dir", "cache"}:
            workers = [int(n) for n in args.workers.split(",")]
            times = dir_case(work, store, args.rounds, workers)
            print_table(
                "16-shard directory (4 GiB), stage / cp -P2",
                times,
                4 << 30,
                {"xxh3, 2 workers": DIR_TARGET},
            )
            if "cache" in cases:
                growth, resident = cache_case(work, store)
                verdict = "ok" if max(growth, resident) <= CACHE_TARGET else "MISSED"
                print(
                    f"\nstaging 4 GiB from a cold cache: Cached - Shmem grew {growth:.1%}, the "
                    f"sources left {resident:.1%} in the page cache (target <= 5%) {verdict}"
                )
        if "throttled" in cases:
            times = throttled_case(work, store, args.rounds)
            print_table(
                "256 MiB at 150 MB/s (blkio), stage / dd",
                times,
                256 << 20,
                {"xxh3": THROTTLED_TARGET},
            )
    finally:
        subprocess.run(["umount", str(store)], check=True)
        shutil.rmtree(work)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
