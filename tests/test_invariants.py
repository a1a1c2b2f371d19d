"""DESIGN.md's invariants, each one attacked from outside the way a user or a fault would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LinkWatcher, sha256_file, wait_for, write_random


def test_links_never_dangle_or_point_at_anything_partial_across_flips(tmp_path, make_daemon):
    """Invariants 1 and 2: a reader polling the link through evict/stage cycles and a new source
    version only ever sees the source or a complete, published generation, and never no link."""
    source = write_random(tmp_path / "m.ckpt", 32 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    watcher = LinkWatcher(daemon.links / "m", source, daemon.store)
    watcher.start()
    try:
        daemon.wait_state("m", "staged")
        for _ in range(5):
            daemon.cli("evict", "m", check=True)
            daemon.cli("stage", "m", check=True)
    finally:
        watcher.stop()
    assert watcher.violations == []
    assert len(watcher.targets) == 2 and str(source) in watcher.targets
    assert watcher.reads > 1000
    assert not list(daemon.links.glob(".*.tmp"))  # no temporary links left behind


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


READER = (
    "import sys, hashlib; f = open(sys.argv[1], 'rb'); print('open', flush=True); "
    "sys.stdin.readline(); print(hashlib.sha256(f.read()).hexdigest(), flush=True)"
)


def test_a_reader_keeps_an_evicted_copy_and_its_bytes_show_as_pinned(tmp_path, make_daemon):
    """Invariant 3: the generation goes only after the link has moved; a process that still has
    it open keeps reading whole, verified bytes, and status counts them as pinned."""
    source = write_random(tmp_path / "m.ckpt", 8 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    staged = daemon.wait_state("m", "staged")
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            READER,
            str(daemon.links / "m"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "open"
        assert daemon.model("m")["users"] == [reader.pid]
        daemon.cli("evict", "m", check=True)
        assert not os.path.exists(staged["target"])
        model = daemon.model("m")
        assert model["pinned_bytes"] == 8 << 20
        assert model["users"] == [reader.pid]
        out, _ = reader.communicate("go\n", timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert out.strip() == sha256_file(source)
    wait_for(lambda: daemon.model("m")["pinned_bytes"] == 0)
    assert daemon.model("m")["users"] == []


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
