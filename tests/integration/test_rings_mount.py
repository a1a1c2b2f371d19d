"""The fast loader's ring files on a real daemon: the tmpfs mounted beside the store, each user's
files theirs alone among real users, a full tmpfs, and the idle files freed under pressure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import wait_for
from test_pressure import inject
from test_security import as_user, people  # noqa: F401 - a fixture, used by name

from ramstage import rings
from ramstage.system import System

pytestmark = pytest.mark.root
MiB = 1 << 20

CLAIM = r"""
import json, os, sys
os.environ["RAMSTAGE_RINGS"] = sys.argv[1]
from ramstage import rings
fd = rings.claim(int(sys.argv[2]))
name = None if fd is None else os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
others = {}
for other in sys.argv[3:]:
    try:
        with open(os.path.join(sys.argv[1], other), "rb") as f:
            others[other] = len(f.read())
    except OSError as error:
        others[other] = error.errno
print(json.dumps({"name": name, "others": others}))
"""


def mount_of(path):  # type: ignore[no-untyped-def]
    return next((m for m in System().mounts() if m.mountpoint == path), None)


def test_the_rings_tmpfs_is_mounted_beside_the_store_for_everyone_and_freed_with_it(
    tmp_path, make_daemon
):
    daemon = make_daemon([], mount=True, store={"rings": "64M"})
    daemon.cli("mount", check=True)
    entry = mount_of(daemon.root / "rings")
    assert entry is not None and (entry.fstype, entry.source) == ("tmpfs", rings.SOURCE)
    assert {"nosuid", "nodev", "noexec"} <= entry.options
    st = os.statvfs(daemon.root / "rings")
    assert st.f_blocks * st.f_frsize == 64 * MiB
    assert os.stat(daemon.root / "rings").st_mode & 0o7777 == 0o1777
    daemon.cli("mount", check=True)  # adopted the second time: one mount, not two
    assert sum(m.mountpoint == daemon.root / "rings" for m in System().mounts()) == 1

    assert "unmounted" in daemon.cli("unmount", check=True).stdout
    assert mount_of(daemon.root / "rings") is None


def test_no_rings_tmpfs_with_rings_zero(make_daemon):
    daemon = make_daemon([], mount=True, store={"rings": 0})
    daemon.cli("mount", check=True)
    assert mount_of(daemon.root / "rings") is None


def test_each_users_ring_files_are_theirs_alone(people, public_dir, make_daemon):  # noqa: F811
    daemon = make_daemon([], mount=True, root=public_dir, store={"rings": "64M"})
    daemon.cli("mount", check=True)
    directory = str(daemon.root / "rings")
    outsider, insider = people.outsider, people.insider
    mine = f"{insider.uid}.0"

    got = as_user(insider, CLAIM, directory, str(4 * MiB))
    assert got["name"] == mine
    # Another user can neither read it nor plant files under the insider's next names.
    got = as_user(outsider, CLAIM, directory, str(4 * MiB), mine)
    assert got["name"] == f"{outsider.uid}.0" and got["others"][mine] == 13  # EACCES
    planted = as_user(
        outsider,
        "import os, sys; os.chdir(sys.argv[1]);"
        "open(sys.argv[2], 'w').close(); os.chmod(sys.argv[2], 0o600);"
        "os.symlink(sys.argv[4], sys.argv[3]); print('[]')",
        directory,
        f"{insider.uid}.1",
        f"{insider.uid}.2",
        f"{outsider.uid}.0",
    )
    assert planted == []
    # Held by a process of the insider's, the first name is taken; the planted ones are not
    # the insider's: the claim passes over them to the next.
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={insider.uid}", f"--regid={insider.gid}", "--init-groups",
         sys.executable, "-c", CLAIM + "\nsys.stdout.flush(); sys.stdin.read()",
         directory, str(4 * MiB)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert json.loads(holder.stdout.readline())["name"] == mine
        got = as_user(insider, CLAIM, directory, str(4 * MiB))
        assert got["name"] == f"{insider.uid}.3"
    finally:
        holder.communicate("")
    assert os.stat(os.path.join(directory, f"{outsider.uid}.0")).st_size == 4 * MiB


def test_a_full_rings_tmpfs_gives_no_claim_and_no_half_ring(public_dir, make_daemon, monkeypatch):
    daemon = make_daemon([], mount=True, root=public_dir, store={"rings": "8M"})
    daemon.cli("mount", check=True)
    monkeypatch.setenv("RAMSTAGE_RINGS", str(daemon.root / "rings"))
    assert rings.claim(16 * MiB) is None
    assert all(p.stat().st_blocks == 0 for p in (daemon.root / "rings").iterdir())


def test_pressure_frees_the_idle_ring_files_first_and_keeps_those_in_use(
    tmp_path, make_daemon, monkeypatch
):
    fifo = tmp_path / "pressure.fifo"
    os.mkfifo(fifo)
    daemon = make_daemon(
        [], mount=True, store={"rings": "64M"}, memory={"cooldown": "1s", "psi": "full 1900ms 2s"}
    )
    daemon.start(env={"MEMORY_PRESSURE_WATCH": str(fifo)})
    monkeypatch.setenv("RAMSTAGE_RINGS", str(daemon.root / "rings"))
    held, idle = rings.claim(4 * MiB), rings.claim(8 * MiB)
    assert held is not None and idle is not None
    os.close(idle)
    try:
        inject(fifo)
        wait_for(lambda: "of idle rings" in daemon.log())
        assert [p.name for p in (daemon.root / "rings").iterdir()] == [f"{os.getuid()}.0"]
        assert "freed 8.0 MiB of idle rings" in daemon.log()
    finally:
        os.close(held)
