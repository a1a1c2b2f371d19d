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
import hashlib, json, sys
from pathlib import Path
from ramstage.protocol import request
view = Path(sys.argv[1])
seen = {}
try:
    seen["sha256"] = hashlib.sha256((view / "models" / "m").read_bytes()).hexdigest()
except OSError as error:
    seen["error"] = error.strerror
seen["state"] = request(view / "control.sock", "status")["models"][0]["state"]
print(json.dumps(seen))
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def consumer(host: Path, view: Path, propagation: str) -> subprocess.Popen[str]:
    view.mkdir()
    script = (
        f"mount --rbind {host} {view} && mount --make-{propagation} {view}"
        f" && mount -o remount,bind,ro {view} && echo ready && read go"
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


def main(root: Path, source: Path) -> None:
    host, agent = root / "host" / "run-ramstage", root / "agent-view"
    for directory in (host, agent):
        directory.mkdir(parents=True)
    sh("mount", "--bind", str(host), str(host))
    sh("mount", "--make-shared", str(host))
    consumers = {p: consumer(host, root / f"consumer-{p}", p) for p in ("rslave", "rprivate")}

    config = root / "ramstage.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"path": f"{agent}/store", "size": "64M"},
                "links_dir": f"{agent}/models",
                "socket": f"{agent}/control.sock",
                "checksum": "sha256",
                "memory": {"min_available": "64M", "resume_available": "128M"},
                "models": [{"name": "m", "source": str(source)}],
            }
        )
    )
    start = (
        f"mount --rbind {host} {agent} && mount --make-rshared {agent}"
        f" && exec {sys.executable} -m ramstage daemon --config {config}"
    )
    daemon = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "unchanged", "--pid", "--fork", "--mount-proc"]
        + ["sh", "-c", start]
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(host / "control.sock", "status")["models"][0]["state"] == "staged":
                    break
            except (NotRunning, OSError):
                pass
            assert time.monotonic() < deadline and daemon.poll() is None, "not staged"
            time.sleep(0.05)
        seen = {}
        for propagation, process in consumers.items():
            out, _ = process.communicate("go\n", timeout=60)
            seen[propagation] = json.loads(out)
        seen["link"] = str((host / "models" / "m").readlink())
        print(json.dumps(seen))
    finally:
        # unshare --fork does not pass signals on: the daemon is its child, PID 1 inside.
        for child in Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGTERM)
        daemon.wait(30)
        for process in consumers.values():
            process.kill()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
