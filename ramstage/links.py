"""The stable links applications use. They change only by rename(2) over the old link
(invariant 2): `ln -sfn` unlinks first, and a reader in that instant finds nothing."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def read(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except (FileNotFoundError, OSError):
        return None


def point(link: Path, target: Path) -> None:
    if read(link) == str(target):
        return
    temporary = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.symlink(target, temporary)
    except FileNotFoundError:
        link.parent.mkdir(parents=True, exist_ok=True)  # someone removed the links directory
        os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except OSError:
        temporary.unlink()
        raise


def remove(link: Path) -> None:
    if link.is_symlink():
        link.unlink()


def prepare(links_dir: Path) -> None:
    """Creates the links directory and removes temporary links left by a crash."""
    links_dir.mkdir(parents=True, exist_ok=True)
    for entry in links_dir.glob(".*.tmp"):
        if entry.is_symlink():
            entry.unlink()
