"""Where a fresh process's first GPU load goes, and what each way of copying gives (issue 16).

Run on purpose, as root on a machine with a GPU (docs/benchmarks.md has the command):

    python3 benchmarks/bench_gpu_first.py --out "$OUT"

The checkpoints of bench_gpu_peers.py (512 MiB and 4 GiB, .safetensors and .pth) are staged by
the daemon's copier into a huge=never and a huge=within_size tmpfs. Each variant then runs in
fresh processes forked from a server that imported only torch: the process creates its CUDA
context (not timed), times its first load by phase, then --warm more loads. Variants:

- fastload: the shipped pipeline (16 threads, READ_BYTES reads), with the time its ring spent
  faulting pages in and page-locking them, and when the last slot was ready; on .pth too.
- pthload: the parts of planning a .pth (mapping it, torch.load(mmap=True) alone, profiled).
- alloc: device allocation alone: a tensor each, one for the whole file, or one for the whole
  file freed first so that the caching allocator carves the tensors out of it.
- pageable: no pinned memory at all: copies from a mapping of the file (or from a buffer
  filled by preadv) into one device buffer, by 1-16 threads, each on its own stream.
  (Measured 5.5-9.5 GB/s whatever the threads, so fastload does not use it; see
  docs/benchmarks.md.)
- decompose: warm, the read side alone (preadv into pinned buffers) and the copy side alone
  (pinned buffers to the device), against the pipeline's warm load.
- ring: fastload's first and warm loads with 16 threads and 2-16 MiB reads (a ring of 32
  reads), the ring on huge pages or (thp=0) on 4 KiB pages.
- faults: fastload's first and warm loads with 1-16 threads faulting the ring in.
- sweep: fastload's warm load at 8/12/16 threads and 16/32 MiB reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

MiB = 1 << 20
DEV = os.environ.get("BENCH_DEVICE", "cuda:0")
CUDA = DEV.startswith("cuda")
pc = time.perf_counter


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def header(path: str) -> tuple[list[Any], int, int]:
    from ramstage.fastload.formats import read_safetensors_header

    entries = read_safetensors_header(Path(path))
    begin = min(e.file_offset for e in entries)
    return entries, begin, max(e.file_offset + e.nbytes for e in entries)


def s_fastload(path: str, p: dict, state: dict) -> tuple[dict, Any]:
    from ramstage import fastload
    from ramstage.fastload import formats, hostring, pipeline

    if "timers" not in state:
        state["timers"] = timers = {"fault": 0.0, "register": 0.0, "slots": 0}
        lock = threading.Lock()
        fault_in, register = hostring.fault_in, hostring.HostRing._lock

        def timed_fault_in(slot: Any) -> None:
            t0 = pc()
            fault_in(slot)
            with lock:
                timers["fault"] += pc() - t0

        def timed_lock(self: Any, slot: Any) -> None:
            t0 = pc()
            register(self, slot)
            with lock:
                timers["register"] += pc() - t0
                timers["slots"] += 1
                timers["ready_at"] = pc() - state["start"]

        hostring.fault_in = timed_fault_in  # type: ignore[assignment]
        hostring.HostRing._lock = timed_lock  # type: ignore[method-assign]
        if not p.get("thp", 1):
            hostring.MADV_HUGEPAGE = 0  # MADV_NORMAL: the ring on 4 KiB pages
        hostring.FAULT_WORKERS = p.get("fault_workers", hostring.FAULT_WORKERS)
    device = torch.device(DEV)
    state["start"] = t0 = pc()
    if CUDA:
        fastload._reserve(device, os.path.getsize(path))
    plan_of = formats.plan_safetensors if path.endswith(".safetensors") else formats.plan_torch_zip
    plan = plan_of(Path(path), device)
    t1 = pc()
    threads = p.get("threads", fastload.DEFAULT_THREADS)
    read = p.get("read_mib", fastload.READ_BYTES // MiB) * MiB
    if "ring" not in state:
        state["ring"] = pipeline.Ring(device, threads=threads, ring_bytes=2 * threads * read)
    t2 = pc()
    state["ring"].run(plan.segments)
    t3 = pc()
    result = plan.finish()
    sync()
    phases = {"plan": t1 - t0, "ring": t2 - t1, "run": t3 - t2, "finish": pc() - t3}
    phases.update({k: v for k, v in state["timers"].items()})
    state["timers"].update(fault=0.0, register=0.0, slots=0)
    return phases, result


def s_pthload(path: str, p: dict, state: dict) -> tuple[dict, Any]:
    """The parts of planning a .pth: mapping the file, torch.load(mmap=True) alone, and a
    profile of the latter's top functions."""
    import cProfile
    import io
    import pstats

    from ramstage.fastload.formats import FileMappings, check_byteorder

    t0 = pc()
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    del storage
    t1 = pc()
    profile = cProfile.Profile()
    profile.enable()
    loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    profile.disable()
    t2 = pc()
    del loaded
    check_byteorder(Path(path))
    t3 = pc()
    FileMappings(Path(path))._read_maps()
    t4 = pc()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(8)
    phases = {"from_file": t1 - t0, "torch_load": t2 - t1, "byteorder": t3 - t2, "maps": t4 - t3}
    return {**phases, "profile": text.getvalue()[-2500:]}, None


