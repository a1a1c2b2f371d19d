"""Checksum algorithms, by the names the config and digests use."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Protocol, cast

import xxhash


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


# xxh3 (128-bit, about 15x sha256 here) is the default: ramstage depends on xxhash, which
# Debian packages (python3-xxhash). blake3 is pip only, so optional.
DEFAULT_ALGORITHM = "xxh3"
BLAKE3_INSTALL = "pip install 'ramstage[blake3]'"


def available_algorithms() -> tuple[str, ...]:
    """The checksums this Python can compute, fastest first."""
    try:
        import blake3  # noqa: F401
    except ImportError:
        return ("xxh3", "sha256")
    return ("xxh3", "blake3", "sha256")


def new_hasher(algorithm: str) -> Hasher:
    if algorithm == "xxh3":
        return cast(Hasher, xxhash.xxh3_128())
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


def hash_file(
    path: str | os.PathLike[str],
    algorithm: str,
    on_bytes: Callable[[int], None] = lambda nbytes: None,
) -> str:
    hasher = new_hasher(algorithm)
    buffer = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            hasher.update(memoryview(buffer)[:count])
            on_bytes(count)
    return f"{algorithm}:{hasher.hexdigest()}"
