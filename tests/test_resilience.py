"""Faults the loop must survive, and updates that must not cost the verified copy."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import sha256_file, wait_for, write_random

from ramstage.watcher import SourceWatcher


def test_a_removed_links_directory_is_made_again(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    shutil.rmtree(daemon.links)
    assert daemon.cli("evict", "m").returncode == 0
    assert os.readlink(daemon.links / "m") == str(source)


def test_an_error_inside_the_loop_fails_the_request_not_the_daemon(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    # A file where the links directory should be: no link can be made there.
    shutil.rmtree(daemon.links)
    daemon.links.write_text("in the way")
    result = daemon.cli("evict", "m")
    assert result.returncode == 1 and "internal error" in result.stderr
    assert "internal error in the event loop; carrying on" in daemon.log()
    assert daemon.process is not None and daemon.process.poll() is None
    daemon.links.unlink()
    # The next look at the links puts the missing one back, on the copy in RAM.
    wait_for(lambda: (daemon.links / "m").exists(), context=daemon.log)
    assert os.path.realpath(daemon.links / "m").startswith(str(daemon.store))
    assert sha256_file(daemon.links / "m") == sha256_file(source)
    assert daemon.cli("evict", "m").returncode == 0


def test_a_watch_that_cannot_be_made_asks_for_one_rescan_not_one_per_attempt(tmp_path, monkeypatch):
    # The kernel's watch limit (ENOSPC) cannot be reached on demand without starving every other
    # inotify user on the machine, so inotify_add_watch is made to fail the way it then does.
    rescans: list[str] = []
    watcher = SourceWatcher(lambda name: None, rescans.append)

    def no_room(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher._instance(), "add_watch", no_room)
    source = write_random(tmp_path / "src" / "m.ckpt", 1024)
    for _ in range(5):
        watcher.watch({"m": source})
    assert len(rescans) == 2  # one per directory watched (the parent and the grandparent)
    watcher.stop()


def test_stage_retries_a_new_version_that_failed(tmp_path, make_daemon):
    source = tmp_path / "m.safetensors"
    header = b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}'
    good = len(header).to_bytes(8, "little") + header + b"abcd"
    source.write_bytes(good)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    first = daemon.wait_state("m", "staged")
    source.write_bytes(good[:-2])  # truncated: the new version fails validation
    # While the new version copies, the reason is source_changed: wait past it for the failure.
    model = wait_for(
        lambda: (m := daemon.model("m"))["reason"] not in (None, "source_changed") and m,
        context=daemon.log,
    )
    assert model["state"] == "staged" and model["generation"] == first["generation"]
    assert model["reason"].startswith("error: invalid checkpoint")
    attempts = len(re.findall(r"m: staging \d+ bytes", daemon.log()))
    result = daemon.cli("stage", "m")
    assert result.returncode == 1 and "invalid checkpoint" in result.stderr
    assert len(re.findall(r"m: staging \d+ bytes", daemon.log())) == attempts + 1
    assert (daemon.links / "m").read_bytes() == good  # still the verified previous version


@pytest.mark.root
def test_an_update_that_cannot_fit_beside_the_current_copy_keeps_it(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 6 << 20, seed=1)
    content = source.read_bytes()
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}], mount=True, store={"size": "16M"}
    ).start()
    daemon.wait_state("m", "staged")
    bigger = tmp_path / ".next"
    write_random(bigger, 12 << 20, seed=2)
    bigger.replace(source)
    model = wait_for(
        lambda: (m := daemon.model("m"))["reason"] == "too_large" and m, context=daemon.log
    )
    assert model["state"] == "staged"
    assert (daemon.links / "m").read_bytes() == content
    assert Path(os.path.realpath(daemon.links / "m")).is_relative_to(daemon.store)
