"""Checksum algorithms, by the names the config and digests use."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Protocol, cast


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


def available_algorithms() -> tuple[str, ...]:
    try:
        import blake3  # noqa: F401
    except ImportError:
        return ("sha256",)
    return ("sha256", "blake3")


def new_hasher(algorithm: str) -> Hasher:
    if algorithm == "blake3":
        import blake3

        # blake3 hashes large buffers on all cores and releases the GIL while it does.
        return cast(Hasher, blake3.blake3(max_threads=blake3.blake3.AUTO))
    return hashlib.new(algorithm)


def combine(algorithm: str, lines: list[str]) -> str:
    """The digest of a directory: the hash of its sorted "path size digest" lines. A file name
    that is not UTF-8 keeps its bytes (os.fsencode), as the kernel allows any but "/" and NUL."""
    hasher = new_hasher(algorithm)
    hasher.update(os.fsencode("".join(line + "\n" for line in sorted(lines))))
    return f"{algorithm}:{hasher.hexdigest()}"


def hash_file(path: str | os.PathLike[str], algorithm: str) -> str:
    hasher = new_hasher(algorithm)
    buffer = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            hasher.update(memoryview(buffer)[:count])
    return f"{algorithm}:{hasher.hexdigest()}"
