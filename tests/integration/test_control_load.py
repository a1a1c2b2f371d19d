"""The control socket under load from a hostile local user: root is always served, every client
gets a clean answer (a result or Busy), slow clients are cut off, and the CLI waits out a busy
daemon or says plainly that it gave up."""

from __future__ import annotations

import json
import pwd
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import wait_for, write_random

from ramstage.control import CONNECTIONS_PER_UID, REQUEST_SECONDS
from ramstage.peers import ADMIN_GROUP, Turns
from ramstage.protocol import encode

NOBODY = 65534

# Runs as the unprivileged user: slow clients that send one byte every 4 s and connect again
# when cut off, then a burst of concurrent one-shot status clients; prints what each saw.
FLOOD = r"""
import json, socket, sys, threading, time
from ramstage.protocol import read_message
path, slow_count, burst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds = float(sys.argv[4])
stop = time.monotonic() + seconds
cut_after, burst_outcomes, lock = [], [], threading.Lock()

def slow():
    while time.monotonic() < stop:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(4)
        try:
            s.connect(path)
        except BlockingIOError:
            time.sleep(0.1)
            continue
        started = time.monotonic()
        try:
            while time.monotonic() < stop:
                s.sendall(b"{")
                try:
                    s.recv(4096)
                    break  # an answer (Busy, or the deadline's error), or the end
                except socket.timeout:
                    continue
        except OSError:
            pass
        with lock:
            cut_after.append(time.monotonic() - started)
        s.close()

def one_status(barrier):
    barrier.wait()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect(path)
        try:
            s.sendall(b'{"v": 1, "cmd": "status"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_message(s)
        outcome = "ok" if reply["ok"] else reply["error"]["type"]
    except Exception as error:
        outcome = type(error).__name__
    with lock:
        burst_outcomes.append(outcome)
    s.close()

slows = [threading.Thread(target=slow) for _ in range(slow_count)]
for t in slows:
    t.start()
time.sleep(0.5)
print("ready", flush=True)
barrier = threading.Barrier(burst)
bursts = [threading.Thread(target=one_status, args=(barrier,)) for _ in range(burst)]
for t in bursts:
    t.start()
for t in bursts + slows:
    t.join()
outcomes = {o: burst_outcomes.count(o) for o in set(burst_outcomes)}
print(json.dumps({"burst": outcomes, "cut_after": cut_after}), flush=True)
"""


def as_user(uid: int, *argv: str) -> list[str]:
    """argv run as uid, with its primary and supplementary groups. setpriv, not subprocess's
    user=: the interpreter may sit below /root (tests/test_security.py)."""
    gid = pwd.getpwuid(uid).pw_gid
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", *argv]


def add_user(*options: str) -> tuple[str, int]:
    name = f"rs-load-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", *options, name], check=True)
    return name, pwd.getpwnam(name).pw_uid


@pytest.fixture
def user() -> Iterator[int]:
    """A second unprivileged user, made for the test."""
    name, uid = add_user()
    yield uid
    subprocess.run(["userdel", name], check=False)


@pytest.fixture
def admin() -> Iterator[int]:
    """A user in the group ramstage, which is made for the test where the system has none."""
    found = subprocess.run(["getent", "group", ADMIN_GROUP], capture_output=True, check=False)
    make_group = found.returncode != 0
    if make_group:
        subprocess.run(["groupadd", "--system", ADMIN_GROUP], check=True)
    name, uid = add_user("--groups", ADMIN_GROUP)
    yield uid
    subprocess.run(["userdel", name], check=False)
    if make_group:
        subprocess.run(["groupdel", ADMIN_GROUP], check=False)


