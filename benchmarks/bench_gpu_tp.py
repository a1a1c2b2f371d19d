"""N GPUs of one host filled at once from one staged model, one process per GPU (issue 18).

Run on purpose, as root, on a machine with 2, 4 or 8 GPUs and the peers' wheels installed
(benchmarks/fetch_peer_wheels.sh; the exact command is in docs/benchmarks.md):

    python3 benchmarks/bench_gpu_tp.py --gpus 8 --out "$OUT"
    python3 benchmarks/bench_gpu_tp.py --dry-run   # the same plumbing, CPU as target, 64 MiB

A transformer-like model (bf16 matrices whose dims divide by 8, fp32 norms) is written as
--files safetensors shards with an index and staged with the daemon's copier into a tmpfs
mount (huge=within_size). One process per GPU, with RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE as torchrun sets them, first measures the machine's bound: each GPU's pinned
host-to-device copy alone and all at once, and the host's read rate (every process reading its
share of the staged files with preadv on as many threads as fastload gives it). Then each
loader runs in each mode, --reps rounds after one warm-up, every round started at a barrier:
the aggregate rate is the bytes that landed on all GPUs over the time from the first start to
the last end. Modes: "slices" (tensor parallelism: attention q/k/v, MLP up/gate, embedding and
head split on dim 0, attention o and MLP down on dim 1, norms whole), "files" (each rank its
share of the files) and "whole" (every rank all of it). Loaders: ramstage.fastload;
fastsafetensors' SafeTensorsFileLoader with an NCCL process group (files dealt to ranks, then
scattered or broadcast; NVLink multicast off); safetensors.load_file in every rank (for
slices, then narrowed and cloned). Every loader's first result is checked on every rank against
safetensors.safe_open's tensors cut by tensor_split, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from tp_model import stage, write_model
from tp_report import LOADERS, MODES, markdown, summarize

from ramstage import fastload
from ramstage.fastload import Shard
from ramstage.fastload.formats import shard_files

GiB, MiB = 1 << 30, 1 << 20
# Row-parallel layers split on dim 1, norms stay whole, everything else (column-parallel
# layers, vocabulary-parallel embedding and head) on dim 0; the first match wins.
DIMS: dict[str, int | None] = {"*norm*": None, "*.o.weight": 1, "*.down.weight": 1, "*": 0}
# NVLink SHARP/multicast can take the GPUs of a shared host out of service: off for NCCL.
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
FSST_BUFFER_KIB = 256 * 1024  # the best bounce buffer of bench_gpu_peers.py's sweep


class Rank:
    """One process of the job: its device, its files, and the loaders it times."""

    def __init__(self, rank: int, world: int, model: Path, cpu: bool) -> None:
        self.rank, self.world, self.model, self.cpu = rank, world, model, cpu
        self.device = torch.device("cpu" if cpu else f"cuda:{rank}")
        self.files = shard_files(model)
        # The CPU run drives the same pipeline with the CPU as its target.
        self.loader = fastload.Loader(pipeline_on_cpu=cpu)
        self.pg: Any = None

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize(self.device)

    def dim(self, name: str, shape: Any) -> int | None:
        return Shard(0, 1, dims=DIMS).dim_for(name, shape)

    def shard(self, mode: str) -> Shard | None:
        if mode == "slices":
            return Shard(self.rank, self.world, dims=DIMS)
        return Shard(self.rank, self.world, files="balanced") if mode == "files" else None

    def my_files(self, mode: str) -> list[Path]:
        shard = self.shard(mode)
        return shard.pick_files(self.files) if mode == "files" and shard else self.files

    def load_fn(self, loader: str, mode: str) -> Callable[[], dict[str, torch.Tensor]]:
        if loader == "fastload":
            shard = self.shard(mode)
            return lambda: self.loader.load(self.model, self.device, shard=shard)
        if loader == "load_file":
            return lambda: self.load_file(mode)
        return self.fastsafetensors(mode)

    def load_file(self, mode: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        result = {}
        for file in self.my_files(mode):
            for name, tensor in load_file(file, device=str(self.device)).items():
                result[name] = self.cut(name, tensor) if mode == "slices" else tensor
        return result

    def cut(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dim = self.dim(name, tensor.shape)
        if dim is None:
            return tensor
        part = tensor.tensor_split(self.world, dim)[self.rank]
        return part.clone(memory_format=torch.contiguous_format)

    def fastsafetensors(self, mode: str) -> Callable[[], dict[str, torch.Tensor]]:
        from fastsafetensors import SafeTensorsFileLoader

        pg = None if mode == "files" else self.pg
        loader = SafeTensorsFileLoader(
            pg, str(self.device), nogds=True, bbuf_size_kb=FSST_BUFFER_KIB
        )
        if mode == "files":
            deal = {0: [str(f) for f in self.my_files(mode)]}
        else:
            deal = {r: [str(f) for f in self.files[r :: self.world]] for r in range(self.world)}

        def load() -> dict[str, torch.Tensor]:
            loader.add_filenames(deal)
            buffer = loader.copy_files_to_device()
            try:
                names = sorted(buffer.key_to_rank_lidx)  # every rank in the same order
                if mode != "slices":
                    return {name: buffer.get_tensor(name) for name in names}
                return {
                    name: buffer.get_sharded(name, dim)
                    if (dim := self.dim(name, buffer.get_shape(name))) is not None
                    else buffer.get_tensor(name)
                    for name in names
                }
            finally:
                buffer.close()
                loader.reset()

        return load

    def check(self, result: dict[str, torch.Tensor], mode: str) -> str | None:
        """None if result is safe_open's tensors (this rank's part), bit for bit; else why."""
        from safetensors import safe_open

        seen = set()
        for file in self.my_files(mode):
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    seen.add(name)
                    want = f.get_tensor(name)
                    want = self.cut(name, want) if mode == "slices" else want
                    got = result.get(name)
                    if got is None or (got.dtype, got.shape) != (want.dtype, want.shape):
                        return f"{name}: missing or of another dtype or shape"
                    if not torch.equal(
                        got.contiguous().view(-1).view(torch.uint8),
                        want.to(got.device).view(-1).view(torch.uint8),
                    ):
                        return f"{name}: bytes differ"
        return None if seen == set(result) else f"names differ: {sorted(set(result) ^ seen)[:5]}"

    def copier(self, nbytes: int) -> Callable[[], None]:
        """A pinned host-to-device copy of nbytes (on the CPU run: a plain host copy)."""
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=not self.cpu).fill_(1)
        target = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

        def copy() -> None:
            target.copy_(host, non_blocking=True)

        return copy

    def copy_rate(self, nbytes: int, reps: int) -> float:
        copy, runs = self.copier(nbytes), []
        for _ in range(reps):
            start = time.perf_counter()
            copy()
            self.sync()
            runs.append(time.perf_counter() - start)
        return nbytes / statistics.median(runs) / 1e9

    def reader(self, pool: ThreadPoolExecutor) -> Callable[[], int]:
        """Reads this rank's 1/world of the staged files' bytes, 16 MiB at a time, on
        fastload's thread count: the CPU half of fastload's pipeline alone."""
        reads = [
            (file, offset, min(16 * MiB, file.stat().st_size - offset))
            for file in self.files
            for offset in range(0, file.stat().st_size, 16 * MiB)
        ][self.rank :: self.world]
        buffers: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(pool._max_workers):
            buffers.put(memoryview(bytearray(16 * MiB)))  # zeroed, so faulted in, here

        def read(job: tuple[Path, int, int]) -> int:
            buffer, fd = buffers.get(), os.open(job[0], os.O_RDONLY)
            try:
                return os.preadv(fd, [buffer[: job[2]]], job[1])
            finally:
                os.close(fd)
                buffers.put(buffer)

        return lambda: sum(pool.map(read, reads))


def rank_main(rank: int, world: int, args: dict[str, Any], barrier: Any, results: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    me = Rank(rank, world, Path(args["model"]), args["cpu"])
    if not me.cpu:
        torch.cuda.set_device(me.device)
        torch.empty(1, device=me.device)
    if "fastsafetensors" in args["loaders"]:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo" if me.cpu else "nccl",
            init_method=f"tcp://127.0.0.1:{args['port']}",
            rank=rank,
            world_size=world,
            device_id=None if me.cpu else me.device,
        )
        me.pg = dist.group.WORLD

    def timed(kind: str, fn: Callable[[], Any], **key: Any) -> Any:
        barrier.wait()
        start = time.monotonic()
        value = fn()
        me.sync()
        results.put({"kind": kind, "rank": rank, "start": start, "end": time.monotonic(), **key})
        return value

    measure_bound(me, args["copy_mib"] * MiB, timed, barrier, results)
    for mode in args["modes"]:
        for loader in args["loaders"]:
            load = me.load_fn(loader, mode)
            for rep in range(1 + args["reps"]):
                result = timed("load", load, mode=mode, loader=loader, rep=rep)
                why = me.check(result, mode) if rep == 0 else None
                landed = {"nbytes": sum(t.nbytes for t in result.values()), "why": why}
                results.put(
                    {
                        "kind": "landed",
                        "rank": rank,
                        "mode": mode,
                        "loader": loader,
                        "rep": rep,
                        **landed,
                    }
                )
                del result
            if not me.cpu:
                torch.cuda.empty_cache()  # the next loader starts from the same free memory
    if me.pg is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def measure_bound(
    me: Rank, copy_bytes: int, timed: Callable[..., Any], barrier: Any, results: Any
) -> None:
    """Each GPU's pinned copy alone (the others wait), then all at once, then the host read."""
    for alone in range(me.world):
        barrier.wait()
        if alone == me.rank:
            gbps = me.copy_rate(copy_bytes, 5)
            results.put({"kind": "h2d alone", "rank": me.rank, "gbps": gbps})
    copy = me.copier(copy_bytes)
    for rep in range(3):
        timed("h2d together", copy, rep=rep, nbytes=copy_bytes)
    del copy
    with ThreadPoolExecutor(fastload.default_threads()) as pool:
        read = me.reader(pool)
        for rep in range(3):
            nbytes = timed("host read", read, rep=rep)
            results.put({"kind": "host read bytes", "rank": me.rank, "rep": rep, "nbytes": nbytes})


