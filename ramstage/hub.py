"""Hugging Face hub caches, as huggingface_hub lays them out (its file_download.py):

    CACHE/models--ORG--NAME/blobs/SHA256      an LFS file, named by the sha256 of its bytes
                           blobs/SHA1         a small file, named by git's sha1 of it
                           refs/REVISION      the commit a branch or tag names: 40 hex digits
                           snapshots/COMMIT/  the files of a commit: relative symlinks to blobs

A model named `hf: ORG/NAME` is resolved in its cache through refs/REVISION each time its
source is looked at, so a `huggingface-cli download` that moves refs/main is a source update
like any other, and the model moves to the new snapshot as a whole.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ramstage.access import Trust
from ramstage.errors import RamstageError
from ramstage.sources import HUB_REPO_PREFIXES, open_source

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REF_BYTES = 256  # a ref holds one commit hash and a newline


@dataclass(frozen=True)
class HubRepo:
    """`hf: ORG/NAME`, its `revision:` (a branch, a tag or a commit) and the cache it is in."""

    repo_id: str
    revision: str
    cache: Path

    def __str__(self) -> str:
        return f"hf:{self.repo_id}@{self.revision}"

    @property
    def path(self) -> Path:
        return self.cache / ("models--" + self.repo_id.replace("/", "--"))

    @property
    def refs(self) -> Path:
        return self.path / "refs"

    def snapshot(self, trust: Trust | None) -> Path:
        """The snapshot the revision names now: the commit in refs/REVISION, else the revision
        itself (a commit hash names its snapshot directly, as huggingface_hub has it). A ref
        that cannot be read leads to a snapshot that is not there: the model is missing, and
        problem() says why. With no trust rule, the ref is not read at all."""
        commit = self._commit(trust) if trust is not None else None
        return self.path / "snapshots" / (commit or self.revision)

    def _commit(self, trust: Trust) -> str | None:
        try:
            # By the trust rule, like any source: the ref chooses what is copied.
            opened = open_source(self.refs / self.revision, trust)
        except (OSError, RamstageError):
            return None
        try:
            if not stat.S_ISREG(opened.st.st_mode):  # a directory where the ref should be
                return None
            text = os.read(opened.fd, _REF_BYTES).decode("ascii", "replace").strip()
        finally:
            os.close(opened.fd)
        return text if COMMIT_RE.fullmatch(text) else None

    def problem(self, trust: Trust) -> str | None:
        """Why the revision has no snapshot in the cache, in words that name the fix."""
        if not self.path.is_dir():
            return f"{self.repo_id} is not in the cache {self.cache} (huggingface-cli download)"
        ref = self.refs / self.revision
        commit = self._commit(trust)
        if commit is None and ref.exists():
            return f"{ref} does not name a commit, or may not be read by the trust rule"
        if commit is None and not COMMIT_RE.fullmatch(self.revision):
            known = sorted(
                str(p.relative_to(self.refs)) for p in self.refs.rglob("*") if p.is_file()
            )
            listed = ", ".join(known) or "none"
            return f"revision {self.revision} is unknown in {self.path} (refs: {listed})"
        if not self.snapshot(trust).is_dir():
            return f"{self.repo_id}: no snapshot {commit or self.revision} in {self.path}"
        return None


def default_cache(environ: Mapping[str, str]) -> Path:
    """Where huggingface_hub itself keeps its cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub ($XDG_CACHE_HOME for ~/.cache) of the user ramstage runs as."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"])
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]) / "hub"
    home = environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    return Path(environ.get("XDG_CACHE_HOME") or Path(home) / ".cache") / "huggingface" / "hub"


def user_cache(user: str) -> Path:
    """`~USER`: that user's default cache (KeyError if there is no such user)."""
    return Path(pwd.getpwnam(user).pw_dir) / ".cache" / "huggingface" / "hub"


class DamagedBlob(RamstageError):
    """A blob whose bytes do not have the sha256 its name promises."""


def check_blob(path: Path, digest: str) -> None:
    """Refuses an LFS blob whose bytes, as the copy hashed them, do not have the sha256 of its
    name. Only a sha256 copy can tell, from the digest it computes anyway; with another
    algorithm it would take a second pass over every byte, so the name is not checked."""
    promised = lfs_sha256(path)
    algorithm, _, value = digest.partition(":")
    if promised and algorithm == "sha256" and value != promised:
        raise DamagedBlob(
            f"{path}: its bytes do not have the sha256 its name says; the cache is damaged"
            " (huggingface-cli download --force-download)"
        )


def downloads(snapshot: Path) -> set[tuple[int, int]]:
    """(device, inode) of the blobs being downloaded into a snapshot's repo: huggingface_hub
    moves refs/main first, then writes each file to blobs/NAME.incomplete and renames it once
    complete. While a process holds one open for writing, the snapshot is not whole yet; one
    left behind by a download that stopped holds nothing up."""
    repo = snapshot.parent.parent
    if snapshot.parent.name != "snapshots" or not repo.name.startswith(HUB_REPO_PREFIXES):
        return set()
    found = set()
    for path in (repo / "blobs").glob("*.incomplete"):
        try:
            st = path.lstat()
        except FileNotFoundError:  # finished meanwhile
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def lfs_sha256(path: Path) -> str | None:
    """The sha256 a blob's name promises, for an LFS blob of a hub cache (a small file's blob
    is named by git's sha1 of it instead, which says nothing of its bytes' sha256)."""
    blobs = path.parent
    if blobs.name != "blobs" or not blobs.parent.name.startswith(HUB_REPO_PREFIXES):
        return None
    return path.name if _SHA256_RE.fullmatch(path.name) else None