def timed_cli(daemon, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    result = daemon.cli(*args)
    return time.monotonic() - started, result


@pytest.mark.root
def test_root_is_served_while_a_user_floods_the_socket(public_dir, make_daemon):
    source = write_random(public_dir / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}], root=public_dir).start()
    daemon.wait_state("m", "staged")
    flood = subprocess.Popen(
        as_user(NOBODY, sys.executable, "-c", FLOOD, str(daemon.socket), "64", "500", "12"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flood.stdout is not None and flood.stdout.readline() == "ready\n"
        timings: list[tuple[str, float, int, str]] = []
        while flood.poll() is None and len(timings) < 30:
            for command in (("status",), ("evict", "m"), ("stage", "m")):
                seconds, result = timed_cli(daemon, *command)
                timings.append((command[0], seconds, result.returncode, result.stderr))
        report = json.loads(flood.stdout.readline())
    finally:
        flood.kill()
        flood.wait()
    slowest = max(seconds for _, seconds, _, _ in timings)
    print(f"root: {len(timings)} commands, slowest {slowest:.2f}s; user's burst: {report['burst']}")
    assert all(code == 0 for _, _, code, _ in timings), timings
    assert slowest < 2, timings
    # Every one of the user's 500 clients got an answer: a status or Busy, never EAGAIN, a reset
    # or silence.
    assert set(report["burst"]) <= {"ok", "Busy"} and sum(report["burst"].values()) == 500
    # A client that trickles its request is cut off at the whole-request deadline, not kept
    # for as long as it keeps sending.
    assert max(report["cut_after"]) < REQUEST_SECONDS + 2
    # And the user is served again once it stops.
    result = subprocess.run(
        as_user(
            NOBODY, sys.executable, "-m", "ramstage", "status", "--config", str(daemon.config_path)
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# As a user: holds argv[2] idle connections, then sends the request argv[3] (status if none) on
# one more; prints "ok" or the error type.
PROBE = r"""
import json, socket, sys
held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(int(sys.argv[2]))]
for s in held:
    s.connect(sys.argv[1])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall((sys.argv[3] if len(sys.argv) > 3 else '{"v": 1, "cmd": "status"}').encode() + b"\n")
except (BrokenPipeError, ConnectionResetError):
    pass  # told Busy and closed before it read this: the answer is still there to read
reply = json.loads(s.makefile().readline())
print("ok" if reply["ok"] else reply["error"]["type"])
"""
# As a user: holds argv[2] idle connections until its stdin closes.
HOLD = r"""
import socket, sys
held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(int(sys.argv[2]))]
for s in held:
    s.connect(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def run_probe(path: Path, uid: int, holding: int, *request: str) -> str:
    command = as_user(uid, sys.executable, "-c", PROBE, str(path), str(holding), *request)
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.root
def test_one_user_at_its_limit_does_not_lock_out_another(public_dir, make_daemon, user):
    source = write_random(public_dir / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}], root=public_dir).start()
    daemon.wait_state("m", "staged")

    def probe(uid: int, holding: int) -> str:
        return run_probe(daemon.socket, uid, holding)

    holder = subprocess.Popen(
        as_user(NOBODY, sys.executable, "-c", HOLD, str(daemon.socket), str(CONNECTIONS_PER_UID)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Within the REQUEST_SECONDS those idle connections live: the user's next one is told
        # Busy at once, while another user gets its own as many, and root is served.
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert probe(NOBODY, 0) == "Busy"
        assert probe(user, CONNECTIONS_PER_UID - 1) == "ok"
        assert daemon.request("status")["models"][0]["state"] == "staged"
    finally:
        holder.kill()
        holder.wait()
    # Cut off at the deadline, they leave room for the user again.
    wait_for(lambda: probe(NOBODY, 0) == "ok", timeout=REQUEST_SECONDS + 5)


@pytest.mark.root
def test_the_group_ramstage_is_served_as_root_is(public_dir, make_daemon, admin, user):
    source = write_random(public_dir / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}], root=public_dir).start()
    daemon.wait_state("m", "staged")
    evict = json.dumps({"v": 1, "cmd": "evict", "names": ["m"]})
    # Past a user's limit, and allowed what only admins are: its budget is the admins' own.
    assert run_probe(daemon.socket, admin, CONNECTIONS_PER_UID, evict) == "ok"
    assert daemon.model("m")["state"] == "fallback"
    assert run_probe(daemon.socket, user, 0, evict) == "PermissionDenied"


@pytest.mark.parametrize(
    ("turns", "order"),
    [
        ([(1, "a1"), (1, "a2"), (1, "a3"), (2, "b1")], ["a1", "b1", "a2", "a3"]),
        ([(1, "a1"), (2, "b1"), (2, "b2"), (3, "c1"), (1, "a2")], ["a1", "b1", "c1", "a2", "b2"]),
        ([(5, "x")], ["x"]),
    ],
)
def test_users_take_turns(turns, order):
    queue: Turns[str] = Turns()
    for uid, item in turns:
        queue.put(uid, item)
    assert [queue.take() for _ in order] == order
    queue.close()
    assert queue.take() is None


def test_alike_requests_leave_their_turns_together():
    queue: Turns[tuple[str, str]] = Turns()
    for uid, item in [(1, ("a1", "status")), (1, ("a2", "stage")), (2, ("b1", "status"))]:
        queue.put(uid, item)
    assert queue.take() == ("a1", "status")
    assert queue.take_alike(lambda item: item[1], "status") == [("b1", "status")]
    assert queue.take() == ("a2", "stage")


class FakeDaemon:
    """A listening socket that answers only when told to: until then its backlog is full, so
    connect(2) fails with EAGAIN; `busy_answers` requests are told Busy first."""

    def __init__(self, path: Path, busy_answers: int = 0) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(0)
        self.fillers: list[socket.socket] = []
        while True:  # fill the backlog
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            try:
                filler.connect(str(path))
            except BlockingIOError:
                filler.close()
                break
            self.fillers.append(filler)
        self.busy_answers, self.requests = busy_answers, 0

    def answer_after(self, seconds: float) -> threading.Thread:
        def serve() -> None:
            time.sleep(seconds)
            for filler in self.fillers:
                filler.close()
            self.listener.settimeout(10)
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    conn.settimeout(2)
                    if not conn.recv(65536):
                        continue  # a filler
                    self.requests += 1
                    if self.requests <= self.busy_answers:
                        error = {"type": "Busy", "message": "8 connections from uid 0 open"}
                        conn.sendall(encode({"ok": False, "error": error}))
                        continue
                    conn.sendall(encode({"ok": True, "result": {"fake": True}}))
                    return

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.listener.close()


@pytest.fixture
def fake_config(tmp_path: Path) -> Path:
    path = tmp_path / "ramstage.yaml"
    path.write_text(yaml.safe_dump({"socket": str(tmp_path / "control.sock")}))
    return path


def cli_status(config: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ramstage", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return time.monotonic() - started, result


@pytest.mark.parametrize("busy_answers", [0, 3], ids=["eagain", "eagain-then-busy"])
def test_the_cli_waits_out_a_busy_daemon(tmp_path, fake_config, busy_answers):
    fake = FakeDaemon(tmp_path / "control.sock", busy_answers)
    try:
        server = fake.answer_after(1.5)
        seconds, result = cli_status(fake_config)
        server.join()
    finally:
        fake.close()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"fake": True}
    assert seconds > 1.5 and fake.requests == busy_answers + 1


def test_the_cli_gives_up_on_a_busy_daemon_with_a_clean_message(tmp_path, fake_config):
    fake = FakeDaemon(tmp_path / "control.sock")
    try:
        seconds, result = cli_status(fake_config)
    finally:
        fake.close()
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"ramstage: ramstage is busy (its listen queue at {fake.path} is full); gave up after "
    )
    assert result.stderr.rstrip().endswith("in 10s: try again later")
    assert len(result.stderr.splitlines()) == 1 and seconds >= 10
