"""Reload is all or nothing: models are added, removed and changed, or the old config stays."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import sha256_file, wait_for, write_random


def reload_with(daemon, how: str) -> None:
    if how == "sighup":
        daemon.process.send_signal(signal.SIGHUP)
    else:
        result = daemon.cli("reload", check=True)
        assert result.stdout.startswith("reloaded: ")


@pytest.mark.parametrize("how", ["sighup", "cli"])
def test_reload_adds_removes_and_changes_models(tmp_path, make_daemon, how):
    keep = write_random(tmp_path / "ssd" / "keep.ckpt", 2 << 20, seed=1)
    drop = write_random(tmp_path / "ssd" / "drop.ckpt", 2 << 20, seed=2)
    old_source = write_random(tmp_path / "ssd" / "v1.ckpt", 2 << 20, seed=3)
    new_source = write_random(tmp_path / "ssd" / "v2.ckpt", 3 << 20, seed=4)
    added = write_random(tmp_path / "ssd" / "added" / "shard.bin", 1 << 20, seed=5).parent
    daemon = make_daemon(
        [
            {"name": "keep", "source": str(keep)},
            {"name": "drop", "source": str(drop)},
            {"name": "change", "source": str(old_source)},
        ]
    ).start()
    staged = {name: daemon.wait_state(name, "staged") for name in ("keep", "drop", "change")}

    daemon.config["models"] = [
        {"name": "keep", "source": str(keep), "priority": 5},
        {"name": "change", "source": str(new_source)},
        {"name": "added", "source": str(added)},
    ]
    daemon.write_config()
    reload_with(daemon, how)

    wait_for(
        lambda: (
            {m["name"] for m in daemon.request("status")["models"]} == {"keep", "change", "added"}
        )
    )
    assert not os.path.lexists(daemon.links / "drop")
    assert not (daemon.store / "drop").exists()
    assert not os.path.exists(staged["drop"]["target"])

    keep_now = daemon.model("keep")
    assert keep_now["generation"] == staged["keep"]["generation"]  # untouched: no new copy
    assert keep_now["priority"] == 5

    # The old copy is served until the new source's is staged, then kept for its grace period.
    wait_for(
        lambda: (
            (m := daemon.model("change"))["state"] == "staged"
            and m["generation"] != staged["change"]["generation"]
            and m["reason"] is None
        )
    )
    assert daemon.model("change")["source"] == str(new_source)
    assert sha256_file(daemon.links / "change") == sha256_file(new_source)
    wait_for(lambda: not os.path.exists(staged["change"]["target"]), timeout=30)

    daemon.wait_state("added", "staged")
    assert os.path.realpath(daemon.links / "added").startswith(str(daemon.store) + "/")
    assert sha256_file(daemon.links / "added" / "shard.bin") == sha256_file(added / "shard.bin")
    assert "reloaded" in daemon.log()


@pytest.mark.parametrize("how", ["sighup", "cli"])
def test_an_invalid_config_keeps_the_old_one(tmp_path, make_daemon, how):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    good = daemon.config_path.read_text()
    daemon.config["models"] = [
        {"name": "m", "source": str(source)},
        {"name": "../evil", "source": "relative/path"},
    ]
    daemon.write_config()
    if how == "cli":
        result = daemon.cli("reload")
        assert result.returncode == 2
        assert "models[1].name" in result.stderr and "'../evil'" in result.stderr
        assert "models[1].source" in result.stderr
    else:
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused, keeping the running config" in daemon.log())
    assert "models[1].name" in daemon.log()
    status = daemon.request("status")
    assert [m["name"] for m in status["models"]] == ["m"]
    assert status["models"][0]["state"] == "staged"
    daemon.config_path.write_text(good)
    assert daemon.cli("reload").returncode == 0


def test_a_reload_cannot_move_the_store_links_or_socket(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    daemon.config["links_dir"] = str(tmp_path / "elsewhere")
    daemon.write_config()
    result = daemon.cli("reload")
    assert result.returncode == 2
    assert "links_dir: cannot change while running; restart ramstage" in result.stderr
    assert os.path.realpath(daemon.links / "m").startswith(str(daemon.store))


def test_reload_while_a_removed_model_is_being_copied(tmp_path, make_daemon):
    """The copy thread keeps creating files under the store while the model is removed: the
    daemon must neither race it nor stop."""
    shards = tmp_path / "shards"
    for index in range(300):
        write_random(shards / f"d{index % 7}" / f"{index}.bin", 256 << 10, seed=index)
    small = write_random(tmp_path / "small.ckpt", 1 << 20)
    daemon = make_daemon(
        [
            {"name": "big", "source": str(shards), "priority": 9},
            {"name": "small", "source": str(small)},
        ]
    ).start()
    wait_for(lambda: daemon.model("big")["progress"] > 0.2, interval=0.002)
    daemon.config["models"] = [{"name": "small", "source": str(small)}]
    daemon.write_config()
    result = daemon.cli("reload")
    assert result.returncode == 0, result.stderr + daemon.log()
    daemon.wait_state("small", "staged")
    wait_for(lambda: not (daemon.store / "big").exists())
    assert not os.path.lexists(daemon.links / "big")
    assert daemon.process.poll() is None
