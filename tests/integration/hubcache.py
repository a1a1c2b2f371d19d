"""A Hugging Face hub cache made by hand, laid out as huggingface_hub writes it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHARED = os.urandom(6 << 20)  # a shard that two revisions have in common


class HubCache:
    """A cache laid out as huggingface_hub writes it: blobs/ named by sha256, refs/main, and
    snapshots/COMMIT/ of relative symlinks into ../../blobs/, with a shard index."""

    def __init__(self, cache: Path, repo_id: str = "org/name") -> None:
        self.cache, self.repo_id = cache, repo_id
        self.repo = cache / ("models--" + repo_id.replace("/", "--"))

    def revision(self, tag: str, *, move_main: bool = True) -> str:
        """A commit whose every file says `tag` in its first bytes, beside the shared shard."""
        commit = hashlib.sha1(tag.encode()).hexdigest()
        files = {
            "model-00001-of-00002.safetensors": SHARED,
            "model-00002-of-00002.safetensors": tag.encode().ljust(64) + os.urandom(2 << 20),
            "config.json": json.dumps({"revision": tag}).encode(),
            "model.safetensors.index.json": json.dumps(
                {"revision": tag, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
            ).encode(),
        }
        snapshot = self.repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, data in files.items():
            blob = self.repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            if not blob.exists():
                blob.write_bytes(data)
            (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
        if move_main:
            (self.repo / "refs").mkdir(exist_ok=True)
            # huggingface_hub writes the ref in place (ref_path.write_text(commit_hash)).
            (self.repo / "refs" / "main").write_text(commit)
        return commit

    def snapshot(self, commit: str) -> Path:
        return self.repo / "snapshots" / commit
