"""SIGKILL at the worst moments: links stay whole, partial copies go, verified ones are kept."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import sha256_file, wait_for, write_random


class LinkWatcher(threading.Thread):
    """Reads a link as fast as it can and records anything an application must never see: no
    link at all, or a target that is neither the source nor a complete, published generation."""

    def __init__(self, link: Path, source: Path, store: Path) -> None:
        super().__init__(daemon=True)
        self.link, self.source, self.store = link, source, store
        self.size = source.stat().st_size
        self.violations: list[str] = []
        self.targets: set[str] = set()
        self.reads = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.reads += 1
            try:
                target = os.readlink(self.link)
            except OSError as error:
                self.violations.append(f"readlink: {error}")
                continue
            self.targets.add(target)
            if target != str(self.source):
                self._check_generation(Path(target))

    def _check_generation(self, target: Path) -> None:
        generation = target.parent
        manifest = generation.parent / f"{generation.name}.json"
        if generation.parent.parent != self.store or generation.name.startswith("."):
            self.violations.append(f"not a generation in the store: {target}")
        elif not manifest.exists():
            self.violations.append(f"no manifest for {target}")
        elif json.loads(manifest.read_text())["files"][0]["size_bytes"] != self.size:
            self.violations.append(f"manifest of another size for {target}")
        elif os.stat(target).st_size != self.size or os.stat(target).st_mode & 0o222:
            self.violations.append(f"incomplete or writable: {target}")

    def stop(self) -> None:
        self._done.set()
        self.join()


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
    assert [p.name for p in (daemon.store / "big").iterdir() if p.is_dir()] == [
        model["generation"]
    ]


@pytest.mark.parametrize("mount", [pytest.param(True, marks=pytest.mark.root), False],
                         ids=["tmpfs", "directory"])
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
        assert after["target"] == os.readlink(daemon.links / name)
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
