"""Sources as real machines keep them: a Hugging Face hub cache snapshot, hard links, file
names that are not UTF-8, and directories whose every entry must be skipped."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import sha256_file, write_random

pytestmark = pytest.mark.root
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(cache: Path, repo_id: str = "org/name") -> Path:
    """A cache repo laid out as huggingface_hub writes it: blobs named by their sha256,
    refs/main, and a snapshot of relative symlinks, with a shard index and one blob behind
    two names."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    contents = {
        "model-00001-of-00002.safetensors": os.urandom(3 << 20),
        "model-00002-of-00002.safetensors": os.urandom(2 << 20),
        "config.json": b'{"architectures": ["Demo"]}',
    }
    contents["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    ).encode()
    for name, data in contents.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
    # The same blob under a second name, as a revision that renames a file has it.
    (snapshot / "generation_config.json").symlink_to(os.readlink(snapshot / "config.json"))
    return repo


def test_a_hub_snapshot_stages_the_files_its_symlinks_lead_to(tmp_path, make_daemon):
    repo = hub_repo(tmp_path / "hub")
    snapshot = repo / "snapshots" / REVISION
    outside = write_random(tmp_path / "elsewhere" / "secret.bin", 1000)
    (snapshot / "leak.bin").symlink_to(outside)
    daemon = make_daemon(
        [{"name": "m", "source": str(snapshot), "validate": "none"}], mount=True
    ).start()
    model = daemon.wait_state("m", "staged")

    copy = daemon.links / "m"
    names = sorted(p.name for p in snapshot.iterdir() if p.name != "leak.bin")
    assert sorted(os.listdir(copy)) == names
    for name in names:
        assert not (copy / name).is_symlink()
        assert sha256_file(copy / name) == sha256_file(snapshot / name), name
    # One blob behind two names is one inode in RAM, and counted once.
    assert os.stat(copy / "config.json").st_ino == os.stat(copy / "generation_config.json").st_ino
    blob_bytes = sum(p.stat().st_size for p in (repo / "blobs").iterdir())
    assert model["size_bytes"] == blob_bytes
    assert model["skipped"] == ["leak.bin: symlink leads outside the source"]


def test_a_directory_whose_every_entry_is_skipped_is_refused_not_emptied(tmp_path, make_daemon):
    source = tmp_path / "ssd" / "m"
    source.mkdir(parents=True)
    (source / "weights.bin").symlink_to(write_random(tmp_path / "elsewhere.bin", 1000))
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=True).start()
    model = daemon.wait_state("m", "fallback")
    assert "nothing to stage" in model["reason"]
    assert os.readlink(daemon.links / "m") == str(source)  # the application keeps its source
    assert model["generation"] is None


def test_hard_links_are_copied_once_and_odd_names_keep_their_bytes(tmp_path, make_daemon):
    source = tmp_path / "ssd" / "m"
    first = write_random(source / "a.bin", 2 << 20)
    os.link(first, source / "b.bin")
    odd = os.fsencode(source) + b"/caf\xe9-latin1.bin"  # not UTF-8
    with open(odd, "wb") as f:
        f.write(b"odd name")
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=True).start()
    model = daemon.wait_state("m", "staged")

    copy = Path(model["target"])
    assert os.stat(copy / "a.bin").st_ino == os.stat(copy / "b.bin").st_ino
    assert model["size_bytes"] == (2 << 20) + len(b"odd name")
    with open(os.fsencode(copy) + b"/caf\xe9-latin1.bin", "rb") as f:
        assert f.read() == b"odd name"
    assert daemon.cli("verify", check=True).returncode == 0
