"""torch.load(mmap=True) as fastload runs it, to learn where a torch zip checkpoint's storages
lie in the file.

torch finds each storage's bytes by reading its record's zip header through Python's buffered
file, whose buffer is the file system's block size: 2 MiB on a huge-page tmpfs, so every record
refills 2 MiB (a 512 MiB file of 83 tensors took 17 ms to plan there, 6 ms on 4 KiB pages).
Asked to, torch computes the offsets instead, as its own writer lays the records out: in the
order the pickle first uses their keys, each right after the one before. fastload asks only
where the file shows that layout (records data/0, data/1, ... in that order, and the pickle
using the keys in that order), and checks every storage torch maps against the record the
zip's directory puts there; otherwise torch reads each header.
"""

from __future__ import annotations

import logging
import os
import pickletools
import struct
import sys
import zipfile
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch.types import Storage

from ramstage.fastload.formats import Plan, Unmappable, flat_bytes
from ramstage.fastload.pipeline import Segment, Strided
from ramstage.holders import mappings

log = logging.getLogger("ramstage.fastload")

SMALL_BUFFER_BYTES = 64 << 10  # headers read through a buffer this small cost little
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra field length
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
GET_OPS = {"GET", "BINGET", "LONG_BINGET"}

try:  # a torch that can compute its records' offsets (2.11 and 2.13 here); patches are per thread
    from torch.utils.serialization import config

    computed_offsets_config: Any = (
        config if hasattr(config.load, "calculate_storage_offsets") else None
    )
except ImportError:
    computed_offsets_config = None

# A storage torch mapped and its file offset (-1 for an empty one): what map_location returns.
Place = Callable[[Storage, int], Storage]
Layout = list[tuple[int, int]]  # where each storage's record begins, and its size, in key order


class Misplaced(Unmappable):
    """A storage torch mapped does not lie where the zip's directory puts its record."""


class TorchZip:
    """One torch zip checkpoint, loaded with torch.load(mmap=True) as often as a plan needs:
    its zip directory is read once, for the checks and for the layout torch's writer gives it
    (then torch computes the offsets, until one misses its record)."""

    def __init__(self, path: Path, *, copied: bool) -> None:
        """copied: the file's bytes will be copied, so torch must map them unchanged
        (Unmappable if it would not, or if the file is no zip)."""
        self.path = path
        self.layout: Layout | None = None
        try:
            with zipfile.ZipFile(path) as archive:
                if copied:
                    _check_mappable(archive)
                if computed_offsets_config and os.stat(path).st_blksize > SMALL_BUFFER_BYTES:
                    self.layout = writers_layout(path, archive)
        except (zipfile.BadZipFile, OSError) as error:
            if copied:
                raise Unmappable(f"not a torch zip checkpoint: {error}") from None

    def load(self, place: Place | None, **options: Any) -> Any:
        """torch.load(path, mmap=True, **options), each storage handed to place() with its
        file offset (place None: each stays the slice of the mapping torch made)."""
        if self.layout is not None:
            try:
                with computed_offsets_config.patch({"load.calculate_storage_offsets": True}):
                    locate = _Locator(self.path, place, self.layout)
                    return torch.load(self.path, mmap=True, map_location=locate, **options)
            except Misplaced as error:
                log.debug("fastload: %s: %s; reading each record's header", self.path, error)
                self.layout = None
        where = _Locator(self.path, place, None) if place else "cpu"
        return torch.load(self.path, mmap=True, map_location=where, **options)


class _Locator:
    """torch.load's map_location: each storage's file offset, read off the mapping, and where
    torch computed it, checked against the record of that storage's turn."""

    def __init__(self, path: Path, place: Place | None, records: Layout | None) -> None:
        self.mappings, self.place, self.records = FileMappings(path), place, records
        self.loaded = 0  # storages so far: torch loads each once, in the pickle's order

    def __call__(self, storage: Storage, location: str) -> Storage:
        nbytes = storage.nbytes()
        offset = self.mappings.offset(storage) if nbytes else -1
        index, self.loaded = self.loaded, self.loaded + 1
        if self.records is not None:
            start, size = self.records[index] if index < len(self.records) else (-1, -1)
            if size != nbytes or (nbytes and start != offset):
                raise Misplaced(f"storage {index} ({nbytes} bytes at {offset}) is not its record")
        return self.place(storage, offset) if self.place else storage


def writers_layout(path: Path, archive: zipfile.ZipFile) -> Layout | None:
    """Where the bytes of records data/0, data/1, ... begin, and how many, if they lie in
    that order, stored, and the pickle first uses the keys in that order, as torch's writer
    makes them; None for any other layout."""
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
        return None
    prefix = pickles[0].removesuffix("data.pkl") + "data/"
    infos = sorted(archive.infolist(), key=lambda info: info.header_offset)
    storages = [info for info in infos if info.filename.startswith(prefix)]
    names = [f"{prefix}{key}" for key in range(len(storages))]
    if [info.filename for info in storages] != names or any(
        info.compress_type != zipfile.ZIP_STORED for info in storages
    ):
        return None
    try:
        if storage_keys(archive.read(pickles[0])) != [str(k) for k in range(len(names))]:
            return None
        with open(path, "rb", buffering=0) as raw:
            return [(_data_start(raw.fileno(), info), info.file_size) for info in storages]
    except (zipfile.BadZipFile, OSError, struct.error, ValueError):
        return None


