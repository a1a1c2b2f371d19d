"""The stable links applications use. They change only by rename(2) over the old link
(invariant 2): `ln -sfn` unlinks first, and a reader in that instant finds nothing.

A link to a generation in the tree that holds the links directory (by default /run/ramstage,
which holds the store) is relative (`../store/NAME/GEN/FILE`), so that tree resolves wherever
it is mounted, e.g. in a container at another path. A link to a source is absolute, and
resolves only where the source is at the same path."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from ramstage.errors import RamstageError

Step = Callable[[str], None]  # System.step: the crash hook's count of changes


class LinkError(RamstageError):
    """A link that cannot be changed: the links directory is read-only or immutable. Nothing
    changed; the link still serves what it served."""

    def __init__(self, link: Path, error: OSError) -> None:
        denied = error.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
        hint = f" (is {link.parent} read-only or immutable?)" if denied else ""
        super().__init__(f"cannot change the link {link}: {error.strerror or error}{hint}")


def read(link: Path) -> str | None:
    """The absolute path the link points at, however it is written."""
    try:
        text = os.readlink(link)
    except (FileNotFoundError, OSError):
        return None
    return os.path.normpath(os.path.join(link.parent, text))


def text_for(link: Path, target: Path, *, relative: bool) -> str:
    tree = link.parent.parent
    # The kernel resolves `..` from the directory the link really is in: only a directory
    # reached through no symlink has `..` where its path says.
    if (
        relative
        and tree != Path("/")
        and target.is_relative_to(tree)
        and os.path.realpath(link.parent) == str(link.parent)
    ):
        return os.path.relpath(target, link.parent)
    return str(target)


def point(link: Path, target: Path, *, relative: bool = False, step: Step) -> None:
    if read(link) == str(target):
        return
    temporary = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
    text = text_for(link, target, relative=relative)
    step(f"link {temporary.name}")
    try:
        try:
            os.symlink(text, temporary)
        except FileNotFoundError:
            link.parent.mkdir(parents=True, exist_ok=True)  # someone removed the links directory
            os.symlink(text, temporary)
    except OSError as error:
        raise LinkError(link, error) from error
    step(f"flip {link.name} -> {target}")
    try:
        os.replace(temporary, link)
    except OSError as error:
        temporary.unlink()
        raise LinkError(link, error) from error


def remove(link: Path, *, step: Step) -> None:
    if link.is_symlink():
        step(f"unlink {link.name}")
        try:
            link.unlink()
        except OSError as error:
            raise LinkError(link, error) from error


def prepare(links_dir: Path, names: set[str], *, step: Step) -> None:
    """Creates the links directory and removes temporary links left by a crash, and the links
    of models no longer configured (removed from the config while no daemon ran)."""
    links_dir.mkdir(parents=True, exist_ok=True)
    for entry in links_dir.iterdir():
        temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
        if entry.is_symlink() and (temporary or entry.name not in names):
            step(f"unlink {entry.name}")
            entry.unlink()
