"""The record kept beside every generation: what was copied, from where, with which digest, and
who may read the copy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

Identity = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns of a source file
Access = tuple[int, int, int]  # uid, gid, mode of a copied file or directory
CopyKey = tuple[Identity, Access, str]  # a source file, its copy's access, the digest's algorithm
# 2: copies keep their sources' owners and modes. Generations of format 1 are world-readable
# whatever their sources were: a start removes them (and copies again) rather than adopt them.
FORMAT = 2


@dataclass(frozen=True)
class StagedFile:
    relpath: str
    size_bytes: int
    digest: str
    identity: Identity
    access: Access


@dataclass(frozen=True)
class Manifest:
    name: str
    source: str
    kind: str  # "file" or "dir"
    digest: str
    files: tuple[StagedFile, ...]
    skipped: tuple[str, ...] = ()
    root: str = ""  # a directory source's copy: GEN/root/…
    gate: Access = (0, 0, 0o111)  # the generation directory (access.gate)
    dirs: tuple[tuple[str, int, int, int], ...] = ()  # relpath, uid, gid, mode
    staged_at: float | None = None  # unix time the copy was verified (None: not recorded)
    copy_seconds: float | None = None  # how long the copy and its checks took

    @property
    def generation_id(self) -> str:
        """Named by content and by who may read it: one source version is one generation,
        and a chmod or chown of the source makes a new one."""
        access = json.dumps([self.root, self.gate, self.dirs, [f.access for f in self.files]])
        return hashlib.sha256(f"{self.digest}\n{access}".encode()).hexdigest()[:16]

    @property
    def algorithm(self) -> str:
        return self.digest.partition(":")[0]

    @property
    def size_bytes(self) -> int:
        """The bytes the copy takes: files that were one inode in the source (hard links, one
        Hugging Face blob behind two names) are one inode in the copy too."""
        return sum({f.identity[:2]: f.size_bytes for f in self.files}.values())

    def identities(self) -> tuple[tuple[str, Identity], ...]:
        return tuple((f.relpath, f.identity) for f in self.files)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data: dict[str, Any] = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise ValueError("a manifest of another format")
        files = tuple(
            StagedFile(
                f["relpath"],
                f["size_bytes"],
                f["digest"],
                tuple(f["identity"]),
                tuple(f["access"]),
            )
            for f in data.pop("files")
        )
        return cls(
            files=files,
            skipped=tuple(data.pop("skipped")),
            gate=tuple(data.pop("gate")),
            dirs=tuple(tuple(d) for d in data.pop("dirs")),
            **data,
        )
