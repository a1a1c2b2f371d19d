"""The Debian package, installed with apt into a Debian 12 container where systemd is PID 1,
tried as a new user would: install, configure, consume from a sandboxed service, reload, crash,
hang, stop and purge."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import xxhash
import yaml

from .conftest import Machine

pytestmark = [pytest.mark.root, pytest.mark.e2e]

STORE = "/run/ramstage/store"
LINKS = "/run/ramstage/models"
RINGS = "/run/ramstage/rings"
SOURCES = "/srv/models"
CAP_SYS_ADMIN = 21
NOBODY = 65534


def write_safetensors(path: Path, floats: int, seed: int) -> str:
    """A generated safetensors checkpoint (one F32 tensor); returns its sha256."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [floats],
                                    "data_offsets": [0, 4 * floats]}}).encode()  # fmt: skip
    data = hashlib.shake_256(seed.to_bytes(4, "little")).digest(4 * floats)
    content = struct.pack("<Q", len(header)) + header + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def xxh3_of(path: Path) -> str:
    return "xxh3:" + xxhash.xxh3_128(path.read_bytes()).hexdigest()


def configure(machine: Machine, names: list[str]) -> None:
    config = {
        "store": {"path": STORE, "size": "256M"},
        "ready": "staged",
        "memory": {"min_available": "128M", "resume_available": "256M"},
        "models": [{"name": n, "source": f"{SOURCES}/{n}.safetensors"} for n in names],
    }
    (machine.root / "etc/ramstage/ramstage.yaml").write_text(yaml.safe_dump(config))


def status(machine: Machine) -> dict[str, Any]:
    result = machine.run("ramstage", "status", "--json", check=False)
    assert result.returncode in (0, 1), result.stderr  # 1: running, a model in trouble
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def model(machine: Machine, name: str) -> dict[str, Any]:
    return next(m for m in status(machine)["models"] if m["name"] == name)


def staged(machine: Machine, name: str) -> dict[str, Any] | None:
    result = machine.run("ramstage", "status", name, "--json", check=False)
    if result.returncode != 0:
        return None
    found = json.loads(result.stdout)["models"][0]
    return found if found["state"] == "staged" else None  # type: ignore[no-any-return]


def show(machine: Machine, prop: str) -> str:
    return machine.run("systemctl", "show", "-P", prop, "ramstage").stdout.strip()


def store_mount(machine: Machine) -> str:
    return machine.run("findmnt", "-n", "-o", "SOURCE,FSTYPE", STORE, check=False).stdout.strip()


def inode(machine: Machine, path: str) -> str:
    return machine.run("stat", "-L", "-c", "%i", path).stdout.strip()


@pytest.fixture(scope="module")
def digests(machine: Machine) -> dict[str, str]:
    sources = machine.root / SOURCES.lstrip("/")
    made = {
        name: write_safetensors(sources / f"{name}.safetensors", (3 << 20) + seed, seed)
        for seed, name in enumerate(["lama", "sd15"])
    }
    # sd15 is a private model of the container's user nobody: its copy must stay so, which
    # takes chown(2) from the hardened unit (docs/security.md).
    private = sources / "sd15.safetensors"
    os.chown(private, NOBODY, NOBODY)
    private.chmod(0o600)
    return made


def test_apt_installs_enables_and_starts_the_service(machine: Machine) -> None:
    machine.run("apt-get", "update", "-qq")
    # man-db: `systemd-analyze verify` then checks that the unit's Documentation= pages exist.
    machine.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "man-db")
    deb = next(machine.root.glob("root/ramstage_*_all.deb"))
    machine.run("apt-get", "install", "-y", "-qq", f"/root/{deb.name}")
    assert machine.run("systemctl", "is-enabled", "ramstage").stdout.strip() == "enabled"
    assert machine.run("systemctl", "is-active", "ramstage").stdout.strip() == "active"
    for dependency in ("python3-yaml", "python3-sdnotify", "python3-xxhash",
                       "python3-prometheus-client"):  # fmt: skip
        assert "ok installed" in machine.run("dpkg-query", "-W", "-f=${Status}", dependency).stdout
    conffiles = machine.run("dpkg-query", "-W", "-f=${Conffiles}", "ramstage").stdout
    assert "/etc/ramstage/ramstage.yaml" in conffiles
    assert machine.run("getent", "group", "ramstage").stdout.startswith("ramstage:")
    assert store_mount(machine) == "ramstage tmpfs"


