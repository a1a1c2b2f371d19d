"""Where the tensor bytes of a checkpoint lie, and how to rebuild it once they are on the device.

Each file becomes a Plan: the byte ranges to copy into freshly allocated device storages, and a
function that builds the loaded object from those storages after the copy.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch.types import Storage

from ramstage.checkpoint import SAFETENSORS_MAX_HEADER_BYTES, TORCH_SUFFIXES, Kind, kind_of
from ramstage.fastload.pipeline import Segment, Strided
from ramstage.holders import mappings

log = logging.getLogger("ramstage.fastload")

try:  # a torch that can compute its records' offsets (2.11 and 2.13 here) rather than read them
    from torch.utils.serialization import config

    computed_offsets_config: Any = (
        config if hasattr(config.load, "calculate_storage_offsets") else None
    )
except ImportError:
    computed_offsets_config = None

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


class Misplaced(Unmappable):
    """A storage torch mapped does not start where the zip's directory puts a record."""


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


def map_torch_zip(path: Path) -> Any:
    """What torch.load(mmap=True, map_location="cpu") gives, with each storage's file offset
    checked as load_mapped needs."""
    mappings = FileMappings(path, read_zip_records(path))

    def checked(storage: Storage, location: str) -> Storage:
        if storage.nbytes():
            mappings.offset(storage)
        return storage

    return load_mapped(path, map_location=checked)


def plan_torch_zip(path: Path, device: torch.device) -> Plan:
    """Maps the storages of a torch.save zip file to their byte ranges in the file.

    torch.load(mmap=True) runs torch's own unpickler and reports each storage, through
    map_location, as a slice of a private mapping of the file; its file offset is read off
    /proc/self/maps, and an empty device storage of its size is allocated. So every object in
    the pickle (tied weights, views, nested dicts, optimizer state) is built by torch itself.

    One pass suffices when the weights_only unpickler accepts the file and builds only plain
    containers and dense tensors over those (still empty) device storages: nothing there read
    tensor data while unpickling. Anything else (sparse tensors, which torch validates at load,
    or objects only the full unpickler builds) is loaded again after the copy with torch.load's
    own defaults, with the filled device storages handed in: whatever reads data reads it right.
    """
    records = read_zip_records(path)
    ranges: dict[int, tuple[int, torch.UntypedStorage]] = {}  # file offset -> (nbytes, storage)

    def mapper(hand_out_device_storage: bool) -> Callable[[Storage, str], Storage]:
        mappings = FileMappings(path, records)

        def restore(storage: Storage, location: str) -> Storage:
            nbytes = storage.nbytes()
            if not nbytes:
                return cast(Storage, torch.UntypedStorage(0, device=device))  # type: ignore[no-untyped-call]
            offset = mappings.offset(storage)
            known = ranges.setdefault(offset, (nbytes, _device_storage(nbytes, device)))
            if known[0] != nbytes:
                raise Unmappable(f"two storages of different sizes at file offset {offset}")
            return cast(Storage, known[1]) if hand_out_device_storage else storage

        return restore

    # Any failure means: leave it to plain torch.load, which gives the authoritative result or error.
    try:
        result = load_mapped(path, map_location=mapper(True), weights_only=True)
        if _plain(result):
            return Plan(_segments(path, ranges), lambda: result)
    except Exception as error:  # noqa: BLE001
        log.debug("fastload: %s: one weights_only pass is not enough: %s", path, error)
    try:
        load_mapped(path, map_location=mapper(False))
    except Exception as error:  # noqa: BLE001
        raise Unmappable(f"torch.load(mmap=True) failed: {type(error).__name__}: {error}") from None
    known_offsets = set(ranges)

    def finish() -> Any:
        try:
            result = load_mapped(path, map_location=mapper(True))
        except Exception as error:  # noqa: BLE001
            raise Unmappable(f"second torch.load(mmap=True) failed: {error}") from None
        if set(ranges) != known_offsets:
            raise Unmappable("the second load met storages the first did not")
        return result

    return Plan(_segments(path, ranges), finish)


def _segments(
    path: Path, ranges: dict[int, tuple[int, torch.UntypedStorage]]
) -> list[Segment | Strided]:
    """Each storage's bytes, from its file offset into its device storage."""
    return [
        Segment(str(path), offset, nbytes, flat_bytes(storage), 0)
        for offset, (nbytes, storage) in ranges.items()
    ]


