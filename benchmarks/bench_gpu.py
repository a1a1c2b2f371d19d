"""How fast a checkpoint reaches GPU memory: ramstage.fastload vs torch.load, tmpfs vs disk.

Run on purpose, as root on a machine with a GPU (it mounts two tmpfs and drops the page cache):

    python3 benchmarks/bench_gpu.py --out "$OUT"

For each size (512 MiB, 4 GiB) and format (.safetensors, .pth) it reports medians of --reps runs:
fastload.load(device) from a tmpfs copy (tmpfs mounted huge=never and huge=within_size), the
plain loader (torch.load(map_location=device); safetensors.torch.load_file for .safetensors)
from the same tmpfs file, the plain loader from disk with the page cache dropped, and a pinned
host-to-device copy of the same bytes alone (the PCIe limit). First a sweep over threads and
ring size picks the configuration the rest uses. Every fastload result is compared with the
plain loader's (torch.equal, dtype, strides, shared storages); any difference fails the run.

A dry run without a GPU or root: --device cpu --sizes 8M --reps 2 --no-mount --no-drop
(the CPU target of the same pipeline, plain directories instead of tmpfs mounts).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ramstage import fastload

MiB = 1 << 20
UNITS = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
LAYER_SHAPE = (1024, 4096)  # 16 MiB of fp32 per weight, as in a mid-sized transformer


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * UNITS[text[-1].upper()]) if text[-1].isalpha() else int(text)


def make_state_dict(nbytes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """fp32 weights and biases adding up to about nbytes, and one tied weight pair."""
    rows, cols = LAYER_SHAPE
    if nbytes < rows * cols * 4 * 4:
        rows = max(1, nbytes // (cols * 4 * 8))
    state: dict[str, torch.Tensor] = {}
    generator_device = device if device.type == "cuda" else torch.device("cpu")
    layer = 0
    while sum(t.nbytes for t in state.values()) + rows * cols * 4 <= nbytes:
        weight = torch.randn(rows, cols, device=generator_device).cpu()
        state[f"layers.{layer}.weight"] = weight
        state[f"layers.{layer}.bias"] = torch.randn(rows, device=generator_device).cpu()
        layer += 1
    state["lm_head.weight"] = state["layers.0.weight"]  # tied: one storage in the .pth
    return state


def write_checkpoints(nbytes: int, directory: Path, device: torch.device) -> dict[str, Path]:
    state = make_state_dict(nbytes, device)
    label = f"{nbytes // MiB}MiB"
    pth, safetensors = directory / f"{label}.pth", directory / f"{label}.safetensors"
    torch.save(state, pth)
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, safetensors)
    return {"pth": pth, "safetensors": safetensors}


def plain_load(path: Path, device: torch.device) -> Any:
    if path.suffix == ".safetensors":
        return load_file(path, device=str(device))
    return torch.load(path, map_location=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], Any], device: torch.device, reps: int, before: Callable[[], None] | None = None
) -> list[float]:
    seconds = []
    for _ in range(reps):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
        del result
        gc.collect()
    return seconds


def same(a: Any, b: Any) -> bool:
    """Bit-identical tensors with the same layout, and the same storage sharing, key by key."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if not (
            x.dtype == y.dtype
            and x.shape == y.shape
            and x.stride() == y.stride()
            and x.storage_offset() == y.storage_offset()
            and x.device == y.device
            and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        ):
            return False
    owners_a = {k: a[k].untyped_storage().data_ptr() for k in a}
    owners_b = {k: b[k].untyped_storage().data_ptr() for k in b}
    return all((owners_a[j] == owners_a[k]) == (owners_b[j] == owners_b[k]) for j in a for k in a)


def drop_caches(enabled: bool) -> Callable[[], None]:
    def drop() -> None:
        os.sync()
        if enabled:
            Path("/proc/sys/vm/drop_caches").write_text("3")

    return drop


def mount_tmpfs(root: Path, huge: str, size_bytes: int, mount: bool) -> Path:
    target = root / f"tmpfs-huge-{huge}"
    target.mkdir(parents=True, exist_ok=True)
    if mount:
        subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={size_bytes},huge={huge}",
                "ramstage-bench",
                str(target),
            ],
            check=True,
        )
    return target


def meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def vmstat(field: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == field:
            return int(value)
    return -1


def pinned_copy_seconds(nbytes: int, device: torch.device, reps: int) -> list[float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda").fill_(1)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return timed(lambda: target.copy_(host, non_blocking=True), device, reps)


def sweep(
    path: Path, device: torch.device, reps: int, threads: list[int], rings: list[int]
) -> list[dict[str, Any]]:
    results = []
    for n in threads:
        for ring in rings:
            loader = fastload.Loader(pipeline_on_cpu=device.type == "cpu")

            def once(loader: fastload.Loader = loader, n: int = n, ring: int = ring) -> Any:
                return loader.load(path, device, threads=n, ring_bytes=ring)

            first = timed(once, device, 1)[0]
            runs = timed(once, device, reps)
            loader.release()
            results.append(
                {
                    "threads": n,
                    "ring_bytes": ring,
                    "median_s": statistics.median(runs),
                    "first_call_s": first,
                    "runs_s": runs,
                }
            )
            print(
                f"sweep threads={n:2d} ring={ring // MiB:4d}MiB "
                f"median={results[-1]['median_s'] * 1e3:8.1f} ms first={first * 1e3:8.1f} ms",
                flush=True,
            )
    return results


def row(
    rows: list[dict[str, Any]],
    checkpoint: str,
    what: str,
    nbytes: int,
    runs: list[float],
    **extra: Any,
) -> None:
    median = statistics.median(runs)
    rows.append(
        {
            "checkpoint": checkpoint,
            "path": what,
            "bytes": nbytes,
            "median_s": median,
            "gb_per_s": nbytes / median / 1e9,
            "runs_s": runs,
            **extra,
        }
    )
    print(
        f"{checkpoint:24s} {what:58s} {median * 1e3:9.1f} ms {nbytes / median / 1e9:6.2f} GB/s",
        flush=True,
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| checkpoint | path to the device | median ms | GB/s | × plain load, same tmpfs |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else ""
        lines.append(
            f"| {r['checkpoint']} | {r['path']} | {r['median_s'] * 1e3:.1f} "
            f"| {r['gb_per_s']:.2f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="512M,4G")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", default="4,8,12,16", help="sweep: reader thread counts")
    parser.add_argument("--rings", default="64M,128M,256M,512M", help="sweep: ring sizes")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/var/tmp/ramstage-bench"),
        help="disk directory for the checkpoints and the tmpfs mount points",
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--no-mount", action="store_true", help="plain directories, no tmpfs")
    parser.add_argument("--no-drop", action="store_true", help="do not drop the page cache")
    args = parser.parse_args()

    device = torch.device(args.device)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    cpus = os.cpu_count() or 1
    threads = sorted({min(int(t), cpus) for t in args.threads.split(",")})
    rings = [parse_size(s) for s in args.rings.split(",")]
    disk = args.work / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tmpfs_bytes = int(sum(sizes) * 2.2) + 256 * MiB
    mounts = {
        huge: mount_tmpfs(args.work, huge, tmpfs_bytes, not args.no_mount)
        for huge in ("never", "within_size")
    }
    shmem_enabled = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    env = {
        "torch": torch.__version__,
        "cpus": cpus,
        "kernel": platform.release(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "shmem_enabled": shmem_enabled.read_text().strip() if shmem_enabled.exists() else "",
        "page_cache_dropped": not args.no_drop,
    }
    print(json.dumps(env), flush=True)
    rows: list[dict[str, Any]] = []
    identical = True
    try:
        files = {}
        for nbytes in sizes:
            for fmt, path in write_checkpoints(nbytes, disk, device).items():
                files[(nbytes, fmt)] = {"disk": path}
                for huge, mount in mounts.items():
                    before = vmstat("thp_file_alloc")
                    shutil.copyfile(path, mount / path.name)
                    files[(nbytes, fmt)][huge] = mount / path.name
                    env[f"thp_file_alloc_{huge}_{path.name}"] = vmstat("thp_file_alloc") - before
        env["meminfo_kib"] = {
            f: meminfo_kib(f)
            for f in ("Shmem", "ShmemHugePages", "ShmemPmdMapped", "FileHugePages")
        }
        largest = max(sizes)
        sweep_path = files[(largest, "safetensors")]["within_size"]
        sweep_results = sweep(sweep_path, device, args.reps, threads, rings)
        best = min(sweep_results, key=lambda r: r["median_s"])
        chosen = {"threads": best["threads"], "ring_bytes": best["ring_bytes"]}
        print(f"chosen: {chosen}", flush=True)
        loader = fastload.Loader(pipeline_on_cpu=device.type == "cpu")

        def fast(p: Path) -> Any:
            return loader.load(p, device, **chosen)

        for nbytes in sizes:
            copy_runs = pinned_copy_seconds(nbytes, device, args.reps)
            row(rows, f"{nbytes // MiB} MiB", "pinned host-to-device copy alone", nbytes, copy_runs)
            for fmt in ("safetensors", "pth"):
                paths = files[(nbytes, fmt)]
                size = paths["disk"].stat().st_size
                name = f"{nbytes // MiB} MiB .{fmt}"
                plain = "safetensors load_file" if fmt == "safetensors" else "torch.load"
                for huge in mounts:
                    p = paths[huge]
                    fast(p)  # warm: the ring is allocated once per process
                    plain_runs = timed(lambda p=p: plain_load(p, device), device, args.reps)
                    fast_runs = timed(lambda p=p: fast(p), device, args.reps)
                    ok = same(fast(p), plain_load(p, device))
                    identical &= ok
                    row(rows, name, f"{plain} from tmpfs huge={huge}", size, plain_runs)
                    row(
                        rows,
                        name,
                        f"fastload.load from tmpfs huge={huge}",
                        size,
                        fast_runs,
                        ratio=statistics.median(fast_runs) / statistics.median(plain_runs),
                        identical=ok,
                    )
                cold = timed(
                    lambda p=paths["disk"]: plain_load(p, device),
                    device,
                    args.reps,
                    before=drop_caches(not args.no_drop),
                )
                row(rows, name, f"{plain} from disk, page cache dropped", size, cold)
        loader.release()
        first = timed(lambda: fast(files[(largest, "safetensors")]["within_size"]), device, 1)
        env["first_call_with_ring_allocation_s"] = first[0]
    finally:
        if not args.no_mount:
            for mount in mounts.values():
                subprocess.run(["umount", str(mount)], check=False)
    table = markdown(rows)
    print(table)
    result = {
        "env": env,
        "sweep": sweep_results,
        "chosen": chosen,
        "rows": rows,
        "identical": identical,
    }
    (args.out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "bench_gpu.md").write_text(table)
    print("bit-identical to the plain loader:", identical)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
