"""`ramstage bench`: how long loading a model takes on this machine, from the source and from RAM.

Runs in the CLI's process (never in the daemon), so it may import torch and safetensors, lazily.
Each file is loaded as an application would: torch checkpoints with torch.load, .safetensors
files with safetensors' own loader, anything else (and everything, when no loader is installed)
with plain reads; a directory model is loaded whole, every file of it. The source's page cache
is dropped for those files only, with posix_fadvise(POSIX_FADV_DONTNEED), which needs no root
and leaves the rest of the cache alone; benchmarks/ in the source tree does the thorough version
with throttled devices and drop_caches.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import statistics
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ramstage import units
from ramstage.checkpoint import Kind, kind_of
from ramstage.config import load_config
from ramstage.errors import NotFound, RamstageError, UsageError

TENSOR_BYTES = 64 << 20
SHM = Path("/dev/shm")
CACHE_NOTE = (
    "'page cache dropped' drops this machine's cache of the files only; on a virtual machine the"
    " host may still cache the disk, so that row can be faster than the disk really is"
)
MMAP_NOTE = (
    "mmap: torch.load(mmap=True) and safetensors' safe_open map the tensors: their pages are"
    " read when first used, not during the load"
)
PLAIN_NOTE = "plain reads: no loader for {what} is installed ({install})"
LABELS = ("source, page cache dropped", "source, page cache hot", "RAM copy", "RAM copy, mmap")
Progress = Callable[[str], None]


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
    loader: str  # "torch.load", "safetensors", "plain reads", or several joined with " + "
    files: int
    size_bytes: int
    source: Path
    ram_copy: Path
    cases: tuple[Case, ...]
    notes: tuple[str, ...]

    def ratio(self, case: Case) -> float:
        """Time relative to a plain load through the RAM copy (the third case)."""
        return case.median_seconds / self.cases[2].median_seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "loader": self.loader,
            "files": self.files,
            "size_bytes": self.size_bytes,
            "source": str(self.source),
            "ram_copy": str(self.ram_copy),
            "runs": len(self.cases[0].seconds),
            "cases": [
                {
                    "label": case.label,
                    "seconds": list(case.seconds),
                    "median_seconds": case.median_seconds,
                    "vs_ram_copy": self.ratio(case),
                }
                for case in self.cases
            ],
            "notes": list(self.notes),
        }


def table(result: BenchResult) -> str:
    """The result as the table `ramstage bench` prints."""
    files = f", {result.files} files" if result.files > 1 else ""
    lines = [
        (
            f"{result.loader} of {result.title} ({units.size(result.size_bytes)}{files}),"
            f" median of {len(result.cases[0].seconds)} runs"
        ),
        f"  source:   {result.source}",
        f"  RAM copy: {result.ram_copy}",
        "",
        f"{'':<28}  {'median':>9}  {'vs RAM copy':>11}",
    ]
    for case in result.cases:
        lines.append(
            f"{case.label:<28}  {case.median_seconds:>7.3f} s  {result.ratio(case):>10.2f}x"
        )
    return "\n".join(lines + [""] + [f"note: {note}" for note in result.notes])


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


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def loader_for(path: Path) -> str:
    """torch.load for torch checkpoints, safetensors for .safetensors files (with torch's or
    numpy's tensors), plain reads for the rest and where the loader is missing."""
    kind = kind_of(path)
    if kind in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY) and _installed("torch"):
        return "torch.load"
    tensors = _installed("torch") or _installed("numpy")
    if kind is Kind.SAFETENSORS and _installed("safetensors") and tensors:
        return "safetensors"
    return "plain reads"


def _torch_load(path: Path, mmap: bool) -> None:
    import torch

    # Only the zip format (torch >= 1.6) can be mapped.
    mmap = mmap and zipfile.is_zipfile(path)
    torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


def _safetensors_load(path: Path, mmap: bool) -> None:
    framework = "pt" if _installed("torch") else "numpy"
    if mmap:
        from safetensors import safe_open

        with safe_open(str(path), framework=framework) as f:
            f.keys()
        return
    if framework == "pt":
        import safetensors.torch

        safetensors.torch.load_file(str(path))
    else:
        import safetensors.numpy

        safetensors.numpy.load_file(str(path))


