"""Things going wrong: wrong digests, sources rewritten mid-copy, full stores, strangers on the
socket. Each leaves the link on something whole and the daemon running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import sha256_file, wait_for, write_random

from ramstage.protocol import read_message


def test_a_digest_that_does_not_match_keeps_the_model_on_its_source(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 2 << 20)
    wrong = "sha256:" + "0" * 64
    daemon = make_daemon([{"name": "m", "source": str(source), "digest": wrong}]).start()
    model = daemon.wait_state("m", "fallback")
    assert model["reason"].startswith("error: digest mismatch: expected " + wrong)
    assert "sha256:" + sha256_file(source) in model["reason"]
    assert os.readlink(daemon.links / "m") == str(source)
    assert [p for p in daemon.store.rglob("*") if p.is_file()] == [daemon.store / ".ramstage-store"]
    result = daemon.cli("stage", "m")
    assert result.returncode == 1
    assert "m: not staged (error: digest mismatch" in result.stderr


def test_a_digest_that_matches_is_staged(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 2 << 20)
    digest = "sha256:" + sha256_file(source)
    daemon = make_daemon([{"name": "m", "source": str(source), "digest": digest}]).start()
    assert daemon.wait_state("m", "staged")["digest"] == digest


WRITER = textwrap.dedent(
    """
    import os, sys, time
    path, mode = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_WRONLY)
    deadline = time.monotonic() + 0.3  # shorter than the stager's first back-off (0.4 s)
    offset = 0
    while time.monotonic() < deadline:
        if mode == "rewrite":
            os.pwrite(fd, os.urandom(4096), offset % os.fstat(fd).st_size)
            offset += 1 << 20
        else:
            os.ftruncate(fd, os.fstat(fd).st_size - (1 << 20))
        time.sleep(0.005)
    os.close(fd)
    """
)


@pytest.mark.root
@pytest.mark.parametrize("mode", ["rewrite", "truncate"])
def test_a_source_changed_during_the_copy_is_copied_again(tmp_path, make_daemon, mode):
    """A writer process changes the file while the daemon copies it (in place, or by cutting it
    shorter: with an mmap'd source that would be SIGBUS). The copy is retried and what ends up
    linked is the final source, byte for byte."""
    source = write_random(tmp_path / "ssd" / "m.ckpt", 512 << 20)
    original = sha256_file(source)
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=True)
    daemon.start(wait=False)
    wait_for(lambda: any(daemon.store.glob("m/.partial-*")), interval=0.001)
    subprocess.run([sys.executable, "-c", WRITER, str(source), mode], check=True)
    model = daemon.wait_state("m", "staged", timeout=60)
    final = sha256_file(source)
    assert final != original
    assert model["digest"] == "sha256:" + final
    assert sha256_file(daemon.links / "m") == final
    assert model["size_bytes"] == source.stat().st_size
    assert daemon.process.poll() is None
    assert list(daemon.store.glob("m/.partial-*")) == []


@pytest.mark.root
def test_a_model_larger_than_the_store_falls_back_as_too_large(tmp_path, make_daemon):
    fits = write_random(tmp_path / "fits.ckpt", 10 << 20, seed=1)
    too_big = write_random(tmp_path / "big.ckpt", 24 << 20, seed=2)
    daemon = make_daemon(
        [
            {"name": "fits", "source": str(fits), "priority": 1},
            {"name": "big", "source": str(too_big)},
        ],
        mount=True,
        store={"size": "16M"},
    ).start()
    daemon.wait_state("fits", "staged")
    big = daemon.wait_state("big", "fallback")
    assert big["reason"] == "too_large"
    assert os.readlink(daemon.links / "big") == str(too_big)
    assert not list(daemon.store.glob("big/*"))
    assert "big: not staged (too_large)" in daemon.log()
    result = daemon.cli("stage", "big")
    assert result.returncode == 1 and "big: not staged (too_large)" in result.stderr


def test_a_copy_that_would_take_memavailable_under_the_floor_is_not_made(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}],
        memory={"min_available": "100%", "resume_available": "100%"},
    ).start()
    model = daemon.wait_state("m", "fallback")
    # Below the floor already: "pressure" where a pressure watcher runs, else "too_large".
    assert model["reason"] in ("too_large", "pressure")
    assert os.readlink(daemon.links / "m") == str(source)
    assert not list(daemon.store.glob("m/*"))


def raw_request(path: Path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it stopped reading after the limit; its answer is waiting
        return read_message(sock)


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
