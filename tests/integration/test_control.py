"""The control socket: bad requests, silent clients, strangers, and failures inside the daemon
answered as errors while it keeps running."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
from conftest import raw_request, sha256_file, wait_for, write_random


@pytest.mark.parametrize(
    ("payload", "error_type", "words"),
    [
        (b"not json\n", "BadRequest", "not a JSON message"),
        (b"[1, 2]\n", "BadRequest", "a message is a JSON object"),
        (b'{"v": 2, "cmd": "status"}\n', "BadRequest", "unsupported protocol version 2"),
        (b'{"cmd": "status"}\n', "BadRequest", "unsupported protocol version None"),
        (b'{"v": 1, "cmd": "format-disk"}\n', "BadRequest", "unknown command 'format-disk'"),
        (b'{"v": 1, "cmd": "evict", "names": "m"}\n', "Failed", "names must be a list"),
        (b'{"v": 1, "cmd": "stage", "names": [1]}\n', "Failed", "names must be a list"),
        (b"{" + b" " * (2 << 20) + b"}\n", "BadRequest", "message longer than"),
    ],
    ids=["garbage", "array", "version", "no-version", "command", "names", "name-type", "huge"],
)
def test_bad_requests_get_a_clear_error_and_the_daemon_keeps_running(
    tmp_path, make_daemon, payload, error_type, words
):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    reply = raw_request(daemon.socket, payload)
    assert reply["ok"] is False
    assert reply["error"]["type"] == error_type
    assert words in reply["error"]["message"]
    assert raw_request(daemon.socket, b'{"v": 1, "cmd": "status"}\n')["ok"] is True
    assert daemon.process.poll() is None


def test_a_client_that_says_nothing_does_not_block_others(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    try:
        for sock in silent:
            sock.connect(str(daemon.socket))
        assert daemon.request("status")["models"][0]["name"] == "m"
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.root
def test_strangers_may_read_status_but_not_change_anything(public_dir, tmp_path, make_daemon):
    source = write_random(public_dir / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}], root=public_dir).start()
    daemon.root.chmod(0o755)
    daemon.wait_state("m", "staged")

    def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-m",
                "ramstage",
                args[0],
                "--config",
                str(daemon.config_path),
                *args[1:],
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "HOME": "/"},
        )

    status = as_nobody("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["models"][0]["state"] == "staged"
    for args in (("evict", "m"), ("stage", "m"), ("verify",), ("reload",)):
        result = as_nobody(*args)
        assert result.returncode == 4, (args, result.stderr)
        assert f"{args[0]} needs root or membership of the group ramstage" in result.stderr
    assert daemon.model("m")["state"] == "staged"
    assert os.path.realpath(daemon.links / "m").startswith(str(daemon.store))


def test_a_daemon_that_dies_mid_request_is_reported_as_a_failure(tmp_path, make_daemon):
    """A listener that hangs up without answering (a daemon dying mid-request): exit 1 and a
    pointer to the log, not a usage error."""
    daemon = make_daemon([])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(daemon.socket))
        listener.listen(1)

        def hang_up() -> None:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        result = daemon.cli("status")
        thread.join()
    assert result.returncode == 1
    assert f"no valid answer from ramstage at {daemon.socket}" in result.stderr
    assert "journalctl -u ramstage" in result.stderr


def test_an_error_inside_the_loop_fails_the_request_not_the_daemon(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    # A file where the links directory should be: no link can be made there.
    shutil.rmtree(daemon.links)
    daemon.links.write_text("in the way")
    result = daemon.cli("evict", "m")
    assert result.returncode == 1, result.stderr
    assert f"cannot change the link {daemon.links / 'm'}: Not a directory" in result.stderr
    assert "internal error" not in result.stderr + daemon.log()
    assert daemon.process is not None and daemon.process.poll() is None
    daemon.links.unlink()
    # The next look at the links puts the missing one back, on the copy in RAM.
    wait_for(lambda: (daemon.links / "m").exists(), context=daemon.log)
    assert os.path.realpath(daemon.links / "m").startswith(str(daemon.store))
    assert sha256_file(daemon.links / "m") == sha256_file(source)
    assert daemon.cli("evict", "m").returncode == 0


def test_status_right_after_a_request_shows_what_it_changed(tmp_path, make_daemon):
    """The loop answered a request before publishing the snapshot status reads, so a status
    asked at once could show the state from before an evict, a stage or a reload."""
    sources = [write_random(tmp_path / f"{name}.ckpt", 4096, seed=i) for i, name in enumerate("mn")]
    models = [{"name": s.stem, "source": str(s)} for s in sources]
    daemon = make_daemon(models).start()
    daemon.wait_state("m", "staged")
    for _ in range(10):
        daemon.request("evict", names=["m"])
        assert (daemon.model("m")["state"], daemon.model("m")["reason"]) == ("fallback", "evicted")
        daemon.request("stage", names=["m"])
        assert daemon.model("m")["state"] == "staged"
        daemon.config["models"] = models[:1]
        daemon.write_config()
        daemon.request("reload")
        assert [m["name"] for m in daemon.request("status")["models"]] == ["m"]
        daemon.config["models"] = models
        daemon.write_config()
        daemon.request("reload")
        assert [m["name"] for m in daemon.request("status")["models"]] == ["m", "n"]