def run_job(world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(world), ctx.Queue()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, args, barrier, results)) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    items = []
    while any(p.is_alive() for p in procs) or not results.empty():
        try:
            items.append(results.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for proc in procs:
                    proc.kill()
                codes = [p.exitcode for p in procs]
                raise SystemExit(f"a rank failed: exit codes {codes}") from None
    return items


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="", help="process counts, e.g. 2,4,8 (default: all GPUs)")
    parser.add_argument("--gib", type=float, default=16.0)
    parser.add_argument("--files", type=int, default=8, help="safetensors shards of the model")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ramstage-tp"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--dry-run", action="store_true", help="CPU as target, 64 MiB, 2 ranks")
    args = parser.parse_args()
    if args.dry_run:
        args.gib, args.gpus, args.reps = min(args.gib, 1 / 16), args.gpus or "2", min(args.reps, 2)
        args.work = Path(f"/dev/shm/ramstage-tp-dry-{os.getpid()}")
    loaders = [x for x in args.loaders.split(",") if x]
    if not args.dry_run and "fastsafetensors" in loaders:
        from bench_gpu_peers import ensure_cudart_link

        ensure_cudart_link(args.work)  # may restart this process with LD_LIBRARY_PATH set
    if args.dry_run and "fastsafetensors" in loaders:
        try:
            import fastsafetensors  # noqa: F401
        except ImportError:
            print("dry run: fastsafetensors is not installed, left out", flush=True)
            loaders.remove("fastsafetensors")
    os.environ.update(NO_MULTICAST)
    worlds = [int(n) for n in args.gpus.split(",") if n] or [torch.cuda.device_count()]
    if not args.dry_run and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPUs")
    args.out.mkdir(parents=True, exist_ok=True)
    write_model(args.work / "disk" / "model", int(args.gib * GiB), args.files)
    model = stage(args.work / "disk" / "model", args.work, mount=not args.dry_run)
    report: dict[str, Any] = {"argv": sys.argv, "env": environment(), "jobs": []}
    try:
        for world in worlds:
            job = {
                "model": str(model),
                "cpu": args.dry_run,
                "reps": args.reps,
                "port": free_port(),
                "modes": [m for m in args.modes.split(",") if m],
                "loaders": loaders,
                "copy_mib": 64 if args.dry_run else 1024,
            }
            summary = summarize(world, run_job(world, job), cpu=args.dry_run)
            report["jobs"].append(summary)
            print(markdown(summary), flush=True)
    finally:
        if args.dry_run:
            shutil.rmtree(args.work)
        else:
            subprocess.run(["umount", str(args.work / "store")], check=False)
    (args.out / "bench_gpu_tp.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench_gpu_tp.md").write_text("".join(markdown(s) for s in report["jobs"]))
    return 0 if all(r["identical"] for s in report["jobs"] for r in s["loads"]) else 1


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        **{k: os.environ.get(k) for k in NO_MULTICAST},
    }


if __name__ == "__main__":
    raise SystemExit(main())
