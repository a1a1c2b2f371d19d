"""Hugging Face hub caches as huggingface_hub writes them: models named `hf: org/name`,
resolved through refs/, moved as a whole when refs/main moves, blobs checked against their
names and held once in RAM by every revision and model that has them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, sha256_file, wait_for
from hubcache import SHARED, HubCache

pytestmark = pytest.mark.root


def tag_of(directory: Path) -> str:
    """Which revision a loaded copy is, by every one of its files; fails on a mix."""
    tags = {
        json.loads((directory / "config.json").read_bytes())["revision"],
        json.loads((directory / "model.safetensors.index.json").read_bytes())["revision"],
        (directory / "model-00002-of-00002.safetensors").read_bytes()[:64].decode().strip(),
    }
    assert (directory / "model-00001-of-00002.safetensors").read_bytes() == SHARED
    assert len(tags) == 1, f"mixed revisions: {tags}"
    return tags.pop()


@pytest.fixture
def make_hub_daemon(make_daemon):  # type: ignore[no-untyped-def]
    """Daemons on a real tmpfs; the shards made here are random bytes, not safetensors."""

    def make(models: list[dict[str, Any]], **overrides: Any) -> Daemon:
        return make_daemon(  # type: ignore[no-any-return]
            [{"validate": "none", **m} for m in models], mount=True, **overrides
        )

    return make


def store_used_bytes(daemon: Daemon) -> int:
    st = os.statvfs(daemon.store)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_hf_resolves_through_refs_in_the_configured_cache_or_the_environment(
    tmp_path, make_hub_daemon
):
    hub = HubCache(tmp_path / "hub")
    old = hub.revision("v1")
    new = hub.revision("v2")
    daemon = make_hub_daemon(
        [
            {"name": "main", "hf": "org/name", "hf_cache": str(hub.cache)},
            {"name": "pinned", "hf": "org/name", "revision": old, "hf_cache": str(hub.cache)},
            {"name": "from-env", "hf": "org/name"},
        ],
    ).start(env={"HF_HUB_CACHE": str(hub.cache)})
    for name, commit in (("main", new), ("pinned", old), ("from-env", new)):
        model = daemon.wait_state(name, "staged")
        assert model["source"] == str(hub.snapshot(commit))
        copy = Path(model["target"])
        for file in hub.snapshot(commit).iterdir():
            assert not (copy / file.name).is_symlink()
            assert sha256_file(copy / file.name) == sha256_file(file), file.name
    # Evicted, the link points at the snapshot the revision names: the application sees the
    # same files through the cache.
    assert daemon.cli("evict", "main").returncode == 0
    assert os.readlink(daemon.links / "main") == str(hub.snapshot(new))


def test_a_repo_or_revision_not_in_the_cache_is_a_clear_error(tmp_path, make_hub_daemon):
    hub = HubCache(tmp_path / "hub")
    hub.revision("v1")
    daemon = make_hub_daemon(
        [
            {"name": "a", "hf": "org/missing", "hf_cache": str(hub.cache)},
            {"name": "b", "hf": "org/name", "revision": "v9", "hf_cache": str(hub.cache)},
            {"name": "c", "hf": "org/name", "source": "/x", "revision": "main"},
            {"name": "d", "source": "/x", "revision": "main"},
            {"name": "e", "hf": "../etc", "hf_cache": "~no-such-user-here"},
        ]
    )
    result = daemon.cli("check-config")
    assert result.returncode == 2
    lines = result.stdout + result.stderr
    assert f"models[0].hf: org/missing is not in the cache {hub.cache}" in lines
    assert f"models[1].hf: revision v9 is unknown in {hub.repo} (refs: main)" in lines
    assert "models[2].source: a model has source: or hf:, not both" in lines
    assert "models[3].revision: only taken with hf:" in lines
    assert "models[4].hf: expected a Hugging Face repo id such as org/name" in lines
    assert "models[4].hf_cache: no such user" in lines


def test_a_refs_main_move_switches_the_model_as_a_whole_while_readers_load_it(
    tmp_path, make_hub_daemon
):
    hub = HubCache(tmp_path / "hub")
    first = hub.revision("v1")
    daemon = make_hub_daemon(
        [{"name": "m", "hf": "org/name", "hf_cache": str(hub.cache)}],
    ).start()
    daemon.wait_state("m", "staged")
    loads: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        # An application resolves the link once, then opens the shards it lists.
        while not stop.is_set():
            try:
                loads.append(tag_of(Path(os.path.realpath(daemon.links / "m"))))
            except (OSError, AssertionError) as error:
                errors.append(repr(error))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        wait_for(lambda: len(loads) > 20)
        second = hub.revision("v2")  # as huggingface-cli download does: new blobs, then the ref
        model = wait_for(lambda: (m := daemon.model("m"))["source"].endswith(second) and m)
        model = wait_for(lambda: (m := daemon.model("m"))["target"].endswith(second) and m)
        wait_for(lambda: loads[-1] == "v2")
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert loads[0] == "v1" and loads[-1] == "v2"
    assert loads.index("v2") > 0 and "v1" not in loads[loads.index("v2") :]
    assert model["state"] == "staged" and model["source"] == str(hub.snapshot(second))
    assert first not in daemon.model("m")["target"]


def test_revisions_and_models_sharing_a_blob_hold_it_once(tmp_path, make_hub_daemon):
    hub = HubCache(tmp_path / "hub")
    old = hub.revision("v1")
    hub.revision("v2")
    daemon = make_hub_daemon([], store={"size": "256M"}).start()
    empty = store_used_bytes(daemon)
    daemon.config["models"] = [
        {"name": "a", "hf": "org/name", "hf_cache": str(hub.cache), "validate": "none"},
        {"name": "b", "hf": "org/name", "revision": old, "hf_cache": str(hub.cache)},
    ]
    daemon.config["models"][1]["validate"] = "none"
    daemon.write_config()
    assert daemon.cli("reload").returncode == 0
    a, b = daemon.wait_state("a", "staged"), daemon.wait_state("b", "staged")
    shard = "model-00001-of-00002.safetensors"
    assert os.stat(Path(a["target"]) / shard).st_ino == os.stat(Path(b["target"]) / shard).st_ino
    # The shared 6 MiB shard is in RAM once: the store holds it plus each revision's own files.
    own = (2 << 20) + 64 + 4096
    used = store_used_bytes(daemon) - empty
    assert a["size_bytes"] == b["size_bytes"] > len(SHARED)
    assert used < len(SHARED) + 2 * own + (1 << 20), used
    # Deleting one model's generation leaves the other's bytes, shared ones included.
    assert daemon.cli("evict", "b").returncode == 0
    wait_for(lambda: not Path(b["target"]).exists())
    assert tag_of(Path(a["target"])) == "v2"
    assert store_used_bytes(daemon) - empty > len(SHARED)
    assert daemon.cli("verify", "a").returncode == 0
    assert daemon.cli("evict", "a").returncode == 0
    wait_for(lambda: store_used_bytes(daemon) - empty < (1 << 20))


def test_a_blob_whose_bytes_do_not_match_its_name_is_refused(tmp_path, make_hub_daemon):
    hub = HubCache(tmp_path / "hub")
    commit = hub.revision("v1")
    shard = hub.snapshot(commit) / "model-00002-of-00002.safetensors"
    blob = shard.resolve()
    with open(blob, "r+b") as f:  # bit rot on the disk, after the download
        f.seek(100)
        f.write(b"\xff")
    daemon = make_hub_daemon(
        [{"name": "m", "hf": "org/name", "hf_cache": str(hub.cache)}],
    ).start()
    model = daemon.wait_state("m", "fallback")
    assert "its bytes do not have the sha256 its name says" in model["reason"]
    assert os.readlink(daemon.links / "m") == str(hub.snapshot(commit))
    # With xxh3 the name is not checked (a second, sha256 pass would be needed): staged.
    daemon.config["checksum"] = "xxh3"
    daemon.write_config()
    assert daemon.cli("reload").returncode == 0
    assert daemon.cli("stage", "m").returncode == 0
    daemon.wait_state("m", "staged")


def test_a_symlink_out_of_the_repo_is_refused_and_a_snapshot_never_stages_empty(
    tmp_path, make_hub_daemon
):
    hub = HubCache(tmp_path / "hub")
    commit = hub.revision("v1")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"root's only")
    secret.chmod(0o600)
    (hub.snapshot(commit) / "leak.bin").symlink_to(secret)
    (hub.snapshot(commit) / "shadow").symlink_to("/etc/shadow")
    lonely = hub.revision("v2", move_main=False)  # every file of it leads out of the repo
    for file in hub.snapshot(lonely).iterdir():
        file.unlink()
        file.symlink_to(secret)
    daemon = make_hub_daemon(
        [
            {"name": "m", "hf": "org/name", "hf_cache": str(hub.cache)},
            {"name": "out", "hf": "org/name", "revision": lonely, "hf_cache": str(hub.cache)},
        ],
    ).start()
    model = daemon.wait_state("m", "staged")
    assert sorted(model["skipped"]) == [
        "leak.bin: symlink leads outside the source",
        "shadow: symlink leads outside the source",
    ]
    assert not (Path(model["target"]) / "shadow").exists()
    refused = daemon.wait_state("out", "fallback")
    assert "nothing to stage" in refused["reason"] and refused["generation"] is None
    assert os.readlink(daemon.links / "out") == str(hub.snapshot(lonely))
    store_files = [f for _, _, files in os.walk(daemon.store) for f in files]
    assert "shadow" not in store_files and "leak.bin" not in store_files


def test_a_new_revision_needs_room_only_for_what_it_does_not_share(tmp_path, make_hub_daemon):
    """13 MiB hold one revision (8 MiB) and the next one's own 2 MiB beside it, not two full
    copies: the shared shard is neither copied nor counted again when the ref moves."""
    hub = HubCache(tmp_path / "hub")
    hub.revision("v1")
    daemon = make_hub_daemon(
        [{"name": "m", "hf": "org/name", "hf_cache": str(hub.cache)}],
        store={"size": "13M", "huge": "never"},
    ).start()
    first = daemon.wait_state("m", "staged")
    second = hub.revision("v2")
    model = wait_for(lambda: (m := daemon.model("m"))["target"].endswith(second) and m)
    assert model["state"] == "staged" and model["reason"] is None
    assert tag_of(Path(model["target"])) == "v2"
    assert first["generation"] != model["generation"]


def test_a_repo_downloaded_after_the_model_was_configured_is_staged(tmp_path, make_hub_daemon):
    hub = HubCache(tmp_path / "hub")
    hub.cache.mkdir()
    daemon = make_hub_daemon([{"name": "m", "hf": "org/name", "hf_cache": str(hub.cache)}])
    daemon.start()
    assert daemon.wait_state("m", "missing")["reason"] == "source_missing"
    assert "org/name is not in the cache" in daemon.log()
    commit = hub.revision("v1")  # watched from the cache directory: no rescan needed
    model = daemon.wait_state("m", "staged")
    assert model["source"] == str(hub.snapshot(commit))


def test_a_download_in_progress_is_taken_up_once_it_is_whole(tmp_path, make_hub_daemon):
    """huggingface_hub moves refs/main first, then writes each blob as NAME.incomplete and
    links it into the snapshot when done: a half-downloaded revision is never staged."""
    hub = HubCache(tmp_path / "hub")
    hub.revision("v1")
    daemon = make_hub_daemon([{"name": "m", "hf": "org/name", "hf_cache": str(hub.cache)}])
    daemon.start(debug=True)
    first = daemon.wait_state("m", "staged")
    commit = hashlib.sha1(b"v2").hexdigest()
    snapshot = hub.snapshot(commit)
    snapshot.mkdir()
    (hub.repo / "refs" / "main").write_text(commit)
    incomplete = hub.repo / "blobs" / "f00d.incomplete"
    with open(incomplete, "wb") as download:
        download.write(b"half a shard")
        (snapshot / "config.json").symlink_to(os.readlink(Path(first["source"]) / "config.json"))
        wait_for(lambda: "m: still open for writing" in daemon.log(), context=daemon.log)
        assert daemon.model("m")["generation"] == first["generation"]
        snapshot.rename(tmp_path / "partial")  # the download goes on, until the snapshot is whole
        hub.revision("v2")
    incomplete.unlink()
    model = wait_for(lambda: (m := daemon.model("m"))["target"].endswith(commit) and m)
    assert tag_of(Path(model["target"])) == "v2"


def test_a_copy_changed_in_ram_is_not_shared_again(tmp_path, make_hub_daemon):
    """The owner of a copy can change its bytes in RAM; a later model that would share the
    file hashes the copy first, finds it changed, and copies from the source instead."""
    hub = HubCache(tmp_path / "hub")
    commit = hub.revision("v1")
    daemon = make_hub_daemon([{"name": "a", "hf": "org/name", "hf_cache": str(hub.cache)}])
    a = daemon.start().wait_state("a", "staged")
    shard = Path(a["target"]) / "model-00001-of-00002.safetensors"
    mode = shard.stat().st_mode
    shard.chmod(0o644)
    with open(shard, "r+b") as f:
        f.write(b"changed in RAM")
    shard.chmod(mode)
    daemon.config["models"].append(
        {"name": "b", "hf": "org/name", "revision": commit, "hf_cache": str(hub.cache)}
    )
    daemon.config["models"][1]["validate"] = "none"
    daemon.write_config()
    assert daemon.cli("reload").returncode == 0
    b = daemon.wait_state("b", "staged")
    copy = Path(b["target"]) / shard.name
    assert copy.read_bytes() == SHARED and copy.stat().st_ino != shard.stat().st_ino


def test_a_restart_after_a_kill_adopts_an_hf_model_and_its_shared_files(tmp_path, make_hub_daemon):
    hub = HubCache(tmp_path / "hub")
    old = hub.revision("v1")
    hub.revision("v2")
    daemon = make_hub_daemon(
        [
            {"name": "a", "hf": "org/name", "hf_cache": str(hub.cache)},
            {"name": "b", "hf": "org/name", "revision": old, "hf_cache": str(hub.cache)},
        ]
    ).start()
    before = {name: daemon.wait_state(name, "staged") for name in ("a", "b")}
    daemon.stop(signal.SIGKILL)
    daemon.start()
    for name in ("a", "b"):
        assert daemon.wait_state(name, "staged")["target"] == before[name]["target"]
        assert (
            f"{name}: adopted generation {before[name]['generation']} without copying"
            in daemon.log()
        )
    shard = "model-00001-of-00002.safetensors"
    inodes = {os.stat(Path(before[n]["target"]) / shard).st_ino for n in ("a", "b")}
    assert len(inodes) == 1


def test_an_evicted_model_s_link_follows_its_ref_to_the_new_snapshot(tmp_path, make_hub_daemon):
    hub = HubCache(tmp_path / "hub")
    first = hub.revision("v1")
    daemon = make_hub_daemon([{"name": "m", "hf": "org/name", "hf_cache": str(hub.cache)}])
    daemon.start().wait_state("m", "staged")
    assert daemon.cli("evict", "m").returncode == 0
    assert os.readlink(daemon.links / "m") == str(hub.snapshot(first))
    second = hub.revision("v2")
    wait_for(lambda: os.readlink(daemon.links / "m") == str(hub.snapshot(second)))
    assert tag_of(daemon.links / "m") == "v2"
    assert daemon.model("m")["state"] == "fallback"  # held on its source until `ramstage stage`
    assert "the revision moved; the link follows it to" in daemon.log()
    assert "was not where it belongs" not in daemon.log()
