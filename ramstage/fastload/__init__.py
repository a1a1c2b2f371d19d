"""Loads a staged checkpoint straight into GPU memory at close to PCIe speed.

    ramstage.fastload.load(path, "cuda:0")  # what torch.load(path, map_location=...) returns
    ramstage.fastload.load(path, "cpu")     # tensors over the file's pages, no copy
    ramstage.fastload.release()             # frees the pinned ring and the reader threads
    ramstage.fastload.load(path, "cuda:1", shard=Shard.from_env(dims={"*.o_proj.*": 1, "*": 0}))

One process per GPU (tensor parallelism) loads its part of the model with shard= (a Shard,
shard.py): its slice of each tensor, read from the slice's own bytes, or only some of a
directory's files. Slices and the fallback's whole-then-slice give the same bytes.

On a GPU, threads read the tensor bytes from the (tmpfs) file into a reused ring of pinned
buffers, which the device copies from as each fills (pipeline.py). The formats are in
formats.py: safetensors files, torch.save zip files (.pt/.pth/.ckpt/.bin, any pickled
object torch.load can load), and model directories of such shards (the result is one dict of
every shard's tensors). Whatever the fast path cannot do (a
device that is neither CUDA nor the CPU, a pickle whose storages it cannot map, a legacy or
foreign-endian file) goes through plain torch.load (safetensors: safetensors.torch.load_file)
with the reason logged, so the result is always what the plain loader gives.
"""

from __future__ import annotations

import logging
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, Union

import torch

from ramstage.fastload import native
from ramstage.fastload.formats import (
    Plan,
    Unmappable,
    is_safetensors,
    map_safetensors,
    plan_safetensors,
    shard_files,
)
from ramstage.fastload.pipeline import Ring
from ramstage.fastload.shard import (
    Shard,
    plan_safetensors_slices,
    plan_torch_zip_slices,
    slice_loaded,
)
from ramstage.fastload.torchzip import map_torch_zip, plan_torch_zip

__all__ = ["Loader", "Shard", "default_ring_bytes", "default_threads", "load", "release"]

log = logging.getLogger(__name__)

# Swept on 16-core machines (docs/benchmarks.md): 16 threads were the fastest warm (one H100).
# With the C copy loop (round nine, two H200s), warm loads with 4 MiB reads (a 128 MiB ring) took
# 2-18% less time than with 8 MiB (a median read 0.7-1.6 ms against 2.9-3.6, more than twice
# the rate), 2-3 MiB no less; first loads 12-38% less. The Python loop, whose every read costs
# tenths of a millisecond of GIL, was the fastest with 8 MiB (4 GiB warm in 120-126 ms against
# 144-153 with 4 MiB, one H100), so it keeps them: where the C loop was not built (the .deb and
# .rpm) or cannot run (ROCm).
# The ring follows the threads (two slots each, at most 16 threads' worth), so N processes
# sharing the cores also share that much pinned memory instead of locking N whole rings.
DEFAULT_THREADS = 16
READ_BYTES = 4 << 20
PYTHON_LOOP_READ_BYTES = 8 << 20
MAX_THREADS = 64
MIN_RING_BYTES = 16 << 10
MAX_RING_BYTES = 8 << 30

Device = Union[str, int, torch.device]