def test_the_installed_unit_verifies_and_is_hardened(machine: Machine) -> None:
    unit = "/lib/systemd/system/ramstage.service"
    verify = machine.run("systemd-analyze", "verify", unit, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    for page in ("8 ramstage", "5 ramstage.yaml"):
        assert machine.run("man", "-w", *page.split()).stdout.startswith("/usr/share/man/")
    security = machine.run("systemd-analyze", "security", "--offline=true", "--threshold=30",
                           "--no-pager", unit, check=False)  # fmt: skip
    assert security.returncode == 0, security.stdout
    exposure = float(security.stdout.split("Overall exposure level for ramstage.service: ")[1][:3])
    assert exposure <= 3.0


def test_a_configured_model_is_staged(machine: Machine, digests: dict[str, str]) -> None:
    configure(machine, ["lama"])
    # ready: staged, so the restart returns once the model is in RAM.
    machine.run("systemctl", "restart", "ramstage")
    lama = model(machine, "lama")
    assert lama["state"] == "staged", lama
    # xxh3 is the default with Debian's python3-xxhash, which the package depends on.
    assert lama["digest"] == xxh3_of(machine.root / SOURCES.lstrip("/") / "lama.safetensors")
    assert lama["target"].startswith(f"{STORE}/lama/")
    assert machine.run("ramstage", "status").stdout.count("staged") >= 1
    # The daemon is sandboxed in a mount namespace of its own, without CAP_SYS_ADMIN ...
    pid = show(machine, "MainPID")
    namespaces = machine.run("readlink", "/proc/1/ns/mnt", f"/proc/{pid}/ns/mnt").stdout.split()
    assert namespaces[0] != namespaces[1]
    cap_eff = machine.sh(f"sed -n 's/^CapEff:\\s*//p' /proc/{pid}/status")
    assert not int(cap_eff, 16) & (1 << CAP_SYS_ADMIN)
    # ... and yet the tmpfs is mounted in PID 1's namespace, where everyone sees it.
    assert store_mount(machine) == "ramstage tmpfs"


def test_a_user_keeps_a_fast_loader_ring_in_the_rings_tmpfs(machine: Machine) -> None:
    """The packaged client, on Debian's Python, claims a ring file as an ordinary user."""
    mounted = machine.run("findmnt", "-n", "-o", "SOURCE,FSTYPE", RINGS).stdout.strip()
    assert mounted == "ramstage-rings tmpfs"
    claim = (
        "import os; from ramstage import rings; fd = rings.claim(4 << 20);"
        "print(os.readlink(f'/proc/self/fd/{fd}'), os.fstat(fd).st_size)"
    )
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    got = machine.run(*as_nobody, "python3", "-c", claim).stdout.split()
    assert got == [f"{RINGS}/{NOBODY}.0", str(4 << 20)]


def test_a_sandboxed_consumer_service_reads_the_model_through_its_link(
    machine: Machine, digests: dict[str, str]
) -> None:
    result = machine.run(
        "systemd-run", "--wait", "--pipe", "--quiet", "--unit=consumer",
        "-p", "ProtectSystem=strict", "-p", "PrivateTmp=yes", "-p", "DynamicUser=yes",
        "sh", "-c",
        f"sha256sum < {LINKS}/lama; stat -f -c %T \"$(readlink -f {LINKS}/lama)\"; id -u",
    )  # fmt: skip
    digest, fs_type, uid = result.stdout.split()[0], *result.stdout.split()[-2:]
    assert digest == digests["lama"]
    assert fs_type == "tmpfs"  # the RAM copy, not the source
    assert uid != "0"


def test_reload_stages_a_model_added_to_the_config(
    machine: Machine, digests: dict[str, str]
) -> None:
    configure(machine, ["lama", "sd15"])
    machine.run("systemctl", "reload", "ramstage")
    sd15 = machine.wait_for(lambda: staged(machine, "sd15"), "sd15 to be staged after reload")
    assert sd15["digest"] == xxh3_of(machine.root / SOURCES.lstrip("/") / "sd15.safetensors")
    assert machine.sh(f"sha256sum < {LINKS}/sd15").split()[0] == digests["sd15"]
    # The copy is nobody's and 0400, like its source less the write bit: a sandboxed service
    # of another user cannot read it, through the link or in the store.
    owner_mode = machine.run("stat", "-L", "-c", "%u %a", f"{LINKS}/sd15").stdout.split()
    assert owner_mode == [str(NOBODY), "400"]
    denied = machine.run(
        "systemd-run", "--wait", "--pipe", "--quiet", "--unit=peeker", "-p", "DynamicUser=yes",
        "cat", f"{LINKS}/sd15", sd15["target"], check=False,
    )  # fmt: skip
    assert denied.returncode != 0 and denied.stderr.count("Permission denied") == 2, denied


def test_the_journal_files_each_line_under_its_priority(
    machine: Machine, digests: dict[str, str]
) -> None:
    """The daemon prefixes each line with its syslog priority (sd-daemon(3)): a missing
    source is a warning that `journalctl -p warning` shows, and an info line is not."""
    cursor = machine.run("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout
    after = cursor.strip().rpartition("cursor: ")[2]
    configure(machine, ["lama", "sd15", "gone"])
    machine.run("systemctl", "restart", "ramstage")
    warning = f"gone: source {SOURCES}/gone.safetensors is missing; no link until it is back"

    def journal(*args: str) -> str:
        command = ["journalctl", "-u", "ramstage", "-o", "cat", "--no-pager", "--after-cursor"]
        return machine.run(*command, after, *args).stdout

    machine.wait_for(lambda: warning in journal("-p", "warning"), "the warning in the journal")
    assert "ready: 3 models" in journal("-p", "info")
    assert "ready: 3 models" not in journal("-p", "warning")
    assert not any(line.startswith("<") for line in journal().splitlines())  # prefixes read
    assert machine.run("ramstage", "status", check=False).returncode == 1  # gone is missing
    configure(machine, ["lama", "sd15"])
    machine.run("systemctl", "restart", "ramstage")
    assert machine.run("ramstage", "status", check=False).returncode == 0


def restarted(machine: Machine, old_pid: str) -> bool:
    pid, state = show(machine, "MainPID"), show(machine, "ActiveState")
    return pid not in ("0", old_pid) and state == "active"


def test_restart_and_reinstall_keep_the_copies_in_ram(machine: Machine) -> None:
    """systemctl restart, and the restart after a package upgrade (a reinstall of the same
    .deb runs the same maintainer scripts): the same generations, adopted, nothing copied."""
    before = {name: inode(machine, f"{LINKS}/{name}") for name in ("lama", "sd15")}
    targets = {name: model(machine, name)["target"] for name in before}
    deb = next(machine.root.glob("root/ramstage_*_all.deb"))
    kept = "kept, systemd is running a restart job for ramstage.service"
    adopted = "lama: adopted generation"
    seen = {line: machine.journal().count(line) for line in (kept, adopted)}
    for how in (
        ["systemctl", "restart", "ramstage"],
        ["apt-get", "install", "--reinstall", "-y", "-qq", f"/root/{deb.name}"],
    ):
        pid = show(machine, "MainPID")
        machine.run(*how)
        machine.wait_for(lambda pid=pid: restarted(machine, pid), f"{how[0]} to restart")
        for name, number in before.items():
            assert staged(machine, name), how
            assert model(machine, name)["target"] == targets[name], how
            assert inode(machine, f"{LINKS}/{name}") == number, how  # the same file: adopted
        assert store_mount(machine) == "ramstage tmpfs"
    journal = machine.journal()
    assert {line: journal.count(line) - count for line, count in seen.items()} == {
        kept: 2,
        adopted: 2,
    }


def test_a_killed_daemon_is_restarted_and_adopts_the_generation(machine: Machine) -> None:
    pid, restarts = show(machine, "MainPID"), int(show(machine, "NRestarts"))
    before = {name: inode(machine, f"{LINKS}/{name}") for name in ("lama", "sd15")}
    machine.run("systemctl", "kill", "-s", "KILL", "ramstage")
    machine.wait_for(lambda: restarted(machine, pid), "systemd to restart ramstage")
    assert int(show(machine, "NRestarts")) == restarts + 1
    for name, number in before.items():
        assert staged(machine, name)
        assert inode(machine, f"{LINKS}/{name}") == number  # the same file: adopted, not copied
    journal = machine.journal()
    assert "lama: adopted generation" in journal and "sd15: adopted generation" in journal


def test_a_stopped_event_loop_is_caught_by_the_watchdog(machine: Machine) -> None:
    pid, restarts = show(machine, "MainPID"), int(show(machine, "NRestarts"))
    lama = inode(machine, f"{LINKS}/lama")
    machine.run("systemctl", "kill", "-s", "STOP", "--kill-who=main", "ramstage")
    machine.wait_for(lambda: restarted(machine, pid), "the watchdog to restart ramstage", 120)
    assert int(show(machine, "NRestarts")) == restarts + 1
    assert "Watchdog timeout" in machine.journal()
    assert staged(machine, "lama")
    assert inode(machine, f"{LINKS}/lama") == lama


def test_stop_points_every_link_at_its_source(machine: Machine, digests: dict[str, str]) -> None:
    machine.run("systemctl", "stop", "ramstage")
    for name, digest in digests.items():
        link = f"{LINKS}/{name}"
        assert machine.run("readlink", "-f", link).stdout.strip() == f"{SOURCES}/{name}.safetensors"
        assert machine.sh(f"sha256sum < {link}").split()[0] == digest
    assert store_mount(machine) == ""  # stopped cleanly: the empty store is unmounted
    assert machine.run("findmnt", RINGS, check=False).returncode == 1  # and the rings too


def test_purge_leaves_no_process_and_no_mount(machine: Machine) -> None:
    machine.run("systemctl", "start", "ramstage")
    assert staged(machine, "lama")
    machine.run("apt-get", "purge", "-y", "-qq", "ramstage")
    assert machine.run("pgrep", "-f", "ramstage daemon", check=False).returncode == 1
    assert "ramstage" not in machine.run("findmnt", "-n", "-o", "SOURCE", "-t", "tmpfs").stdout
    assert not (machine.root / "etc/ramstage").exists()
    assert machine.run("systemctl", "is-active", "ramstage", check=False).stdout.strip() in (
        "inactive",
        "unknown",
    )
