"""What each step of a fresh process's first fastload call costs on its own (issue 16).

Run on purpose, on a machine with a GPU (docs/benchmarks.md has the command):

    python3 benchmarks/bench_gpu_primitives.py --out "$OUT"

Each sample is a fresh process: it creates its CUDA context (timed apart), then times, once
each and in this order, the steps the fast loader's ring and readers take (hostring.py,
pipeline.py): mapping the ring, faulting slots in (MADV_POPULATE_WRITE on huge pages), page-
locking them (cudaHostRegister), a copy stream and an event, the first and second 8 MiB
host-to-device copies, starting 16 threads, an 8 MiB read from tmpfs; then how fast the kernel
hands out fresh memory: 256 MiB faulted in by one thread, again after an munmap (pages this
process had), by four threads at once, 64 MiB on 4 KiB pages, and 64 MiB of cudaHostAlloc.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ramstage.fastload import hostring

libc = hostring._libc  # the ring's own mmap and madvise prototypes
MiB = 1 << 20
SLOT, RING, HUGE = 8 * MiB, 256 * MiB, hostring.HUGE_PAGE_BYTES
MADV_HUGEPAGE, MADV_POPULATE_WRITE = hostring.MADV_HUGEPAGE, hostring.MADV_POPULATE_WRITE


def anonymous(nbytes: int, huge: bool = True) -> int:
    """A private anonymous mapping, aligned to huge pages and advised for them (as the ring)."""
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    address = libc.mmap(None, nbytes + HUGE, prot, flags, -1, 0)
    start = -(-address // HUGE) * HUGE
    if huge:
        libc.madvise(start, nbytes, MADV_HUGEPAGE)
    return start


def populate(address: int, nbytes: int, threads: int = 1) -> None:
    share = nbytes // threads
    workers = [
        threading.Thread(
            target=libc.madvise, args=(address + i * share, share, MADV_POPULATE_WRITE)
        )
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def sample(source: str) -> dict[str, float]:
    import torch

    times: dict[str, float] = {}

    def step(name: str, action: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = action()
        times[name] = (time.perf_counter() - start) * 1e3
        return result

    step("CUDA context (apart)", lambda: (torch.empty(1, device="cuda"), torch.cuda.synchronize()))
    cudart = torch.cuda.cudart()
    ring = step("map the 256 MiB ring", lambda: anonymous(RING))
    step("fault in slot 0 (8 MiB)", lambda: populate(ring, SLOT))
    step("fault in slot 1 (8 MiB)", lambda: populate(ring + SLOT, SLOT))
    step("fault in the next 64 MiB", lambda: populate(ring + 2 * SLOT, 64 * MiB))
    step("register slot 0", lambda: cudart.cudaHostRegister(ring, SLOT, 0))
    step("register slot 1", lambda: cudart.cudaHostRegister(ring + SLOT, SLOT, 0))
    step("register the next 64 MiB", lambda: cudart.cudaHostRegister(ring + 2 * SLOT, 64 * MiB, 0))
    event = step("event", torch.cuda.Event)
    stream = step("copy stream", torch.cuda.Stream)
    host = torch.frombuffer((ctypes.c_ubyte * SLOT).from_address(ring), dtype=torch.uint8)
    device = step(
        "device buffer (8 MiB)", lambda: torch.empty(SLOT, dtype=torch.uint8, device="cuda")
    )

    def copy() -> None:
        with torch.cuda.stream(stream):
            device.copy_(host, non_blocking=True)
            event.record(stream)
        event.synchronize()

    step("first 8 MiB host-to-device copy", copy)
    step("second 8 MiB host-to-device copy", copy)

    def threads() -> None:
        started = [threading.Thread(target=int) for _ in range(16)]
        for thread in started:
            thread.start()
        for thread in started:
            thread.join()

    step("start and join 16 threads", threads)
    fd = os.open(source, os.O_RDONLY)
    memory = memoryview((ctypes.c_ubyte * SLOT).from_address(ring)).cast("B")
    step("read 8 MiB from tmpfs", lambda: os.preadv(fd, [memory], 0))
    os.close(fd)
    fresh = anonymous(RING)
    step("fault in 256 MiB, fresh", lambda: populate(fresh, RING))
    libc.munmap(fresh, RING)
    again = anonymous(RING)
    step("fault in 256 MiB, after munmap", lambda: populate(again, RING))
    parallel = anonymous(RING)
    step("fault in 256 MiB, 4 threads", lambda: populate(parallel, RING, threads=4))
    small = anonymous(64 * MiB, huge=False)
    step("fault in 64 MiB, 4 KiB pages", lambda: populate(small, 64 * MiB))
    step("cudaHostAlloc 64 MiB", lambda: torch.empty(64 * MiB, dtype=torch.uint8, pin_memory=True))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--samples", type=int, default=6, help="fresh processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(sample(args.child)))
        return 0
    source = "/dev/shm/ramstage-primitives.bin"
    Path(source).write_bytes(os.urandom(32 * MiB))
    rows = []
    try:
        for _ in range(args.samples):
            command = [sys.executable, __file__, "--child", source]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.splitlines()[-1]))
    finally:
        os.unlink(source)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "primitives.json").write_text(json.dumps(rows))
    print(f"{'step':<36} {'median ms':>10}  every sample")
    for name in rows[0]:
        values = [row[name] for row in rows]
        listed = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:<36} {statistics.median(values):>10.2f}  {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
