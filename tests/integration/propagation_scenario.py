"""Run by test_mount_propagation.py as root inside a private mount namespace of its own (so
nothing here reaches the machine's mounts): a shared bind mount stands for the node's
/run/ramstage; a real daemon runs as PID 1 of its own mount and PID namespaces (as in a
container) with that path bound `rshared` (Bidirectional); consumers bind it at paths of
their own before the daemon mounts its store, made `rslave` (HostToContainer) or `rprivate`
(None), and read-only. Prints what each consumer sees once the model is staged, as JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ramstage.errors import NotRunning
from ramstage.protocol import request

CONSUMER = """
import hashlib, json, os, sys
from pathlib import Path
from ramstage.protocol import request
view = Path(sys.argv[1])
for line in sys.stdin:
    seen = {}
    try:
        seen["sha256"] = hashlib.sha256((view / "models" / "m").read_bytes()).hexdigest()
        seen["inode"] = os.stat(view / "models" / "m").st_ino
    except OSError as error:
        seen["error"] = error.strerror
    try:
        seen["state"] = request(view / "control.sock", "status")["models"][0]["state"]
    except Exception as error:
        seen["state"] = type(error).__name__
    print(json.dumps(seen), flush=True)
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def consumer(host: Path, view: Path, propagation: str) -> subprocess.Popen[str]:
    view.mkdir()
    script = (
        f"mount --rbind {host} {view} && mount --make-{propagation} {view}"
        f" && mount -o remount,bind,ro {view} && echo ready"
        f" && exec {sys.executable} -c '{CONSUMER}' {view}"
    )
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout and process.stdout.readline() == "ready\n"
    return process


def look(process: subprocess.Popen[str]) -> dict[str, object]:
    assert process.stdin and process.stdout
    process.stdin.write("look\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())  # type: ignore[no-any-return]


def agent(host: Path, view: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """A pod's daemon: PID 1 of new mount and PID namespaces, the node's path bound rshared."""
    start = (
        f"mount --rbind {host} {view} && mount --make-rshared {view}"
        f" && exec {sys.executable} -m ramstage daemon --config {config}"
    )
    with open(log, "ab") as output:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "unchanged", "--pid", "--fork"]
            + ["--mount-proc", "sh", "-c", start],
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    # unshare --fork does not pass signals on: the daemon is its child, PID 1 inside.
    for child in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
        os.kill(int(child), signal.SIGTERM)
    process.wait(30)


def wait_staged(socket: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if request(socket, "status")["models"][0]["state"] == "staged":
                return
        except (NotRunning, OSError):
            pass
        assert time.monotonic() < deadline and process.poll() is None, "not staged"
        time.sleep(0.05)


def main(root: Path, source: Path) -> None:
    host, view = root / "host" / "run-ramstage", root / "agent-view"
    for directory in (host, view):
        directory.mkdir(parents=True)
    sh("mount", "--bind", str(host), str(host))
    sh("mount", "--make-shared", str(host))
    consumers = {p: consumer(host, root / f"consumer-{p}", p) for p in ("rslave", "rprivate")}

    config = root / "ramstage.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"path": f"{view}/store", "size": "64M"},
                "links_dir": f"{view}/models",
                "socket": f"{view}/control.sock",
                "checksum": "sha256",
                "memory": {"min_available": "64M", "resume_available": "128M"},
                "models": [{"name": "m", "source": str(source)}],
            }
        )
    )
    seen: dict[str, object] = {}
    log = root / "agent.log"
    first = agent(host, view, config, log)
    try:
        wait_staged(host / "control.sock", first)
        seen.update({p: look(process) for p, process in consumers.items()})
        seen["link"] = str((host / "models" / "m").readlink())
    finally:
        stop(first)
    # A rollout: the first pod is gone, the next one starts in namespaces of its own.
    seen["between"] = look(consumers["rslave"])
    second = agent(host, view, config, log)
    try:
        wait_staged(host / "control.sock", second)
        seen["after"] = look(consumers["rslave"])
        seen["link_after"] = str((host / "models" / "m").readlink())
    finally:
        stop(second)
        for process in consumers.values():
            process.kill()
    seen["log"] = log.read_text()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
