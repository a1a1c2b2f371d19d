"""SIGKILL at the worst moments: links stay whole, partial copies go, verified ones are kept."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import LinkWatcher, sha256_file, wait_for, write_random


def partials(store: Path) -> list[Path]:
    return list(store.glob("*/.partial-*"))


@pytest.mark.root
def test_sigkill_in_the_middle_of_a_1gib_copy_links_nothing_partial(tmp_path, make_daemon):
    source = write_random(tmp_path / "ssd" / "big.ckpt", 1 << 30)
    daemon = make_daemon([{"name": "big", "source": str(source)}], mount=True).start()
    link = daemon.links / "big"
    watcher = LinkWatcher(link, source, daemon.store)
    watcher.start()
    try:
        wait_for(lambda: 0.1 < daemon.model("big")["progress"] < 0.8, interval=0.005)
        daemon.stop(signal.SIGKILL)
        cut_short = partials(daemon.store)
        assert len(cut_short) == 1
        assert os.readlink(link) == str(source)

        daemon.start()
        assert not any(path.exists() for path in cut_short)
        model = daemon.wait_state("big", "staged", timeout=120)
    finally:
        watcher.stop()
    assert watcher.violations == []
    assert watcher.targets == {str(source), model["target"]}
    assert watcher.reads > 1000
    assert partials(daemon.store) == []
    assert sha256_file(link) == sha256_file(source)
    assert [p.name for p in (daemon.store / "big").iterdir() if p.is_dir()] == [model["generation"]]


@pytest.mark.parametrize(
    "mount", [pytest.param(True, marks=pytest.mark.root), False], ids=["tmpfs", "directory"]
)
def test_sigkill_after_staging_then_restart_adopts_without_copying(tmp_path, make_daemon, mount):
    source = write_random(tmp_path / "ssd" / "m.ckpt", 16 << 20)
    shards = write_random(tmp_path / "ssd" / "shards" / "a.bin", 1 << 20).parent
    write_random(shards / "sub" / "b.bin", 1 << 20, seed=1)
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}, {"name": "s", "source": str(shards)}], mount=mount
    ).start()
    before = {name: daemon.wait_state(name, "staged") for name in ("m", "s")}
    inodes = {
        name: os.stat(Path(model["target"]) / ("a.bin" if name == "s" else "")).st_ino
        for name, model in before.items()
    }
    daemon.stop(signal.SIGKILL)

    daemon.start()
    for name in ("m", "s"):
        after = daemon.model(name)  # adopted before the socket opens: no wait
        assert after["state"] == "staged"
        assert after["generation"] == before[name]["generation"]
        assert after["target"] == os.path.realpath(daemon.links / name)
        path = Path(after["target"]) / ("a.bin" if name == "s" else "")
        assert os.stat(path).st_ino == inodes[name]
        assert f"{name}: adopted generation {after['generation']} without copying" in daemon.log()
    assert "m: staging" not in daemon.log().split("adopted")[-1]


def test_a_source_that_changed_while_the_daemon_was_down_is_copied_again(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    old = daemon.wait_state("m", "staged")
    daemon.stop(signal.SIGKILL)
    write_random(source, 4 << 20, seed=7)  # a new version, same size

    daemon.start()
    new = daemon.wait_state("m", "staged")
    assert new["generation"] != old["generation"]
    assert sha256_file(daemon.links / "m") == sha256_file(source)
    assert not Path(old["target"]).exists()


def test_a_damaged_generation_is_not_adopted(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    old = daemon.wait_state("m", "staged")
    daemon.stop(signal.SIGKILL)
    # A crash after the copy but with the generation cut short (say, a full disk under a
    # plain-directory store): its size no longer matches the manifest.
    target = Path(old["target"])
    target.parent.chmod(0o755)
    target.chmod(0o644)
    os.truncate(target, 1 << 20)

    daemon.start()
    new = daemon.wait_state("m", "staged")
    assert sha256_file(daemon.links / "m") == sha256_file(source)
    assert "adopted" not in daemon.log()
    assert new["generation"] == old["generation"]  # the same content, copied afresh
