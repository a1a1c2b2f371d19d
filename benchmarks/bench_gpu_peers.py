"""ramstage.fastload against its peers, every cell of issue 16 in one process tree.

Run on purpose, as root on a machine with a GPU, with the peers' wheels installed
(benchmarks/fetch_peer_wheels.sh; the exact command is in docs/benchmarks.md):

    python3 benchmarks/bench_gpu_peers.py --out "$OUT"

Checkpoints like a mid-sized transformer (bf16 matrices, fp32 norms; the .pth ties its output
layer to the embedding) of 512 MiB and 4 GiB are staged with the daemon's own copier
(ramstage.copier.stage_source) into two tmpfs mounts, huge=never and huge=within_size. Each
loader then runs in fresh processes forked from a server that imported only torch (and peers.py):
the first load of each process is a first-call sample (CUDA context creation timed apart), the
two loads after it are warm samples, and the first of fastload's processes compares its result
with the plain loader's, bit for bit. The loaders of one checkpoint take turns, one process each,
--reps times. Last, 2 and 4 processes load one model at once, rounds started together.
fastload keeps its host ring in a ring file on a tmpfs mounted as the daemon mounts its rings
(ramstage/rings.py), made by one process before the samples, as after a machine's first load;
--no-rings leaves that out (rings of fresh memory in every process).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from peers import DEVICE, LOADERS, same, sync

MiB = 1 << 20
SIZES = {"512 MiB": 512 * MiB, "4 GiB": 4096 * MiB}
STORES = ("never", "within_size")
SAFETENSORS_LOADERS = ("fastload", "fsst-new", "runai", "load_file")
PTH_LOADERS = ("fastload", "torch.load")
KEPT_BUFFERS_MIB = (16, 256, 512)
WARM_PER_PROCESS = 2  # loads after the first in each process: the warm samples


def ensure_cudart_link(work: Path) -> None:
    """fastsafetensors dlopens plain libcudart.so, which only torch's versioned copy provides;
    the loader reads LD_LIBRARY_PATH at start, so the process restarts itself with a link."""
    link_dir = work / "cudart"
    if str(link_dir) in os.environ.get("LD_LIBRARY_PATH", ""):
        return
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.origin is not None
    site = Path(spec.origin).parent.parent
    found = sorted(glob.glob(f"{site}/nvidia/**/libcudart.so.*", recursive=True))
    found += sorted(glob.glob(f"{site}/torch/lib/libcudart*.so*"))
    if not found:
        raise SystemExit("no libcudart.so.* next to torch")
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / "libcudart.so").unlink(missing_ok=True)
    (link_dir / "libcudart.so").symlink_to(found[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{link_dir}:{env.get('LD_LIBRARY_PATH', '')}"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def make_checkpoint(nbytes: int) -> dict[str, torch.Tensor]:
    """Layers of bf16 attention and MLP matrices and fp32 norms until about nbytes."""
    hidden, inner = (3072, 8192) if nbytes > 1 << 30 else (1536, 4096)
    state = {"embed.weight": torch.randn(16384, hidden, dtype=torch.bfloat16)}
    layer = 0
    while sum(t.nbytes for t in state.values()) < nbytes - 4 * hidden * hidden * 2:
        p = f"layers.{layer}."
        for name in ("q", "k", "v", "o"):
            state[p + f"attn.{name}.weight"] = torch.randn(hidden, hidden, dtype=torch.bfloat16)
        state[p + "mlp.up.weight"] = torch.randn(inner, hidden, dtype=torch.bfloat16)
        state[p + "mlp.gate.weight"] = torch.randn(inner, hidden, dtype=torch.bfloat16)
        state[p + "mlp.down.weight"] = torch.randn(hidden, inner, dtype=torch.bfloat16)
        state[p + "norm1.weight"] = torch.randn(hidden)
        state[p + "norm2.weight"] = torch.randn(hidden)
        layer += 1
    state["norm.weight"] = torch.randn(hidden)
    return state


def write_sources(disk: Path) -> dict[tuple[str, str], Path]:
    from safetensors.torch import save_file

    sources = {}
    for label, nbytes in SIZES.items():
        state = make_checkpoint(nbytes)
        stem = label.replace(" ", "")
        save_file(state, disk / f"{stem}.safetensors")
        torch.save({**state, "lm_head.weight": state["embed.weight"]}, disk / f"{stem}.pth")
        sources[(label, "safetensors")] = disk / f"{stem}.safetensors"
        sources[(label, "pth")] = disk / f"{stem}.pth"
    return sources


def stage_all(sources: dict[tuple[str, str], Path], work: Path) -> dict[tuple, Path]:
    """Mounts the two stores and stages every source into each with the daemon's copier."""
    from ramstage.copier import stage_source

    total = sum(p.stat().st_size for p in sources.values())
    staged: dict[tuple, Path] = {}
    jobs = []
    for huge in STORES:
        mount = work / f"store-{huge}"
        mount.mkdir(parents=True, exist_ok=True)
        options = f"size={int(total * 1.1)},huge={huge}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "ramstage", mount], check=True)
        for (label, fmt), source in sources.items():
            generation = mount / f"{source.name}.gen"
            generation.mkdir()
            jobs.append((source, generation))
            staged[(huge, label, fmt)] = generation / source.name
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: stage_source(job[0].name, job[0], job[1], "sha256"), jobs))
    return staged


