"""`watch.config: true`: a daemon whose config is a ConfigMap volume reloads when kubelet swaps
it, with no signal and no restart."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from conftest import wait_for, write_random
from kubelet import project


def test_a_configmap_update_is_reloaded_and_a_bad_one_keeps_the_running_config(
    tmp_path, make_daemon
):
    a = write_random(tmp_path / "ssd" / "a.bin", 1 << 20)
    b = write_random(tmp_path / "ssd" / "b.bin", 1 << 20, seed=1)
    daemon = make_daemon([{"name": "a", "source": str(a)}], watch={"config": True})
    volume = tmp_path / "configmap"
    daemon.config_path = volume / "ramstage.yaml"

    def publish(config: dict[str, object]) -> None:
        project(volume, {"ramstage.yaml": yaml.safe_dump(config)})

    publish(daemon.config)
    daemon.start()
    daemon.wait_state("a", "staged")

    publish(
        {
            **daemon.config,
            "models": [{"name": "a", "source": str(a)}, {"name": "b", "source": str(b)}],
        }
    )

    def names() -> list[str]:
        return [m["name"] for m in daemon.request("status")["models"]]

    wait_for(lambda: names() == ["a", "b"], context=daemon.log)
    daemon.wait_state("b", "staged")

    publish({**daemon.config, "models": "not a list"})
    wait_for(lambda: "reload refused" in daemon.log(), context=daemon.log)
    assert names() == ["a", "b"]

    assert inotify_instances(daemon.process.pid) == 2  # sources, and the config's directory

    # Turned off by the reload it triggers: the config's watch goes.
    off = {**daemon.config, "watch": {"config": False}}
    publish({**off, "models": [{"name": "b", "source": str(b)}]})
    wait_for(lambda: names() == ["b"], context=daemon.log)
    wait_for(lambda: inotify_instances(daemon.process.pid) == 1)
    assert daemon.log().count("changed: reloading") == 3


def inotify_instances(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(os.readlink(fds / fd) == "anon_inode:inotify" for fd in os.listdir(fds))
