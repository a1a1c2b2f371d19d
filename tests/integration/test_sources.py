"""Sources as real machines keep them: a Hugging Face hub cache snapshot, hard links, file
names that are not UTF-8, and directories whose every entry must be skipped."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
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


SHARE_SCRIPT = """
import os, sys
from pathlib import Path
from ramstage.copier import stage_source
from ramstage.store import Generation
source, store = Path(sys.argv[1]), Path(sys.argv[2])
first = stage_source("m", source, store / "g1", "xxh3")
files = zip(first.files, Generation(store / "g1", first).file_paths())
copies = {(f.identity, f.access, "xxh3"): (path, f.digest) for f, path in files}
stage_source("m", source, store / "g2", "xxh3", copies=copies)
inodes = {os.stat(store / g / "m" / n).st_ino for g in ("g1", "g2") for n in ("a.bin", "b.bin")}
print(len(inodes))
"""


def test_the_units_capabilities_let_copies_a_user_owns_be_shared(tmp_path):
    """fs.protected_hardlinks lets only a file's owner, or CAP_FOWNER, link a file it cannot
    write: with no more than the unit's capabilities, a model of another user's with a hard
    link stages, and a second generation shares its copy."""
    unit = (Path(__file__).parents[2] / "units" / "ramstage.service").read_text()
    caps = next(line for line in unit.splitlines() if line.startswith("CapabilityBoundingSet="))
    allowed = ",".join("+" + cap[4:].lower() for cap in caps.split("=", 1)[1].split())
    source = tmp_path / "m"
    write_random(source / "a.bin", 1 << 20)
    os.link(source / "a.bin", source / "b.bin")
    for path in (source, source / "a.bin"):
        os.chown(path, 65534, 65534)
    store = tmp_path / "store"
    for generation in ("g1", "g2"):
        (store / generation).mkdir(parents=True)
    result = subprocess.run(
        ["setpriv", f"--bounding-set=-all,{allowed}", "--inh-caps=-all", sys.executable]
        + ["-c", SHARE_SCRIPT, str(source), str(store)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"  # one inode for both names in both generations