def s_alloc(path: str, p: dict, state: dict) -> tuple[dict, Any]:
    entries, _, _ = header(path)
    t0 = pc()
    if p["mode"] == "single":
        result: Any = torch.empty(sum(e.nbytes for e in entries), dtype=torch.uint8, device=DEV)
    else:
        if p["mode"] == "reserve":
            whole = sum(-(-e.nbytes // 512) * 512 for e in entries)
            del_me = torch.empty(whole, dtype=torch.uint8, device=DEV)
            del del_me
        result = [torch.empty(e.shape, dtype=e.dtype, device=DEV) for e in entries]
    sync()
    segments = torch.cuda.memory_stats().get("segment.all.current", -1) if CUDA else -1
    return {"alloc": pc() - t0, "segments": segments}, result


def s_pageable(path: str, p: dict, state: dict) -> tuple[dict, Any]:
    threads, chunk = p["threads"], p.get("chunk_mib", 16) * MiB
    t0 = pc()
    _, begin, end = header(path)
    target = torch.empty(end - begin, dtype=torch.uint8, device=DEV)
    t1 = pc()
    if "pool" not in state:
        state["pool"] = ThreadPoolExecutor(threads)
        state["local"] = threading.local()
    fd = os.open(path, os.O_RDONLY)
    mapped = _mapping(fd, bool(p.get("populate"))) if p["src"] == "map" else None
    t2 = pc()
    offsets = iter(range(begin, end, chunk))
    lock = threading.Lock()
    local = state["local"]

    def work() -> None:
        if CUDA:
            if not hasattr(local, "stream"):
                local.stream = torch.cuda.Stream()
            context: Any = torch.cuda.stream(local.stream)
        else:
            context = contextlib.nullcontext()
        with context:
            while True:
                with lock:
                    offset = next(offsets, None)
                if offset is None:
                    return
                n = min(chunk, end - offset)
                into = target[offset - begin : offset - begin + n]
                if mapped is None:
                    if not hasattr(local, "buffer"):
                        local.buffer = torch.empty(chunk, dtype=torch.uint8)
                    assert os.preadv(fd, [memoryview(local.buffer.numpy())[:n]], offset) == n
                into.copy_(
                    local.buffer[:n] if mapped is None else mapped[offset : offset + n],
                    non_blocking=True,
                )

    futures = [state["pool"].submit(work) for _ in range(threads)]
    for future in futures:
        future.result()
    sync()
    t3 = pc()
    os.close(fd)
    return {"alloc": t1 - t0, "map": t2 - t1, "copy": t3 - t2}, target


def _mapping(fd: int, populate: bool) -> torch.Tensor:
    flags = mmap.MAP_PRIVATE | (mmap.MAP_POPULATE if populate else 0)
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    return torch.frombuffer(mmap.mmap(fd, 0, flags=flags, prot=prot), dtype=torch.uint8)


def s_decompose(path: str, p: dict, state: dict) -> tuple[dict, Any]:
    threads, chunk = p["threads"], p.get("chunk_mib", 16) * MiB
    _, begin, end = header(path)
    if "pinned" not in state:
        state["pinned"] = torch.empty(2 * threads * chunk, dtype=torch.uint8, pin_memory=CUDA)
        state["target"] = torch.empty(end - begin, dtype=torch.uint8, device=DEV)
        state["pool"] = ThreadPoolExecutor(threads)
    pinned, target = state["pinned"], state["target"]
    slots = [pinned[i * chunk : (i + 1) * chunk] for i in range(2 * threads)]
    fd = os.open(path, os.O_RDONLY)
    offsets = iter(enumerate(range(begin, end, chunk)))
    lock = threading.Lock()

    def read() -> None:
        while True:
            with lock:
                item = next(offsets, None)
            if item is None:
                return
            index, offset = item
            n = min(chunk, end - offset)
            os.preadv(fd, [memoryview(slots[index % len(slots)].numpy())[:n]], offset)

    t0 = pc()
    for future in [state["pool"].submit(read) for _ in range(threads)]:
        future.result()
    t1 = pc()
    os.close(fd)
    stream = torch.cuda.Stream() if CUDA else None
    with torch.cuda.stream(stream) if CUDA else contextlib.nullcontext():
        for index, offset in enumerate(range(begin, end, chunk)):
            n = min(chunk, end - offset)
            dst = target[offset - begin : offset - begin + n]
            dst.copy_(slots[index % len(slots)][:n], non_blocking=True)
    sync()
    return {"read": t1 - t0, "copy": pc() - t1}, None


STRATEGIES: dict[str, Callable[[str, dict, dict], tuple[dict, Any]]] = {
    "fastload": s_fastload,
    "ring": s_fastload,  # the same, in the ring sizes' sweep (--only ring)
    "faults": s_fastload,  # the same, with 1-16 threads faulting the ring in (--only faults)
    "alloc": s_alloc,
    "pageable": s_pageable,
    "decompose": s_decompose,
    "pthload": s_pthload,
}


def child(strategy: str, path: str, params: dict, warm: int, check: bool) -> dict:
    """One fresh process: CUDA context (timed apart), the first load by phase, warm loads."""
    start = pc()
    torch.empty(1, device=DEV)
    sync()
    context_s = pc() - start
    state: dict = {}
    runs = []
    result = None
    for rep in range(1 + warm):
        del result
        start = pc()
        phases, result = STRATEGIES[strategy](path, params, state)
        sync()
        runs.append({"total": pc() - start, **phases})
        if rep == 0 and check:
            from peers import LOADERS, same

            reference = "load_file" if path.endswith(".safetensors") else "torch.load"
            runs[0]["identical"] = same(result, LOADERS[reference]()(path))
    return {"context_s": context_s, "runs": runs}


def stage(work: Path, sizes: dict[str, int]) -> dict[tuple[str, str, str], Path]:
    """Writes the checkpoints into a scratch tmpfs, then stages them with the daemon's copier
    into a huge=never and a huge=within_size store."""
    from bench_gpu_peers import make_checkpoint, stage_all
    from safetensors.torch import save_file

    sources = {}
    scratch = work / "scratch"
    mount(scratch, "size=50%,huge=never")  # a limit, not a reservation
    for label, nbytes in sizes.items():
        state = make_checkpoint(nbytes)
        stem = label.replace(" ", "")
        save_file(state, scratch / f"{stem}.safetensors")
        torch.save({**state, "lm_head.weight": state["embed.weight"]}, scratch / f"{stem}.pth")
        for fmt in ("safetensors", "pth"):
            sources[(label, fmt)] = scratch / f"{stem}.{fmt}"
    staged = stage_all(sources, work)
    subprocess.run(["umount", str(scratch)], check=True)
    return staged


def mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "bench", str(where)], check=True)


