"""The fast loader's ring files on a real daemon: the tmpfs mounted beside the store, each user's
files theirs alone among real users, a full tmpfs, and the idle files freed under pressure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for, write_random
from test_pressure import inject
from test_security import as_user, people  # noqa: F401 - a fixture, used by name

from ramstage import rings
from ramstage.config import load_config
from ramstage.store import Store
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
    assert {"nosuid", "nodev", "noexec", "nr_inodes=1024"} <= entry.options
    st = os.statvfs(daemon.root / "rings")
    assert st.f_blocks * st.f_frsize == 64 * MiB
    assert os.stat(daemon.root / "rings").st_mode & 0o7777 == 0o1777
    daemon.cli("mount", check=True)  # adopted the second time: one mount, not two
    assert sum(m.mountpoint == daemon.root / "rings" for m in System().mounts()) == 1

    assert "unmounted" in daemon.cli("unmount", check=True).stdout
    assert mount_of(daemon.root / "rings") is None


def test_rings_zero_mounts_none_and_unmounts_one_a_restart_kept(make_daemon):
    daemon = make_daemon([], mount=True, store={"rings": "64M"})
    daemon.cli("mount", check=True)
    assert mount_of(daemon.root / "rings") is not None
    daemon.config["store"]["rings"] = 0
    daemon.write_config()
    daemon.cli("mount", check=True)
    assert mount_of(daemon.root / "rings") is None
    daemon.start()
    assert daemon.status()["rings"] is None
    assert "kept for GPU loads" not in daemon.cli("status").stdout


def test_the_daemon_prunes_and_unmounts_only_a_rings_tmpfs_it_mounted(tmp_path, make_daemon):
    """A plain directory, or someone else's tmpfs, where the rings would be is left alone."""
    daemon = make_daemon([], mount=True, store={"rings": "64M"})
    rings_path = daemon.root / "rings"
    rings_path.mkdir()
    (rings_path / "0.0").write_bytes(b"not a ring")  # not empty: no tmpfs is mounted over it
    result = daemon.cli("mount", check=True)
    assert mount_of(rings_path) is None and "is a directory that is not empty" in result.stderr
    store = Store(load_config(daemon.config_path).store, System())
    assert store.prune_rings() == 0 and (rings_path / "0.0").exists()
    (rings_path / "0.0").unlink()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M,mode=1777", "other", rings_path],
                   check=True)  # fmt: skip
    try:
        (rings_path / "0.0").write_bytes(b"theirs")
        assert store.prune_rings() == 0 and (rings_path / "0.0").exists()
        assert "unmounted" in daemon.cli("unmount", check=True).stdout
        assert mount_of(rings_path) is not None  # not ours to unmount
    finally:
        subprocess.run(["umount", str(rings_path)], check=False)


def test_no_rings_beside_a_store_whose_directory_others_may_write(public_dir, make_daemon):
    """The rings' path is nobody's setting: root mounts nothing where a user could have put a
    symlink or a directory of their own."""
    parent = public_dir / "shared"
    parent.mkdir()
    parent.chmod(0o1777)
    daemon = make_daemon([], mount=True, store={"rings": "64M", "path": str(parent / "store")})
    result = daemon.cli("mount", check=True)
    assert "not a directory only root may change" in result.stderr
    assert mount_of(parent / "rings") is None
    daemon.cli("unmount", check=True)


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
    # One name tried, nothing allocated: a full tmpfs has no room under any other name.
    (tried,) = (daemon.root / "rings").iterdir()
    assert tried.name == f"{os.getuid()}.0" and tried.stat().st_blocks == 0


def test_a_file_of_another_user_under_ones_name_is_passed_over_where_the_kernel_allows_it(
    people,  # noqa: F811
    public_dir,
    make_daemon,
):
    """fs.protected_regular=1 (systemd's default) already refuses to open another user's file
    in a sticky directory; with it off, the claim's own owner check is what passes it over."""
    daemon = make_daemon([], mount=True, root=public_dir, store={"rings": "64M"})
    daemon.cli("mount", check=True)
    directory, insider = daemon.root / "rings", people.insider
    planted = directory / f"{insider.uid}.0"
    planted.write_bytes(b"planted")
    os.chown(planted, people.outsider.uid, people.outsider.gid)
    planted.chmod(0o666)  # the insider may open it for writing
    sysctl = Path("/proc/sys/fs/protected_regular")
    before = sysctl.read_text()
    sysctl.write_text("0")
    try:
        got = as_user(insider, CLAIM, str(directory), str(4 * MiB))
    finally:
        sysctl.write_text(before)
    assert got["name"] == f"{insider.uid}.1"
    assert planted.read_bytes() == b"planted"


def test_pressure_frees_the_idle_ring_files_first_and_keeps_those_in_use(
    tmp_path, make_daemon, monkeypatch
):
    fifo = tmp_path / "pressure.fifo"
    os.mkfifo(fifo)
    source = write_random(tmp_path / "src" / "m.ckpt", 2 * MiB)
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}],
        mount=True,
        store={"rings": "64M"},
        memory={"cooldown": "1s", "psi": "full 1900ms 2s"},
    )
    daemon.start(env={"MEMORY_PRESSURE_WATCH": str(fifo)})
    daemon.wait_state("m", "staged")
    monkeypatch.setenv("RAMSTAGE_RINGS", str(daemon.root / "rings"))
    held, idle = rings.claim(4 * MiB), rings.claim(8 * MiB)
    assert held is not None and idle is not None
    os.close(idle)
    try:
        status = daemon.status()["rings"]
        assert status["path"] == str(daemon.root / "rings") and status["size_bytes"] == 64 * MiB
        assert status["used_bytes"] >= 12 * MiB  # both files, held or not
        assert "kept for GPU loads" in daemon.cli("status").stdout
        inject(fifo)
        wait_for(lambda: "of idle rings" in daemon.log())
        assert [p.name for p in (daemon.root / "rings").iterdir()] == [f"{os.getuid()}.0"]
        assert "freed 8.0 MiB of idle rings" in daemon.log()
        assert 4 * MiB <= daemon.status()["rings"]["used_bytes"] < 8 * MiB
        daemon.wait_state("m", "fallback", timeout=10)  # then the model, the event's one
        log = daemon.log()
        assert log.index("of idle rings") < log.index("m: evicted for memory pressure")
    finally:
        os.close(held)
