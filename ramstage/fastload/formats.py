"""Where the tensor bytes of a checkpoint lie, and how to rebuild it once they are on the device.

Each file becomes a Plan: the byte ranges to copy into freshly allocated device storages, and a
function that builds the loaded object from those storages after the copy.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ramstage.checkpoint import SAFETENSORS_MAX_HEADER_BYTES, TORCH_SUFFIXES, Kind, kind_of
from ramstage.fastload.pipeline import Segment, Strided

log = logging.getLogger("ramstage.fastload")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "C64": torch.complex64,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dtype is not None
}


class Unmappable(Exception):
    """The fast path cannot load this file; the message is the reason logged for the fallback."""


@dataclass(frozen=True)
class Plan:
    segments: list[Segment | Strided]
    finish: Callable[[], Any]


def flat_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def is_safetensors(path: Path) -> bool:
    return kind_of(path) is Kind.SAFETENSORS


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: torch.dtype
    shape: list[int]
    file_offset: int
    nbytes: int


def read_safetensors_header(path: Path) -> list[SafetensorsEntry]:
    """Header: 8-byte little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    if sys.byteorder != "little":
        raise Unmappable("safetensors data is little-endian and this machine is not")
    file_bytes = path.stat().st_size
    with open(path, "rb") as f:
        (header_bytes,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        if not 2 <= header_bytes <= min(SAFETENSORS_MAX_HEADER_BYTES, file_bytes - 8):
            raise Unmappable(f"not a safetensors file (header length {header_bytes})")
        header = json.loads(f.read(header_bytes))
    data_start = 8 + header_bytes
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise Unmappable(f"tensor {name!r} has dtype {entry['dtype']}, unknown here")
        begin, end = entry["data_offsets"]
        count = 1
        for dim in entry["shape"]:
            count *= dim
        nbytes = count * dtype.itemsize
        if end - begin != nbytes or data_start + end > file_bytes or begin < 0:
            raise Unmappable(f"tensor {name!r}: data_offsets {begin}..{end} do not fit its shape")
        entries.append(SafetensorsEntry(name, dtype, entry["shape"], data_start + begin, nbytes))
    return entries


def plan_safetensors(path: Path, device: torch.device) -> Plan:
    tensors: dict[str, torch.Tensor] = {}
    segments: list[Segment | Strided] = []
    for entry in read_safetensors_header(path):
        tensor = torch.empty(entry.shape, dtype=entry.dtype, device=device)
        if entry.nbytes:
            target = flat_bytes(tensor.untyped_storage())
            segments.append(Segment(str(path), entry.file_offset, entry.nbytes, target, 0))
        tensors[entry.name] = tensor
    return Plan(segments, lambda: tensors)


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """CPU tensors over a private mapping of the file, as torch.load(mmap=True) makes them: on
    tmpfs they are the staged pages themselves, shared by every process, copied only if written
    (MAP_PRIVATE). A tensor whose offset its dtype cannot address is copied out instead."""
    entries = read_safetensors_header(path)
    whole = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        # A slice of the mapping per tensor, as torch.load(mmap=True) gives each its storage:
        # re-saving one tensor then writes its bytes, not the whole file.
        storage = whole[entry.file_offset : entry.file_offset + entry.nbytes]
        if entry.file_offset % entry.dtype.itemsize:
            storage = storage.clone()
        tensors[entry.name] = torch.empty(0, dtype=entry.dtype).set_(storage).view(entry.shape)
    return tensors


def shard_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: safetensors shards if any, else torch shards."""
    for index_name, suffixes in (
        ("model.safetensors.index.json", (".safetensors",)),
        ("pytorch_model.bin.index.json", TORCH_SUFFIXES),
    ):
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in suffixes)
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({directory / shard for shard in weight_map.values()})
        if files:
            return files
    names = ", ".join((".safetensors", *TORCH_SUFFIXES))
    raise FileNotFoundError(f"no {names} files in {directory}")