def default_threads() -> int:
    """The CPUs this process may run on, shared among the processes of one job on this machine
    (LOCAL_WORLD_SIZE, else WORLD_SIZE, as torchrun sets them): workers that load at once
    then do not run more threads together than there are cores."""
    cpus = len(os.sched_getaffinity(0))
    processes = 1
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            processes = int(value)
            break
    return max(1, min(DEFAULT_THREADS, cpus // processes))


def default_ring_bytes(threads: int) -> int:
    """Two reads per thread, at most 16 threads' worth, each read the best size measured for the
    loop that will copy: 128 MiB for 16 threads with the C loop, 256 MiB with the Python one."""
    read = READ_BYTES if native.available() else PYTHON_LOOP_READ_BYTES
    return 2 * min(threads, DEFAULT_THREADS) * read


class Loader:
    """Keeps one ring (host buffers, threads, copy stream) between loads, until release().

    pipeline_on_cpu=True runs the whole pipeline with the CPU as the target (no page-locking,
    no stream): what the tests use where there is no GPU. Without it, device="cpu" maps the
    file instead, as torch.load(mmap=True) does.
    """

    def __init__(self, *, pipeline_on_cpu: bool = False) -> None:
        self._pipeline_on_cpu = pipeline_on_cpu
        self._ring: Ring | None = None
        self._lock = threading.Lock()

    def load(
        self,
        path: str | os.PathLike[str],
        device: Device,
        *,
        threads: int | None = None,
        ring_bytes: int | None = None,
        shard: Shard | None = None,
    ) -> Any:
        path, device = Path(path), torch.device(device)
        threads = _bounded("threads", threads, default_threads(), 1, MAX_THREADS)
        ring_bytes = _bounded(
            "ring_bytes", ring_bytes, default_ring_bytes(threads), MIN_RING_BYTES, MAX_RING_BYTES
        )
        files = _files(path, shard)
        slices = shard if shard is not None and shard.dims is not None else None
        if device.type == "cpu" and not self._pipeline_on_cpu:
            return _merge(path, [_sliced(_map_on_cpu(f), slices, copy=False) for f in files])
        why_not = _why_not_fast(device)
        if why_not is not None:
            return _merge(path, [_fallback(f, device, why_not, slices) for f in files])
        with self._lock:
            # A new ring starts preparing its host memory at once, while the files are planned.
            kept = self._ring
            ring = self._ring_for(device, threads, ring_bytes, rows=slices is not None)
            if device.type == "cuda" and slices is None:
                _reserve(device, sum(file.stat().st_size for file in files))
            plans = [_plan(file, device, slices) for file in files]
            if ring is not kept and all(plan is None for plan in plans):
                self._close_ring()  # a load left wholly to the plain loader pins no memory
            else:
                ring.run([s for plan in plans if plan is not None for s in plan.segments])
        return _merge(path, [_finish(f, plan, device, slices) for f, plan in zip(files, plans)])

    def release(self) -> None:
        with self._lock:
            self._close_ring()

    def _close_ring(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _ring_for(self, device: torch.device, threads: int, ring_bytes: int, rows: bool) -> Ring:
        if self._ring is not None and not self._ring.matches(device, threads, ring_bytes):
            self._close_ring()
        if self._ring is None:
            self._ring = Ring(device, threads=threads, ring_bytes=ring_bytes, rows=rows)
        return self._ring


def _reserve(device: torch.device, nbytes: int) -> None:
    """Has the caching allocator take the load's device memory from the driver in one piece,
    which it then carves every tensor out of: in a fresh process, allocating 83-173 tensors one
    by one took 4-13 ms, this 1 ms (one H100). Where no such piece is free, the tensors are
    allocated one by one as before. The margin covers rounding each tensor to 512 bytes."""
    try:
        block = torch.empty(nbytes + nbytes // 1024, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError:
        return
    del block


def _files(path: Path, shard: Shard | None) -> list[Path]:
    if not path.is_dir():
        if shard is not None and shard.files is not None:
            raise ValueError(f"{path}: Shard(files=...) picks files of a model directory")
        return [path]
    files = shard_files(path)
    return shard.pick_files(files) if shard is not None and shard.files is not None else files


def _plan(file: Path, device: torch.device, slices: Shard | None) -> Plan | None:
    try:
        if slices is not None:
            if is_safetensors(file):
                return plan_safetensors_slices(file, device, slices)
            return plan_torch_zip_slices(file, device, slices)
        return (
            plan_safetensors(file, device) if is_safetensors(file) else plan_torch_zip(file, device)
        )
    except Unmappable as error:
        log.warning("fastload: %s: %s", file, error)
        return None


def _sliced(result: Any, slices: Shard | None, *, copy: bool) -> Any:
    return result if slices is None else slice_loaded(result, slices, copy=copy)


def _why_not_fast(device: torch.device) -> str | None:
    if device.type not in ("cuda", "cpu"):
        return f"device {device}: the fast path targets CUDA devices"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch reports no usable CUDA (not built with CUDA, or no GPU)"
    return None


def _map_on_cpu(file: Path) -> Any:
    """Tensors over the file's pages (copy-on-write): what torch.load(mmap=True) gives."""
    if is_safetensors(file):
        try:
            return map_safetensors(file)
        except Unmappable as error:
            return _fallback(file, torch.device("cpu"), str(error), None)
    if zipfile.is_zipfile(file):
        try:
            return map_torch_zip(file)
        except Unmappable:  # a storage that is no slice of the file: torch's own load
            return torch.load(file, map_location="cpu", mmap=True)
    return _fallback(file, torch.device("cpu"), "a legacy (non-zip) file cannot be mapped", None)


def _bounded(name: str, value: int | None, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not low <= value <= high:
        raise ValueError(f"fastload {name}={value}: must be between {low} and {high}")
    return value


def _finish(file: Path, plan: Plan | None, device: torch.device, slices: Shard | None) -> Any:
    if plan is None:
        return _fallback(file, device, None, slices)
    try:
        return plan.finish()
    except Unmappable as error:
        return _fallback(file, device, str(error), slices)


def _fallback(file: Path, device: torch.device, reason: str | None, slices: Shard | None) -> Any:
    """The plain loader for one file (then this rank's slices, each copied out of the whole
    tensor so that the whole is freed); reason None: already logged by the caller."""
    if reason is not None:
        log.warning("fastload: %s: %s; using the plain loader", file, reason)
    return _sliced(_plain_load(file, device), slices, copy=True)


def _plain_load(file: Path, device: torch.device) -> Any:
    if not is_safetensors(file):
        return torch.load(file, map_location=device)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise RuntimeError(
            f"cannot load {file} on {device} without the fast path: "
            "the safetensors package is not installed"
        ) from None
    return load_file(file, device=str(device))


def _merge(path: Path, results: list[Any]) -> Any:
    """One file: its object. A directory: one dict of all shards' tensors (disjoint names)."""
    if not path.is_dir():
        return results[0]
    merged: dict[str, Any] = {}
    for result in results:
        if not isinstance(result, dict):
            raise TypeError(f"{path}: a shard holds a {type(result).__name__}, not a dict")
        duplicates = merged.keys() & result.keys()
        if duplicates:
            raise ValueError(f"{path}: tensors in more than one shard: {sorted(duplicates)[:5]}")
        merged.update(result)
    return merged


# The process-wide loader behind load()/release(): the ring is meant to outlive one load, and
# apps call these as plain functions (ramstage.client does).
_default: Loader | None = None
_default_lock = threading.Lock()


def _default_loader() -> Loader:
    global _default
    with _default_lock:
        if _default is None:
            _default = Loader()
        return _default


def load(
    path: str | os.PathLike[str],
    device: Device,
    *,
    threads: int | None = None,
    ring_bytes: int | None = None,
    shard: Shard | None = None,
) -> Any:
    """What torch.load(path, map_location=device) returns, every tensor on device, fast; on
    the CPU, tensors over the file's pages (as with mmap=True), also for .safetensors. With a
    shard: this process's part of it (shard.py)."""
    loader = _default_loader()
    return loader.load(path, device, threads=threads, ring_bytes=ring_bytes, shard=shard)


def release() -> None:
    """Frees the pinned ring and the reader threads; the next load makes them again."""
    if _default is not None:
        _default.release()
