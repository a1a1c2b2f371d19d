"""The source watcher in-process: what it asks of the loop when a watch cannot be made."""

from __future__ import annotations

import errno

from conftest import write_random

from ramstage.watcher import SourceWatcher


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
        watcher.watch({"m": (source,)})
    assert len(rescans) == 2  # one per directory watched (the parent and the grandparent)
    watcher.stop()
