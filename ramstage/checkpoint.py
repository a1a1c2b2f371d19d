"""What ramstage knows about checkpoint formats, torch-free: how a file's format is told
(kind_of), the limits the formats set, and the checks run on a partial generation before it is
published. The GPU loader (fastload) and the client tell formats apart with kind_of too.

A checkpoint cut short (a writer still saving, a full disk, a torn copy) hashes fine: its digest
is just the digest of a broken file. These checks catch what the digest cannot, so the link never
moves to a copy that `torch.load` would refuse. Files are told apart by their content (the zip
local-header magic, a safetensors header) and by extension; other files (configs, tokenizers)
are not checked.

`validate: torch` goes further and loads each torch file with `torch.load(weights_only=True,
mmap=True)`, in a subprocess, because the daemon never imports torch (invariant 6):
`python -m ramstage.checkpoint PATH` exits non-zero with the reason.
"""

from __future__ import annotations

import enum
import json
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ramstage.errors import RamstageError

SAFETENSORS_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
TORCH_LOAD_TIMEOUT_SECONDS = 600.0
ZIP_MAGIC = b"PK\x03\x04"
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
# Bits per element, as safetensors' Dtype::bitsize(); sub-byte types pack several per byte.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


class InvalidCheckpoint(RamstageError):
    """A file of the generation is not a loadable checkpoint; the message names it and why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"invalid checkpoint: {message}")


def check_safetensors(path: Path) -> None:
    """The header length fits the file and the 100 MB limit, the header is a JSON object, and the
    tensors tile the data area exactly: each within it, sized dtype x shape, none overlapping."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidCheckpoint(f"{path.name}: safetensors file shorter than its 8-byte header")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > SAFETENSORS_MAX_HEADER_BYTES:
            raise InvalidCheckpoint(
                f"{path.name}: safetensors header of {header_bytes} bytes is over the 100 MB limit"
            )
        if 8 + header_bytes > size:
            raise InvalidCheckpoint(
                f"{path.name}: truncated: safetensors header of {header_bytes} bytes"
                f" does not fit in {size} bytes"
            )
        raw = f.read(header_bytes)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidCheckpoint(
            f"{path.name}: safetensors header is not valid JSON: {error}"
        ) from None
    if not isinstance(header, dict):
        raise InvalidCheckpoint(f"{path.name}: safetensors header is not a JSON object")
    data_bytes = size - 8 - header_bytes
    spans = sorted(
        _tensor_span(path.name, name, entry)
        for name, entry in header.items()
        if name != "__metadata__"
    )
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise InvalidCheckpoint(
                f"{path.name}: tensor {name} starts at {begin}, expected {end}"
                " (tensors overlap or leave a gap)"
            )
        end = stop
    if end != data_bytes:
        problem = "truncated" if end > data_bytes else "trailing bytes"
        raise InvalidCheckpoint(
            f"{path.name}: {problem}: tensors need {end} data bytes, the file has {data_bytes}"
        )


def _tensor_span(filename: str, name: str, entry: Any) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise InvalidCheckpoint(f"{filename}: tensor {name}: entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    bits = SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise InvalidCheckpoint(f"{filename}: tensor {name}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_natural(n) for n in shape)):
        raise InvalidCheckpoint(f"{filename}: tensor {name}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
        raise InvalidCheckpoint(f"{filename}: tensor {name}: bad data_offsets {offsets!r}")
    begin, stop = offsets
    elements = 1
    for n in shape:
        elements *= n
    if stop < begin or elements * bits != (stop - begin) * 8:
        raise InvalidCheckpoint(
            f"{filename}: tensor {name}: {dtype} {shape} needs {elements * bits / 8:g} bytes,"
            f" data_offsets give {stop - begin}"
        )
    return begin, stop, name


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_zip(path: Path) -> None:
    """The central directory is there (a truncated torch.save loses it first) and every entry
    reads back with its CRC, which is how torch's reader finds a torn or flipped entry."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError) as error:
        raise InvalidCheckpoint(f"{path.name}: not a readable zip checkpoint: {error}") from None
    if bad is not None:
        raise InvalidCheckpoint(f"{path.name}: entry {bad} is corrupt (CRC mismatch)")


def check_safetensors_index(path: Path) -> None:
    """A sharded model's index names every shard: all of them must be in the generation."""
    try:
        index = json.loads(path.read_text())
        shards = set(index["weight_map"].values())
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise InvalidCheckpoint(f"{path.name}: not a safetensors index with a weight_map") from None
    missing = sorted(s for s in shards if not isinstance(s, str) or not (path.parent / s).is_file())
    if missing:
        raise InvalidCheckpoint(f"{path.name}: shards missing: {', '.join(map(str, missing))}")


class Kind(enum.Enum):
    SAFETENSORS = "safetensors"
    SAFETENSORS_INDEX = "safetensors index"  # a sharded model's weight map
    TORCH_ZIP = "torch zip"  # torch.save's format since torch 1.6
    TORCH_LEGACY = "torch legacy"  # a torch suffix without the zip magic: torch's older pickle
    OTHER = "other"  # configs, tokenizers: not checked


def kind_of(path: Path) -> Kind:
    """Told by content first (the zip magic; a safetensors header is JSON right after its
    8-byte length, so byte 8 is "{" even without the extension), then by name."""
    if path.name.endswith(".safetensors.index.json"):
        return Kind.SAFETENSORS_INDEX
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(ZIP_MAGIC):
        return Kind.TORCH_ZIP
    if path.suffix in TORCH_SUFFIXES:
        return Kind.TORCH_LEGACY
    if path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return Kind.SAFETENSORS
    return Kind.OTHER


def check_file(path: Path, mode: str) -> None:
    """Checks one file by its kind; `mode` is the model's `validate` setting."""
    if mode == "none":
        return
    kind = kind_of(path)
    if kind is Kind.SAFETENSORS_INDEX:
        check_safetensors_index(path)
    elif kind is Kind.SAFETENSORS:
        check_safetensors(path)
    elif kind is Kind.TORCH_ZIP:
        check_zip(path)
    # Only torch itself can read the legacy pickle format.
    if mode == "torch" and kind in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY):
        check_with_torch(path)


def check_generation(root: Path, relpaths: Iterable[str], mode: str) -> None:
    """Checks every file of a (partial) generation; raises InvalidCheckpoint on the first bad
    one."""
    for relpath in relpaths:
        try:
            check_file(root / relpath, mode)
        except OSError as error:
            raise InvalidCheckpoint(f"{relpath}: cannot read: {error.strerror}") from None


def check_with_torch(path: Path) -> None:
    """Loads the file as an application would, in a child process; its exit status decides."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ramstage.checkpoint", str(path)],
            capture_output=True,
            text=True,
            timeout=TORCH_LOAD_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InvalidCheckpoint(
            f"{path.name}: torch.load did not finish within {TORCH_LOAD_TIMEOUT_SECONDS:g}s"
        ) from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise InvalidCheckpoint(f"{path.name}: torch.load failed: {lines[-1]}")


def _torch_load(path: str) -> None:
    try:
        import torch
    except ImportError:
        raise SystemExit(f"validate: torch needs torch installed for {sys.executable}") from None
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure to load is the answer
        # torch's weights_only message is a page long; the line that names the cause is enough.
        lines = str(error).splitlines() or [""]
        cause = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise SystemExit(f"{type(error).__name__}: {cause.strip()}") from None


if __name__ == "__main__":
    _torch_load(sys.argv[1])