def tasks(samples: int, warm: int) -> list[tuple[str, str, dict, int, int, bool]]:
    """(strategy, format, params, processes, warm loads, check), most telling first."""
    st = "safetensors"
    out: list[tuple[str, str, dict, int, int, bool]] = [
        ("fastload", st, {}, samples, warm, True),
        ("fastload", "pth", {}, samples, warm, True),
        ("pthload", "pth", {}, samples, warm, False),
    ]
    out += [
        ("pageable", st, {"src": "map", "threads": t}, samples, warm, False) for t in (16, 8, 4, 1)
    ]
    out += [("pageable", st, {"src": "read", "threads": t}, samples, warm, False) for t in (16, 8)]
    out += [("pageable", st, {"src": "map", "threads": 16, "populate": 1}, samples, 0, False)]
    out += [
        ("alloc", st, {"mode": m}, samples, 0, False) for m in ("per_tensor", "single", "reserve")
    ]
    out += [("decompose", st, {"threads": t}, 1, warm, False) for t in (16, 8)]
    out += [
        ("ring", st, {"read_mib": r, "thp": thp}, samples, warm, False)
        for r, thp in ((16, 1), (8, 1), (4, 1), (2, 1), (16, 0), (4, 0))
    ]
    out += [("faults", st, {"fault_workers": w}, samples, warm, False) for w in (2, 16, 1, 4)]
    out += [
        ("fastload", st, {"threads": t, "read_mib": r}, 1, warm, False)
        for t in (8, 12, 16)
        for r in (16, 32)
    ]
    return out


