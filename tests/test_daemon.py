"""A real daemon staging a file and a directory into a real tmpfs, seen through the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sha256_file, wait_for, write_random

CONTRACT_MODEL_FIELDS = {
    "name",
    "state",
    "link",
    "target",
    "source",
    "size_bytes",
    "digest",
    "generation",
    "reason",
    "progress",
    "pinned_bytes",
    "users",
}


def make_tree(root: Path, outside: Path) -> Path:
    """A model directory of 20 shards in two levels, a symlink that stays inside (followed) and
    two that lead outside (skipped)."""
    for index in range(20):
        folder = "unet/" if index % 2 else ""
        write_random(root / f"{folder}shard{index:02d}.bin", (index + 1) << 16, seed=index)
    os.symlink("unet/shard01.bin", root / "alias.bin")
    write_random(outside, 4096, seed=99)
    os.symlink(outside, root / "escape.bin")
    os.symlink("../..", root / "unet" / "up")
    return root


def staged_files(generation: Path) -> dict[str, Path]:
    return {
        str(path.relative_to(generation)): path for path in generation.rglob("*") if path.is_file()
    }


@pytest.mark.root
def test_a_file_and_a_directory_are_staged_verified_and_read_only(tmp_path, make_daemon):
    big = write_random(tmp_path / "ssd" / "lama.ckpt", 64 << 20)
    tree = make_tree(tmp_path / "ssd" / "sd15", tmp_path / "elsewhere.bin")
    daemon = make_daemon(
        [{"name": "lama", "source": str(big)}, {"name": "sd15", "source": str(tree)}], mount=True
    ).start()
    daemon.wait_state("lama", "staged")
    daemon.wait_state("sd15", "staged")

    file_link, dir_link = daemon.links / "lama", daemon.links / "sd15"
    for link in (file_link, dir_link):
        assert link.is_symlink()
        assert os.path.realpath(link).startswith(str(daemon.store) + "/")
    assert sha256_file(file_link) == sha256_file(big)
    assert stat.S_IMODE(os.stat(file_link).st_mode) == 0o444
    # The generation directory stands for the source's parents. tmp_path's are root's, 0700:
    # nobody but root may pass.
    assert stat.S_IMODE(os.stat(os.path.dirname(os.path.realpath(file_link))).st_mode) == 0

    staged = staged_files(Path(os.path.realpath(dir_link)))
    expected = {
        str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file() and "escape" not in p.name
    } - {"unet/up"}
    assert set(staged) == expected
    assert len(expected) == 21  # 20 shards and the alias that stays inside
    for relpath, path in staged.items():
        assert sha256_file(path) == sha256_file(tree / relpath), relpath
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    for directory in [
        Path(os.path.realpath(dir_link)),
        *Path(os.path.realpath(dir_link)).rglob("*"),
    ]:
        if directory.is_dir():
            assert stat.S_IMODE(directory.stat().st_mode) == 0o555, directory

    result = daemon.cli("status", "--json", check=True)
    status = json.loads(result.stdout)
    assert {"version", "pid", "store", "memory", "models"} <= set(status)
    assert status["pid"] == daemon.process.pid
    assert status["store"]["path"] == str(daemon.store)
    assert status["store"]["mounted"] is True
    assert status["store"]["size_bytes"] == 2 << 30
    assert status["store"]["used_bytes"] >= big.stat().st_size
    assert status["memory"]["min_available_bytes"] == 512 << 20
    assert status["memory"]["available_bytes"] > 0
    assert status["memory"]["pressure"] is False
    by_name = {m["name"]: m for m in status["models"]}
    for m in by_name.values():
        assert CONTRACT_MODEL_FIELDS <= set(m), m
        assert m["state"] == "staged" and m["reason"] is None and m["progress"] == 1.0
        assert m["pinned_bytes"] == 0 and m["users"] == []
    lama = by_name["lama"]
    assert lama["link"] == str(file_link)
    assert lama["target"] == os.path.realpath(file_link)
    assert lama["source"] == str(big)
    assert lama["size_bytes"] == 64 << 20
    assert lama["digest"] == "sha256:" + sha256_file(big)
    assert lama["target"] == str(daemon.store / "lama" / lama["generation"] / "lama.ckpt")
    skipped = " ".join(by_name["sd15"]["skipped"])
    assert "escape.bin" in skipped and "unet/up" in skipped
    assert "escape.bin: symlink leads outside the source" in daemon.log()

    table = daemon.cli("status", check=True).stdout
    assert "lama" in table and "sd15" in table and "staged" in table


@pytest.mark.root
def test_evict_points_the_link_at_the_source_and_frees_the_ram_then_stage_brings_it_back(
    tmp_path, make_daemon
):
    big = write_random(tmp_path / "ssd" / "lama.ckpt", 64 << 20)
    daemon = make_daemon([{"name": "lama", "source": str(big)}], mount=True).start()
    staged = daemon.wait_state("lama", "staged")
    used_before = daemon.request("status")["store"]["used_bytes"]

    result = daemon.cli("evict", "lama", check=True)
    assert "lama" in result.stdout
    link = daemon.links / "lama"
    assert os.readlink(link) == str(big)
    model = daemon.model("lama")
    assert (model["state"], model["reason"]) == ("fallback", "evicted")
    assert not os.path.exists(staged["target"])
    used_after = daemon.request("status")["store"]["used_bytes"]
    assert used_before - used_after >= 64 << 20

    daemon.cli("stage", "lama", check=True)  # waits until staged
    model = daemon.model("lama")
    assert model["state"] == "staged"
    assert os.path.realpath(link).startswith(str(daemon.store) + "/")
    assert sha256_file(link) == sha256_file(big)
    assert daemon.request("status")["store"]["used_bytes"] >= used_after + (64 << 20)


def test_an_evicted_model_stays_on_its_source_until_staged(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    daemon.cli("evict", "m", check=True)
    daemon.cli("reload", check=True)  # a pass of the loop that could stage it again
    assert daemon.model("m")["state"] == "fallback"
    assert os.readlink(daemon.links / "m") == str(source)
    assert daemon.cli("stage", "--all", check=True).stdout.strip() == "staged: m"


def test_unknown_names_exit_2(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    for command in ("stage", "evict", "verify"):
        result = daemon.cli(command, "nope")
        assert result.returncode == 2, (command, result.stderr)
        assert "no model named nope" in result.stderr
    assert daemon.cli("status", "nope").returncode == 2
    assert daemon.cli("stage").returncode == 2  # neither a name nor --all
    assert daemon.model("m")["state"] == "staged"


def test_path_works_without_a_daemon(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}])
    result = daemon.cli("path", "m", check=True)
    assert result.stdout.strip() == str(daemon.links / "m")
    result = daemon.cli("path", "nope")
    assert result.returncode == 2
    assert "no model named nope" in result.stderr


def test_status_with_the_daemon_down_exits_3_and_names_the_fix(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}])
    for args in (("status",), ("status", "--json"), ("stage", "m"), ("evict", "m"), ("reload",)):
        result = daemon.cli(*args)
        assert result.returncode == 3, args
        assert f"ramstage is not running: no daemon listening at {daemon.socket}" in result.stderr
        assert "(systemctl start ramstage)" in result.stderr
        assert "Traceback" not in result.stderr


def test_status_with_no_config_file_looks_at_the_default_socket(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ramstage", "status", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    if Path("/run/ramstage/control.sock").exists():
        pytest.skip("a ramstage daemon runs on this machine")
    assert result.returncode == 3
    assert "/run/ramstage/control.sock" in result.stderr


def test_verify_rehashes_the_copies_in_ram(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 2 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    assert daemon.cli("verify", check=True).stdout.strip() == "verified: m"

    # Damage the RAM copy behind ramstage's back (only root could): verify must notice.
    target = Path(os.path.realpath(daemon.links / "m"))
    with open(target, "r+b") as f:
        f.write(b"\xff" * 16)
    result = daemon.cli("verify", "m")
    assert result.returncode == 1
    assert "digest mismatch in RAM: m" in result.stderr
    # Staged again: a fresh copy (content-named, so at the same path), which verifies.
    wait_for(
        lambda: (
            daemon.model("m")["state"] == "staged"
            and sha256_file(daemon.links / "m") == sha256_file(source)
        )
    )
    assert daemon.cli("verify", check=True).stdout.strip() == "verified: m"


def test_blake3_when_configured(tmp_path, make_daemon):
    blake3 = pytest.importorskip("blake3")
    source = write_random(tmp_path / "m.ckpt", 5 << 20)
    shards = write_random(tmp_path / "shards" / "a.bin", 3 << 20).parent
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}, {"name": "s", "source": str(shards)}],
        checksum="blake3",
    ).start()
    model = daemon.wait_state("m", "staged")
    assert model["digest"] == "blake3:" + blake3.blake3(source.read_bytes()).hexdigest()
    daemon.wait_state("s", "staged")
    assert sha256_file(daemon.links / "m") == sha256_file(source)
    assert sha256_file(daemon.links / "s" / "a.bin") == sha256_file(shards / "a.bin")
    assert daemon.cli("verify", check=True).stdout.strip() == "verified: m, s"
