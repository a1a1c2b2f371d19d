"""Staging: a source copied, verified and published as a read-only generation behind its link;
sources only ever read; the daemon without torch."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sha256_file, torch_like_zip, wait_for, write_random


def test_daemon_stages_a_file_into_a_plain_directory_store(tmp_path, make_daemon):
    source = write_random(tmp_path / "src" / "m.ckpt", 3 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    model = daemon.wait_state("m", "staged")
    link = daemon.links / "m"
    assert os.path.realpath(link).startswith(str(daemon.store))
    assert sha256_file(link) == sha256_file(source)
    assert model["digest"] == "sha256:" + sha256_file(source)


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
        assert set(m) >= CONTRACT_MODEL_FIELDS, m
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


def test_a_digest_that_does_not_match_keeps_the_model_on_its_source(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 2 << 20)
    wrong = "sha256:" + "0" * 64
    daemon = make_daemon([{"name": "m", "source": str(source), "digest": wrong}]).start()
    model = daemon.wait_state("m", "fallback")
    assert model["reason"].startswith("error: digest mismatch: expected " + wrong)
    assert "sha256:" + sha256_file(source) in model["reason"]
    assert os.readlink(daemon.links / "m") == str(source)
    assert [p for p in daemon.store.rglob("*") if p.is_file()] == [daemon.store / ".ramstage-store"]
    result = daemon.cli("stage", "m")
    assert result.returncode == 1
    assert "m: not staged (error: digest mismatch" in result.stderr


def test_a_digest_that_matches_is_staged(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 2 << 20)
    digest = "sha256:" + sha256_file(source)
    daemon = make_daemon([{"name": "m", "source": str(source), "digest": digest}]).start()
    assert daemon.wait_state("m", "staged")["digest"] == digest


def test_the_daemon_leaves_a_truncated_checkpoint_on_its_source_with_the_reason(
    tmp_path, make_daemon
):
    (tmp_path / "src").mkdir()
    data = torch_like_zip(tmp_path / "full.ckpt", os.urandom(1 << 20)).read_bytes()
    source = tmp_path / "src" / "bad.ckpt"
    source.write_bytes(data[:-100])
    good = torch_like_zip(tmp_path / "src" / "good.ckpt")
    daemon = make_daemon(
        [{"name": "bad", "source": str(source)}, {"name": "good", "source": str(good)}]
    ).start()
    daemon.wait_state("good", "staged")
    model = daemon.wait_state("bad", "fallback")
    assert model["reason"].startswith("error: invalid checkpoint: bad.ckpt: not a readable zip")
    assert model["generation"] is None
    assert os.readlink(daemon.links / "bad") == str(source)
    assert not [p for p in (daemon.store / "bad").glob("*") if not p.name.startswith(".")]
    retry = daemon.cli("stage", "bad")
    assert retry.returncode == 1
    assert "invalid checkpoint" in retry.stderr


@pytest.mark.root
def test_a_published_generation_cannot_be_written_by_others(public_dir, make_daemon):
    """Invariant 3: no write bits anywhere in a generation, so a user other than the source's
    owner can neither change nor add to it."""
    source = write_random(public_dir / "shards" / "a.bin", 1 << 20).parent
    daemon = make_daemon([{"name": "m", "source": str(source)}], root=public_dir).start()
    daemon.root.chmod(0o755)
    model = daemon.wait_state("m", "staged")
    generation = Path(model["target"])
    attempt = write_attempts(generation)
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            attempt,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout.split() == ["denied", "denied", "denied"], result.stderr
    assert sha256_file(generation / "a.bin") == sha256_file(source / "a.bin")


def write_attempts(generation: Path) -> str:
    return (
        "import os\n"
        f"for action in (lambda: open('{generation}/a.bin', 'r+b'),\n"
        f"               lambda: open('{generation}/new.bin', 'wb'),\n"
        f"               lambda: os.rename('{generation}/a.bin', '{generation}/b.bin')):\n"
        "    try:\n"
        "        action()\n"
        "        print('allowed')\n"
        "    except PermissionError:\n"
        "        print('denied')\n"
    )


@pytest.mark.root
def test_sources_are_only_ever_read(tmp_path, make_daemon):
    """Invariant 4: staging works from a read-only mount, and no operation changes a byte, the
    mode or the times of a source."""
    ssd = tmp_path / "ssd"
    write_random(ssd / "a.ckpt", 4 << 20)
    write_random(ssd / "b" / "shard.bin", 1 << 20)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(ssd), str(read_only)], check=True)
    try:
        before = {p: (p.stat(), sha256_file(p)) for p in ssd.rglob("*") if p.is_file()}
        time.sleep(0.01)  # so that any write would show in the times
        daemon = make_daemon(
            [
                {"name": "a", "source": str(read_only / "a.ckpt")},
                {"name": "b", "source": str(read_only / "b")},
            ],
            mount=True,
        ).start()
        for name in ("a", "b"):
            daemon.wait_state(name, "staged")
        daemon.cli("verify", check=True)
        daemon.cli("evict", "a", "b", check=True)
        daemon.cli("stage", "--all", check=True)
        daemon.cli("reload", check=True)
        assert daemon.stop(signal.SIGTERM) == 0
        for path, (st, digest) in before.items():
            now = path.stat()
            assert (now.st_mode, now.st_size, now.st_mtime_ns, now.st_ctime_ns) == (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            ), path
            assert sha256_file(path) == digest
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


IMPORTED_HEAVY_MODULES = (
    "import sys, ramstage.daemon, ramstage.cli; "
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
)


def test_the_daemon_never_imports_torch(tmp_path, make_daemon):
    """Invariant 6, in the running daemon: no torch library is mapped into it."""
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    daemon.cli("verify", check=True)
    maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
    assert "python" in maps  # the check reads the right process
    assert "torch" not in maps
    modules = subprocess.run(
        [
            sys.executable,
            "-c",
            IMPORTED_HEAVY_MODULES,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert modules.stdout.strip() == "[]"