PLAIN_TYPES = (
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
)


def _plain(obj: Any) -> bool:
    """Only builtin containers, scalars and dense tensors: nothing that read tensor data."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, PLAIN_TYPES):
            continue
        seen.add(id(item))
        if type(item) in (dict, OrderedDict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif type(item) in (list, tuple, set):
            stack.extend(item)
        elif type(item) in (torch.Tensor, torch.nn.Parameter):
            if item.layout != torch.strided or item.is_quantized or item.is_nested:
                return False
        else:
            return False
    return True


ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra field length


def read_zip_records(path: Path) -> dict[int, int]:
    """Where each record's bytes begin in a torch zip checkpoint (torch stores them, never
    compressed), and how many. Unmappable if it is no zip, or if torch would byteswap its
    storages in memory: the file's bytes would be wrong."""
    records: dict[int, int] = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb", buffering=0) as raw:
            names = [n for n in archive.namelist() if n.endswith("/byteorder")]
            order = archive.read(names[0]).decode() if names else sys.byteorder
            for info in archive.infolist():
                header = os.pread(raw.fileno(), ZIP_LOCAL_HEADER.size, info.header_offset)
                magic, name_bytes, extra_bytes = ZIP_LOCAL_HEADER.unpack(header)
                if magic != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"no local header for {info.filename}")
                start = info.header_offset + ZIP_LOCAL_HEADER.size + name_bytes + extra_bytes
                records[start] = info.file_size
    except (zipfile.BadZipFile, OSError, struct.error) as error:
        raise Unmappable(f"not a torch zip checkpoint: {error}") from None
    if order != sys.byteorder:
        raise Unmappable(f"saved as {order}-endian, this machine is {sys.byteorder}-endian")
    return records


_computed_offsets = threading.Lock()  # torch's serialization config is global to the process


def load_mapped(path: Path, **options: Any) -> Any:
    """torch.load(mmap=True). torch finds each storage by reading its record's header through
    Python's buffered file, whose buffer is st_blksize: 2 MiB on a huge-page tmpfs, so every
    record refills 2 MiB (a 512 MiB file of 83 tensors: 17 ms, against 6 on 4 KiB pages).
    Asked to (where it can), torch computes the offsets from the first record's, as its
    own writer lays records out. FileMappings checks each against the zip's directory; a file
    laid out otherwise (rewritten by another zip tool) is loaded again, reading the headers."""
    if computed_offsets_config is not None:
        try:
            with (
                _computed_offsets,
                computed_offsets_config.patch({"load.calculate_storage_offsets": True}),
            ):
                return torch.load(path, mmap=True, **options)
        except Misplaced as error:
            log.debug("fastload: %s: %s; reading each record's header", path, error)
    return torch.load(path, mmap=True, **options)


def _device_storage(nbytes: int, device: torch.device) -> torch.UntypedStorage:
    return torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()


class FileMappings:
    """File offsets of storages that are slices of a mapping of `path` (torch's mmap=True load).

    /proc/self/maps is read once per load (and again only for an address it did not cover):
    torch maps the whole file once, before the first storage is restored. Each offset must be
    where a record of the storage's size begins (`records`, from read_zip_records).
    """

    def __init__(self, path: Path, records: dict[int, int]) -> None:
        self._path, self._records = path, records
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, file offset of start)

    def offset(self, storage: Storage) -> int:
        if storage.device.type != "cpu":
            raise Unmappable(f"a storage arrived on {storage.device}, not as a slice of the file")
        address = storage.data_ptr()
        for attempt in range(2):
            for start, end, file_offset in self._ranges:
                if start <= address and address + storage.nbytes() <= end:
                    return self._checked(address - start + file_offset, storage.nbytes())
            if attempt == 0:
                self._ranges = self._read_maps()
        raise Unmappable(
            "a storage is not a slice of the mapped file (not a plain tensor storage?)"
        )

    def _checked(self, offset: int, nbytes: int) -> int:
        if self._records.get(offset) != nbytes:
            raise Misplaced(f"no record of {nbytes} bytes begins at file offset {offset}")
        return offset

    def _read_maps(self) -> list[tuple[int, int, int]]:
        stat = self._path.stat()
        return [
            (m.start, m.end, m.offset)
            for m in mappings(Path("/proc/self/maps"))
            if m.key == (stat.st_dev, stat.st_ino)
        ]


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
