"""A Debian 12 container booted with systemd as PID 1 (systemd-nspawn), with the ramstage .deb
built from this tree, for end-to-end tests of the installed package.

The debootstrapped root file system is cached under $RAMSTAGE_E2E_CACHE (default
/var/cache/ramstage-e2e) and copied for each run, so only the first run pays for debootstrap.
Commands run inside with `nsenter -t PID -a` (there is no host systemd-machined to register
with, hence --register=no and no machinectl). When a test fails, its report carries the
end of the journal of ramstage.service.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RAMSTAGE_E2E_CACHE", "/var/cache/ramstage-e2e"))
SUITE = "bookworm"
BASE_PACKAGES = "systemd,systemd-sysv,dbus,python3"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cached_rootfs() -> Path:
    """A minimal Debian 12 with systemd, made once; a partial one is never used."""
    rootfs = CACHE / SUITE
    if (rootfs / "etc" / "os-release").exists():
        return rootfs
    partial = CACHE / f"{SUITE}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(partial)],
        check=True,
        capture_output=True,
    )
    partial.rename(rootfs)
    return rootfs


class Machine:
    """A booted container: run() executes a command inside it, as root, in all its namespaces."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.name = f"ramstage-e2e-{secrets.token_hex(3)}"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def boot(self) -> None:
        with open(self.log, "wb") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "-D", str(self.root), "--boot", "--register=no",
                 "--keep-unit", f"--machine={self.name}", "--console=passive"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.pid = self._wait_for(self._init_pid, "the container's systemd to start")
        self._wait_for(self._booted, "the container to finish booting")

    def _init_pid(self) -> int:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited:\n{self.log.read_text(errors='replace')}")
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        for pid in children.read_text().split():
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        return 0

    def _booted(self) -> bool:
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    @staticmethod
    def _wait_for(predicate, what: str, timeout: float = 120.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.2)
        return value

    def run(
        self, *argv: str, check: bool = True, timeout: float = 600, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", "--", "env", "-i", f"PATH={PATH}",
             "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", *argv],
            input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def sh(self, script: str, check: bool = True) -> str:
        return self.run("sh", "-ec", script, check=check).stdout

    def wait_for(self, predicate, what: str, timeout: float = 120.0):  # type: ignore[no-untyped-def]
        return self._wait_for(predicate, what, timeout)

    def journal(self, unit: str = "ramstage.service") -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "short-monotonic",
                        check=False).stdout  # fmt: skip

    def shutdown(self) -> None:
        """Stops the container (poweroff via SIGTERM to nspawn, then SIGKILL) and releases every
        mount left below its root."""
        if self.nspawn and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        for mountpoint in reversed(mounts_below(self.root)):
            subprocess.run(["umount", "--lazy", mountpoint], check=False, capture_output=True)


def mounts_below(root: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return points


def loop_devices_below(root: Path) -> list[str]:
    listing = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                             capture_output=True, text=True, check=False).stdout  # fmt: skip
    return [line for line in listing.splitlines() if str(root) in line]


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    subprocess.run(["bash", str(REPO / "packaging" / "build-deb.sh"), str(out)],
                   check=True, capture_output=True)  # fmt: skip
    (package,) = out.glob("ramstage_*_all.deb")
    return package


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, deb: Path) -> Iterator[Machine]:
    run_dir = tmp_path_factory.mktemp("machine")
    root = run_dir / "rootfs"
    subprocess.run(["cp", "-a", str(cached_rootfs()), str(root)], check=True)
    shutil.copy(deb, root / "root" / deb.name)
    machine = Machine(root, run_dir / "nspawn.log")
    try:
        machine.boot()
        yield machine
    finally:
        machine.shutdown()
        leftovers = mounts_below(root) + loop_devices_below(run_dir)
        if not leftovers:
            shutil.rmtree(run_dir, ignore_errors=True)
        assert not leftovers, f"still mounted or attached after the container stopped: {leftovers}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    machine = getattr(item, "funcargs", {}).get("machine")
    if report.failed and isinstance(machine, Machine) and machine.pid:
        # Its end: where a failure shows, and what a truncated CI log still keeps.
        tail = machine.journal().splitlines()[-80:]
        report.sections.append(("end of the journal of ramstage.service", "\n".join(tail)))
