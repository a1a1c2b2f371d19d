"""`ramstage bench`: how long torch.load takes on this machine, from the source and from RAM.

Runs in the CLI's process (never in the daemon), so it may import torch, lazily. The source's
page cache is dropped for that one file with posix_fadvise(POSIX_FADV_DONTNEED), which needs no
root and leaves the rest of the cache alone; benchmarks/ in the source tree does the thorough
version with throttled devices and drop_caches.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ramstage.checkpoint import TORCH_SUFFIXES
from ramstage.config import load_config
from ramstage.errors import NotFound, RamstageError, UsageError

TENSOR_BYTES = 64 << 20
SHM = Path("/dev/shm")
CACHE_NOTE = (
    "'page cache dropped' drops this machine's cache of the file only; on a virtual machine the"
    " host may still cache the disk, so that row can be faster than the disk really is"
)
MMAP_NOTE = "mmap=True maps the tensors: their pages are read when first used, not during the load"


@dataclass(frozen=True)
class Case:
    label: str
    seconds: tuple[float, ...]

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


@dataclass(frozen=True)
class BenchResult:
    title: str
    size_bytes: int
    source: Path
    ram_copy: Path
    cases: tuple[Case, ...]
    notes: tuple[str, ...]

    def ratio(self, case: Case) -> float:
        """Time relative to a plain torch.load through the RAM copy (the third case)."""
        return case.median_seconds / self.cases[2].median_seconds


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_into_cache(path: Path) -> None:
    buffer = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def timed_load(path: Path, *, mmap: bool) -> float:
    import torch

    gc.collect()
    start = time.perf_counter()
    state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    elapsed = time.perf_counter() - start
    del state
    return elapsed


def measure(source: Path, ram_copy: Path, runs: int) -> tuple[Case, ...]:
    """Each run goes through all four cases in turn, so drift hits them alike."""
    labels = (
        "source, page cache dropped",
        "source, page cache hot",
        "RAM copy",
        "RAM copy, mmap=True",
    )
    timings: list[list[float]] = [[] for _ in labels]
    timed_load(ram_copy, mmap=False)  # imports torch and warms its code paths, untimed
    for _ in range(runs):
        drop_file_cache(source)
        timings[0].append(timed_load(source, mmap=False))
        read_into_cache(source)
        timings[1].append(timed_load(source, mmap=False))
        timings[2].append(timed_load(ram_copy, mmap=False))
        timings[3].append(timed_load(ram_copy, mmap=True))
    return tuple(Case(label, tuple(t)) for label, t in zip(labels, timings))


def _largest_checkpoint(directory: Path) -> str:
    candidates = [p for p in directory.rglob("*") if p.is_file() and p.suffix in TORCH_SUFFIXES]
    if not candidates:
        raise UsageError(f"{directory}: no torch checkpoint (*.pt, *.pth, *.ckpt, *.bin) inside")
    return str(max(candidates, key=lambda p: p.stat().st_size).relative_to(directory))


def bench_model(config_path: Path, name: str, runs: int, file: str | None = None) -> BenchResult:
    """A configured model: its source against its link (a directory model: one file of it)."""
    config = load_config(config_path)
    model = config.model(name)
    if model is None:
        raise NotFound(f"no model named {name} in {config_path}")
    source, link = model.source, config.links_dir / name
    if source.is_dir():
        file = file or _largest_checkpoint(source)
        source, link = source / file, link / file
    if not link.exists():
        raise RamstageError(
            f"{link} does not exist: is ramstage running? (systemctl start ramstage)"
        )
    notes = [CACHE_NOTE, MMAP_NOTE]
    if not Path(os.path.realpath(link)).is_relative_to(os.path.realpath(config.store.path)):
        notes.insert(
            0, f"{name} is not staged now: its link points at the source (ramstage status)"
        )
    cases = measure(source, link, runs)
    return BenchResult(name, source.stat().st_size, source, link, cases, tuple(notes))


def save_state_dict(path: Path, size_bytes: int) -> None:
    """A state_dict of float32 tensors of 64 MiB (the last one smaller), like a large model's."""
    import torch

    state = {}
    for index, offset in enumerate(range(0, size_bytes, TENSOR_BYTES)):
        elements = min(TENSOR_BYTES, size_bytes - offset) // 4
        state[f"layers.{index}.weight"] = torch.randn(elements)
    torch.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped from the cache


@contextmanager
def generated_model(size_bytes: int, directory: Path) -> Iterator[tuple[Path, Path]]:
    """A fresh checkpoint on `directory`'s disk and its copy in /dev/shm, both removed after."""
    if not os.path.ismount(SHM) or not os.access(SHM, os.W_OK):
        raise UsageError(f"{SHM} is not a writable tmpfs here; bench a configured model instead")
    with (
        tempfile.TemporaryDirectory(prefix="ramstage-bench-", dir=directory) as disk_dir,
        tempfile.TemporaryDirectory(prefix="ramstage-bench-", dir=SHM) as ram_dir,
    ):
        source = Path(disk_dir) / "model.pt"
        save_state_dict(source, size_bytes)
        ram_copy = Path(ram_dir) / "model.pt"
        shutil.copyfile(source, ram_copy)
        yield source, ram_copy


def bench_generated(size_bytes: int, directory: Path, runs: int) -> BenchResult:
    with generated_model(size_bytes, directory) as (source, ram_copy):
        cases = measure(source, ram_copy, runs)
        size = source.stat().st_size
    notes = (f"generated a state_dict in {directory}, RAM copy in {SHM}", CACHE_NOTE, MMAP_NOTE)
    return BenchResult("a generated state_dict", size, source, ram_copy, cases, notes)