def summarize(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        firsts = [s["runs"][0] for s in row["samples"]]
        warm = [r for r in row["samples"][0]["runs"][1:]]
        keys = [k for k in firsts[0] if k != "identical" and isinstance(firsts[0][k], (int, float))]

        def med(values: list[float], key: str) -> str:
            value = statistics.median(values)
            return f"{value * 1e3:.1f}" if key in TIMES else f"{value:g}"

        first = " ".join(f"{k}={med([f[k] for f in firsts], k)}" for k in keys)
        warm_total = f"{statistics.median(r['total'] for r in warm) * 1e3:.1f}" if warm else "-"
        warm_phases = (
            " ".join(f"{k}={med([r[k] for r in warm], k)}" for k in keys if k in TIMES)
            if warm
            else ""
        )
        ident = firsts[0].get("identical", "")
        lines.append(
            f"{row['name']:<40} {row['file']:<22} first[{first}] warm={warm_total} "
            f"[{warm_phases}] {ident}"
        )
    return lines


TIMES = {
    "from_file",
    "torch_load",
    "byteorder",
    "maps",
    "total",
    "plan",
    "ring",
    "run",
    "finish",
    "fault",
    "register",
    "ready_at",
    "alloc",
    "map",
    "copy",
    "read",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ramstage-first"))
    parser.add_argument("--sizes-mib", default="512,4096")
    parser.add_argument("--samples", type=int, default=3, help="fresh processes per cell")
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--only", default="", help="these variants only, e.g. fastload,pthload")
    parser.add_argument("--budget-s", type=float, default=500, help="skip what starts later")
    args = parser.parse_args()
    began = pc()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {
        f"{m} MiB" if m < 1024 else f"{m // 1024} GiB": m * MiB
        for m in (int(x) for x in args.sizes_mib.split(","))
    }
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "peers"])
    staged = stage(args.work, sizes)
    print(f"staged in {pc() - began:.0f} s", flush=True)
    rows = []
    log = open(args.out / "first.jsonl", "w")  # noqa: SIM115
    try:
        only = set(args.only.split(",")) - {""}
        for strategy, fmt, params, samples, warm, check in tasks(args.samples, args.warm):
            if only and strategy not in only:
                continue
            name = strategy + "".join(f" {k}={v}" for k, v in params.items())
            for (huge, label, f), path in staged.items():
                if f != fmt:
                    continue
                if pc() - began > args.budget_s:
                    print(f"skipped (time): {name} {label} {huge}", flush=True)
                    continue
                do_check = check and sizes[label] == min(sizes.values())
                results = []
                for index in range(samples):
                    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
                        n = warm if index == 0 else 0
                        c = do_check and index == 0 and CUDA
                        results.append(
                            pool.submit(child, strategy, str(path), params, n, c).result()
                        )
                row = {"name": name, "file": f"{label} {fmt} {huge}", "samples": results}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(summarize([row])[0], flush=True)
                if "profile" in results[0]["runs"][0]:
                    print(results[0]["runs"][0]["profile"], flush=True)
    finally:
        for huge in ("never", "within_size"):
            subprocess.run(["umount", str(args.work / f"store-{huge}")], check=False)
    print(f"\nall in {pc() - began:.0f} s\n" + "\n".join(summarize(rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