def mount_rings(work: Path) -> Path:
    """The rings' tmpfs as the daemon mounts it beside its store (store.rings, default 1G: the
    store's own Tmpfs for it), for the fast loader of every process started from here."""
    from ramstage.config import StoreConfig
    from ramstage.store import Store
    from ramstage.system import System

    rings = Store(StoreConfig(path=work / "store-rings"), System()).rings
    rings.prepare()
    os.environ["RAMSTAGE_RINGS"] = str(rings.path)
    return rings.path


def meminfo() -> dict[str, str]:
    keep = ("Shmem", "ShmemHugePages", "ShmemPmdMapped")
    lines = Path("/proc/meminfo").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines) if k in keep}


def cell(loader: str, path: str, warm_reps: int, check: bool, env: dict[str, str]) -> dict:
    """One fresh process: CUDA context, first load, then maybe warm loads and the bit check."""
    os.environ.update(env)
    load = LOADERS[loader]()
    start = time.perf_counter()
    torch.empty(1, device=DEVICE)
    sync()
    context_s = time.perf_counter() - start
    runs = []
    for _ in range(1 + warm_reps):
        start = time.perf_counter()
        result = load(path)
        sync()
        runs.append(time.perf_counter() - start)
        del result
    identical = None
    if check:
        reference = "load_file" if path.endswith(".safetensors") else "torch.load"
        identical = same(load(path), LOADERS[reference]()(path))
    return {"context_s": context_s, "first_s": runs[0], "warm_s": runs[1:], "identical": identical}


def sweep(path: str, threads: list[int], rings_mib: list[int], reps: int) -> list[dict]:
    """fastload's settings on one file: the first load of a new Loader (its ring is locked
    then), and warm loads after it."""
    from ramstage import fastload

    torch.empty(1, device=DEVICE)
    results = []
    for n in threads:
        for ring in rings_mib:
            loader = fastload.Loader()
            runs = []
            for _ in range(reps + 1):
                start = time.perf_counter()
                result = loader.load(path, DEVICE, threads=n, ring_bytes=ring * MiB)
                sync()
                runs.append(time.perf_counter() - start)
                del result
            loader.release()
            results.append({"threads": n, "ring_mib": ring, "first_s": runs[0], "runs_s": runs[1:]})
    return results


