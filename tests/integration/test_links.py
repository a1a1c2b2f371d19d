"""Links: never dangling or partial across flips, put back when removed, and a reader of a
copy the link has left keeps it (pinned)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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


def test_a_removed_links_directory_is_made_again(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    shutil.rmtree(daemon.links)
    assert daemon.cli("evict", "m").returncode == 0
    assert os.readlink(daemon.links / "m") == str(source)