LOADERS: dict[str, Callable[[Path, bool], None]] = {
    "torch.load": _torch_load,
    "safetensors": _safetensors_load,
    "plain reads": lambda path, mmap: read_into_cache(path),
}


def timed_load(paths: Sequence[Path], loaders: Sequence[str], *, mmap: bool) -> float:
    gc.collect()
    start = time.perf_counter()
    for path, loader in zip(paths, loaders):
        LOADERS[loader](path, mmap)
    elapsed = time.perf_counter() - start
    gc.collect()
    return elapsed


def measure(
    sources: Sequence[Path], copies: Sequence[Path], runs: int, progress: Progress
) -> tuple[Case, ...]:
    """Each run goes through all four cases in turn, so drift hits them alike."""
    loaders = [loader_for(path) for path in copies]
    timings: list[list[float]] = [[] for _ in LABELS]
    progress("warming up")
    timed_load(copies, loaders, mmap=False)  # imports the loaders, untimed
    for run in range(1, runs + 1):
        for index, label in enumerate(LABELS):
            progress(f"run {run}/{runs}: {label}")
            if index == 0:
                for source in sources:
                    drop_file_cache(source)
            elif index == 1:
                for source in sources:
                    read_into_cache(source)
            paths = sources if index < 2 else copies
            timings[index].append(timed_load(paths, loaders, mmap=index == 3))
    return tuple(Case(label, tuple(t)) for label, t in zip(LABELS, timings))


def _model_files(directory: Path, file: str | None) -> list[str]:
    if file is not None:
        if not (directory / file).is_file():
            raise UsageError(f"--file {file}: no such file in {directory}")
        return [file]
    relpaths = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    if not relpaths:
        raise UsageError(f"{directory}: no files inside")
    return relpaths


def _loader_notes(loaders: Sequence[str], paths: Sequence[Path]) -> list[str]:
    notes = []
    for path, loader in zip(paths, loaders):
        kind = kind_of(path)
        if loader == "plain reads" and kind in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY):
            notes.append(PLAIN_NOTE.format(what="torch checkpoints", install="pip install torch"))
        elif loader == "plain reads" and kind is Kind.SAFETENSORS:
            notes.append(
                PLAIN_NOTE.format(what=".safetensors", install="pip install safetensors numpy")
            )
    return sorted(set(notes))


def bench_model(
    config_path: Path, name: str, runs: int, file: str | None, progress: Progress
) -> BenchResult:
    """A configured model: its source against its link; a directory model is loaded whole, or
    only `file` of it."""
    config = load_config(config_path)
    model = config.model(name)
    if model is None:
        raise NotFound(f"no model named {name} in {config_path}")
    source, link = model.resolve(), config.links_dir / name
    if not link.exists():
        raise RamstageError(
            f"{link} does not exist: is ramstage running? (systemctl start ramstage)"
        )
    sources, copies = [source], [link]
    if source.is_dir():
        relpaths = _model_files(source, file)
        sources, copies = [source / r for r in relpaths], [link / r for r in relpaths]
    loaders = [loader_for(path) for path in copies]
    notes = [*_loader_notes(loaders, copies), CACHE_NOTE, MMAP_NOTE]
    if not Path(os.path.realpath(link)).is_relative_to(os.path.realpath(config.store.path)):
        notes.insert(
            0, f"{name} is not staged now: its link points at the source (ramstage status)"
        )
    cases = measure(sources, copies, runs, progress)
    size = sum(path.stat().st_size for path in sources)
    loader = " + ".join(dict.fromkeys(loaders))
    return BenchResult(name, loader, len(sources), size, source, link, cases, tuple(notes))


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


def bench_generated(size_bytes: int, directory: Path, runs: int, progress: Progress) -> BenchResult:
    if not _installed("torch"):
        raise UsageError("--size generates a torch state_dict: pip install torch, or bench a model")
    progress("writing a state_dict")
    with generated_model(size_bytes, directory) as (source, ram_copy):
        cases = measure([source], [ram_copy], runs, progress)
        size = source.stat().st_size
    notes = (f"generated a state_dict in {directory}, RAM copy in {SHM}", CACHE_NOTE, MMAP_NOTE)
    return BenchResult(
        "a generated state_dict", "torch.load", 1, size, source, ram_copy, cases, notes
    )