def ceiling(nbytes: int, reps: int) -> list[float]:
    """A pinned host-to-device copy of nbytes alone: the PCIe ceiling."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    target = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        sync()
        runs.append(time.perf_counter() - start)
    return runs


def worker(path: str, rounds: int, env: dict[str, str], barrier: Any, results: Any) -> None:
    os.environ.update(env)
    load = LOADERS["fastload"]()
    load(path)  # warm: context, threads and device memory in the caching allocator
    sync()
    for index in range(rounds):
        barrier.wait()
        start = time.monotonic()
        result = load(path)
        sync()
        results.put((index, start, time.monotonic()))
        del result


def concurrent(ctx: Any, path: str, processes: int, rounds: int, env: dict) -> list[float]:
    """Seconds from the first process's start to the last one's end, per round."""
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(path, rounds, env, barrier, results))
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    ends: dict[int, list[tuple[float, float]]] = {}
    for _ in range(processes * rounds):
        index, start, end = results.get(timeout=300)
        ends.setdefault(index, []).append((start, end))
    for proc in procs:
        proc.join()
    return [max(e for _, e in v) - min(s for s, _ in v) for _, v in sorted(ends.items())]


def fresh(pool_factory: Callable[[], ProcessPoolExecutor], fn: Callable, *args: Any) -> Any:
    with pool_factory() as pool:
        return pool.submit(fn, *args).result()


def run_cells(
    new_pool: Callable, staged: dict, reps: int, log: Callable, only: set[str]
) -> list[dict]:
    """Each checkpoint's loaders in turn, a fresh process each, for reps rounds (every other
    round in reverse order): a slow minute of a noisy machine falls on all of them alike."""
    rows = []
    for (huge, label, fmt), path in staged.items():
        names = SAFETENSORS_LOADERS if fmt == "safetensors" else PTH_LOADERS
        variants: dict[str, tuple[str, dict[str, str]]] = {
            n: (n, {}) for n in names if not only or n in only
        }
        if fmt == "safetensors" and (not only or "fsst-kept" in only):
            for mib in KEPT_BUFFERS_MIB:
                env = {"BENCH_FSST_BBUF_MIB": str(mib)}
                variants[f"fsst-kept-{mib}MiB"] = ("fsst-kept", env)
        samples: dict[str, list[dict]] = {name: [] for name in variants}
        for round_ in range(reps):
            for name in list(variants)[:: 1 if round_ % 2 == 0 else -1]:
                loader, env = variants[name]
                check = round_ == 0 and name.startswith("fastload")
                sample = fresh(new_pool, cell, loader, str(path), WARM_PER_PROCESS, check, env)
                samples[name].append(sample)
        for name, taken in samples.items():
            rows.append(summarize(huge, label, fmt, name, path, taken))
            log(rows[-1])
    return rows


def summarize(huge: str, label: str, fmt: str, name: str, path: Path, samples: list) -> dict:
    nbytes = path.stat().st_size
    warm = [run for s in samples for run in s["warm_s"]]
    return {
        "store": huge,
        "size": label,
        "format": fmt,
        "loader": name,
        "bytes": nbytes,
        "first_s": statistics.median(s["first_s"] for s in samples),
        "first_runs_s": [s["first_s"] for s in samples],
        "warm_s": statistics.median(warm),
        "warm_runs_s": warm,
        "context_s": statistics.median(s["context_s"] for s in samples),
        "identical": samples[0]["identical"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ramstage-peers"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--sweep-threads", default="", help="e.g. 8,12,16 (default: no sweep)")
    parser.add_argument("--sweep-rings-mib", default="256,512")
    parser.add_argument("--loaders", default="", help="only these loaders (default: all)")
    parser.add_argument("--workers", default="2,4", help="process counts loading at once")
    parser.add_argument(
        "--no-rings", action="store_true", help="fastload's rings of fresh memory, no ring files"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ensure_cudart_link(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "peers"])

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1)

    report: dict[str, Any] = {"argv": sys.argv, "started": time.time()}
    logfile = open(args.out / "bench_gpu_peers.log", "a")  # noqa: SIM115

    def log(item: Any) -> None:
        line = json.dumps(item)
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    disk = args.work / "disk"
    disk.mkdir(exist_ok=True)
    staged = stage_all(write_sources(disk), args.work)
    ring_dir = None if args.no_rings else mount_rings(args.work)
    try:
        report["meminfo_after_staging"] = meminfo()
        log(report["meminfo_after_staging"])
        report["env"] = fresh(new_pool, environment)
        log(report["env"])
        if ring_dir is not None:
            # The first process after a boot makes the ring file; the samples are the restarts
            # after it, which find the file there.
            path = str(staged[("never", "512 MiB", "safetensors")])
            report["ring_file_made"] = fresh(new_pool, cell, "fastload", path, 0, False, {})
            log(report["ring_file_made"])
        report["ceiling"] = {
            label: fresh(new_pool, ceiling, nbytes, args.reps) for label, nbytes in SIZES.items()
        }
        log(report["ceiling"])
        if args.sweep_threads:
            threads = [int(t) for t in args.sweep_threads.split(",")]
            rings = [int(r) for r in args.sweep_rings_mib.split(",")]
            report["sweep"] = {
                (f"{huge} {label}"): fresh(
                    new_pool, sweep, str(staged[(huge, label, "safetensors")]), threads, rings, 3
                )
                for huge in STORES
                for label in SIZES
            }
            log(report["sweep"])
        only = set(args.loaders.split(",")) - {""}
        report["rows"] = run_cells(new_pool, staged, args.reps, log, only)
        report["workers"] = []
        for huge in STORES:
            path = str(staged[(huge, "4 GiB", "safetensors")])
            for n in (int(w) for w in args.workers.split(",") if w):
                # As torchrun would set it; fastload sizes its threads by it.
                rounds = concurrent(ctx, path, n, args.reps, {"LOCAL_WORLD_SIZE": str(n)})
                entry = {"store": huge, "processes": n, "sized": True, "rounds_s": rounds}
                report["workers"].append(entry)
                log(entry)
    finally:
        for mount in [*(args.work / f"store-{huge}" for huge in STORES), ring_dir]:
            if mount is not None:
                subprocess.run(["umount", str(mount)], check=False)
    (args.out / "bench_gpu_peers.json").write_text(json.dumps(report, indent=1))
    from peers_report import markdown

    text = markdown(report)
    (args.out / "bench_gpu_peers.md").write_text(text)
    print(text)
    return 0 if all(r["identical"] is not False for r in report["rows"]) else 1


def environment() -> dict[str, Any]:
    from ramstage.fastload import native
    from ramstage.fastload.stream import copy_stream

    thp = Path("/sys/kernel/mm/transparent_hugepage")
    torch.cuda.init()  # the driver initialised, as the ring's host memory has it before
    stream, free_stream = copy_stream(torch.device(DEVICE))
    free_stream()
    return {
        # ExternalStream: made by the driver; Stream: torch's pool (the slower first call)
        "fastload_copy_stream": type(stream).__name__,
        # the C copy loop (setup.py built it), else the Python loop
        "fastload_copy_loop": "C" if native.LIBRARY is not None else "Python",
        "gpu": torch.cuda.get_device_name(DEVICE),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": len(os.sched_getaffinity(0)),
        "kernel": os.uname().release,
        "thp_enabled": (thp / "enabled").read_text().strip(),
        "thp_shmem_enabled": (thp / "shmem_enabled").read_text().strip(),
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    raise SystemExit(main())
