"""The config watcher with real inotify, fed the way kubelet updates a ConfigMap volume."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import wait_for
from kubelet import project

from ramstage.watcher import ConfigWatcher


def test_a_configmap_swap_is_seen_once_and_a_swap_to_the_same_contents_not_at_all(tmp_path):
    volume = tmp_path / "etc-ramstage"
    project(volume, {"ramstage.yaml": "models: []\n"})
    path = volume / "ramstage.yaml"
    seen: list[str] = []
    lock = threading.Lock()

    def changed() -> None:
        with lock:
            seen.append(path.read_text())

    watcher = ConfigWatcher(path, changed)
    watcher.start()
    try:
        project(volume, {"ramstage.yaml": "models: [1]\n"})
        wait_for(lambda: seen, context=lambda: str(seen))
        project(volume, {"ramstage.yaml": "models: [1]\n"})  # same contents: nothing
        project(volume, {"ramstage.yaml": "models: [2]\n"})
        wait_for(lambda: len(seen) == 2, context=lambda: str(seen))
    finally:
        watcher.stop()
    # Events are read in order, so the call for [2] came after any for the second [1].
    assert seen == ["models: [1]\n", "models: [2]\n"]
    assert len(list(volume.glob("..2*"))) == 1  # the helper left one projection, as kubelet


def test_a_file_renamed_into_place_is_seen_too(tmp_path):
    path = tmp_path / "ramstage.yaml"
    path.write_text("a: 1\n")
    seen = threading.Event()
    watcher = ConfigWatcher(path, seen.set)
    watcher.start()
    try:
        (tmp_path / "new.yaml").write_text("a: 2\n")
        (tmp_path / "new.yaml").rename(path)
        assert seen.wait(20)
    finally:
        watcher.stop()


def test_a_directory_that_cannot_be_watched_leaves_reload_by_signal(tmp_path, caplog):
    watcher = ConfigWatcher(tmp_path / "gone" / "ramstage.yaml", lambda: None)
    watcher.start()
    assert watcher.thread is None
    assert "reload by SIGHUP" in caplog.text
    watcher.stop()


def test_stop_without_start_is_harmless():
    ConfigWatcher(Path("/nonexistent/ramstage.yaml"), lambda: None).stop()
