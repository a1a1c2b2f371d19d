"""The record kept beside every generation: what was copied, from where, with which digest."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

Identity = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns of a source file


@dataclass(frozen=True)
class StagedFile:
    relpath: str
    size_bytes: int
    digest: str
    identity: Identity


@dataclass(frozen=True)
class Manifest:
    name: str
    source: str
    kind: str  # "file" or "dir"
    digest: str
    files: tuple[StagedFile, ...]
    skipped: tuple[str, ...] = ()

    @property
    def generation_id(self) -> str:
        """Generations are named by content, so one source version is one generation."""
        return self.digest.partition(":")[2][:16]

    @property
    def algorithm(self) -> str:
        return self.digest.partition(":")[0]

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def identities(self) -> tuple[tuple[str, Identity], ...]:
        return tuple((f.relpath, f.identity) for f in self.files)

    def to_json(self) -> str:
        return json.dumps({"format": 1, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data: dict[str, Any] = json.loads(text)
        if data.pop("format", None) != 1:
            raise ValueError("unknown manifest format")
        files = tuple(
            StagedFile(f["relpath"], f["size_bytes"], f["digest"], tuple(f["identity"]))  # type: ignore[arg-type]
            for f in data.pop("files")
        )
        return cls(files=files, skipped=tuple(data.pop("skipped")), **data)