def _data_start(fd: int, info: zipfile.ZipInfo) -> int:
    header = os.pread(fd, ZIP_LOCAL_HEADER.size, info.header_offset)
    magic, name_bytes, extra_bytes = ZIP_LOCAL_HEADER.unpack(header)
    if magic != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    return int(info.header_offset + ZIP_LOCAL_HEADER.size + name_bytes + extra_bytes)


def storage_keys(pickled: bytes) -> list[str] | None:
    """The storage keys a torch pickle uses, in the order of first use, read off its opcodes
    without running it. Each storage is a persistent id, a tuple whose last three items are
    the key, the location and the size; None where a key is not a string it can read."""
    keys: dict[str, None] = {}  # in the order of first use
    strings: dict[int, str] = {}  # memo index -> a string put there
    recent: deque[tuple[str, Any]] = deque(maxlen=4)  # the last opcodes, memo puts left out
    memo_size = 0
    for opcode, arg, _ in pickletools.genops(pickled):
        if opcode.name in MEMO_OPS:
            index = memo_size if opcode.name == "MEMOIZE" else cast(int, arg)
            if recent and recent[-1][0] in STRING_OPS:
                strings[index] = recent[-1][1]
            memo_size = max(memo_size, index + 1)
        elif opcode.name == "BINPERSID":
            if len(recent) < 4 or recent[-1][0] != "TUPLE":
                return None
            name, value = recent[-4]
            key = value if name in STRING_OPS else strings.get(value) if name in GET_OPS else None
            if key is None:
                return None
            keys.setdefault(key)
            recent.clear()
        else:
            recent.append((opcode.name, arg))
    return list(keys)


def map_torch_zip(path: Path) -> Any:
    """What torch.load(path, mmap=True, map_location="cpu") gives."""
    return TorchZip(path, copied=False).load(None)


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
    checkpoint = TorchZip(path, copied=True)
    ranges: dict[int, tuple[int, torch.UntypedStorage]] = {}  # file offset -> (nbytes, storage)

    def mapper(hand_out_device_storage: bool) -> Place:
        def restore(storage: Storage, offset: int) -> Storage:
            nbytes = storage.nbytes()
            if not nbytes:
                return cast(Storage, torch.UntypedStorage(0, device=device))  # type: ignore[no-untyped-call]
            known = ranges.setdefault(offset, (nbytes, _device_storage(nbytes, device)))
            if known[0] != nbytes:
                raise Unmappable(f"two storages of different sizes at file offset {offset}")
            return cast(Storage, known[1]) if hand_out_device_storage else storage

        return restore

    # Any failure: leave it to plain torch.load, which gives the authoritative result or error.
    try:
        result = checkpoint.load(mapper(True), weights_only=True)
        if _plain(result):
            return Plan(_segments(path, ranges), lambda: result)
    except Exception as error:  # noqa: BLE001
        log.debug("fastload: %s: one weights_only pass is not enough: %s", path, error)
    try:
        checkpoint.load(mapper(False))
    except Exception as error:  # noqa: BLE001
        raise Unmappable(f"torch.load(mmap=True) failed: {type(error).__name__}: {error}") from None
    known_offsets = set(ranges)

    def finish() -> Any:
        try:
            result = checkpoint.load(mapper(True))
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


def _check_mappable(archive: zipfile.ZipFile) -> None:
    """torch byteswaps storages of a foreign byte order in memory, and maps a compressed
    record's bytes as they lie in the file: file bytes would be wrong either way."""
    names = [n for n in archive.namelist() if n.endswith("/byteorder")]
    order = archive.read(names[0]).decode() if names else sys.byteorder
    if order != sys.byteorder:
        raise Unmappable(f"saved as {order}-endian, this machine is {sys.byteorder}-endian")
    packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise Unmappable(f"{len(packed)} compressed records ({packed[0]}, ...): not mappable")


def _device_storage(nbytes: int, device: torch.device) -> torch.UntypedStorage:
    return torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()


class FileMappings:
    """File offsets of storages that are slices of a mapping of `path` (torch's mmap=True load).

    /proc/self/maps is read once per load (and again only for an address it did not cover):
    torch maps the whole file once, before the first storage is restored.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, file offset of start)

    def offset(self, storage: Storage) -> int:
        if storage.device.type != "cpu":
            raise Unmappable(f"a storage arrived on {storage.device}, not as a slice of the file")
        address = storage.data_ptr()
        for attempt in range(2):
            for start, end, file_offset in self._ranges:
                if start <= address and address + storage.nbytes() <= end:
                    return address - start + file_offset
            if attempt == 0:
                self._ranges = self._read_maps()
        raise Unmappable(
            "a storage is not a slice of the mapped file (not a plain tensor storage?)"
        )

    def _read_maps(self) -> list[tuple[int, int, int]]:
        stat = self._path.stat()
        return [
            (m.start, m.end, m.offset)
            for m in mappings(Path("/proc/self/maps"))
            if m.key == (stat.st_dev, stat.st_ino)
        ]
