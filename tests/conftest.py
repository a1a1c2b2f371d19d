"""Shared fixtures: real daemons in subprocesses, real tmpfs mounts, and the root/torch skips."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from ramstage import links
from ramstage.errors import NotRunning
from ramstage.protocol import read_message, request

IS_ROOT = os.geteuid() == 0
HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root: mounts a real tmpfs"))
        if "torch" in item.keywords and not HAS_TORCH:
            item.add_marker(pytest.mark.skip(reason="needs torch (pip install torch==2.13.0)"))


@pytest.fixture(autouse=True)
def no_ring_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast loader makes its rings of fresh memory unless a test gives it a directory of
    ring files: /run/ramstage/rings on this machine (a daemon's) is not the tests' to use."""
    monkeypatch.setenv("RAMSTAGE_RINGS", "/dev/null/rings")  # no directory can be there


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fails a test that leaves a thread running: a leaked watcher or worker outlives its
    owner and makes later tests flaky. Threads get a moment to finish after the test."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    leaked = [t for t in threading.enumerate() if t not in before]
    for thread in leaked:
        thread.join(timeout=max(deadline - time.monotonic(), 0.0))
    alive = [t.name for t in leaked if t.is_alive()]
    assert not alive, f"threads left running: {alive}"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.05,
    context: Callable[[], str] = str,
) -> Any:
    """Polls until predicate() is truthy and returns it; fails the test on timeout, saying
    context() (a daemon's log, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}\n{context()}")
        time.sleep(interval)


def raw_request(path: Path, payload: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Sends bytes as they are, ends the request there (newline or not) and reads the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        # It may stop reading after the limit; its answer is waiting then.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        return read_message(sock)


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    """Writes size pseudo-random bytes (fast: one random MiB repeated with a varying prefix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            chunk = (seed.to_bytes(4, "little") + written.to_bytes(8, "little") + block)[
                : min(1 << 20, size - written)
            ]
            f.write(chunk)
            written += len(chunk)
    return path


def torch_like_zip(path: Path, payload: bytes | None = None) -> Path:
    """The layout torch.save writes: stored (uncompressed) entries under one archive folder."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", os.urandom(4096) if payload is None else payload)
        archive.writestr("archive/version", b"3\n")
    return path


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


class Daemon:
    """A ramstage daemon subprocess with its own config, store, links and socket under tmp."""

    def __init__(
        self, root: Path, mount: bool, models: list[dict[str, Any]], **overrides: Any
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.store = root / "store"
        self.links = root / "models"
        self.socket = root / "control.sock"
        self.config_path = root / "ramstage.yaml"
        self.log_path = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.wrap: list[str] = []  # a command the daemon runs under (unshare …)
        self.mount = mount
        self.config: dict[str, Any] = {
            "store": {"path": str(self.store), "size": "2G", "mount": mount},
            "links_dir": str(self.links),
            "socket": str(self.socket),
            "memory": {"min_available": "512M", "resume_available": "1G"},
            # The tests check digests against sha256sum; xxh3, the default, has its own tests.
            "checksum": "sha256",
            "watch": {"settle": "300ms"},
            "models": models,
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(self.config.get(key), dict):
                self.config[key].update(value)
            else:
                self.config[key] = value
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(
        self, env: dict[str, str] | None = None, wait: bool = True, debug: bool = False
    ) -> Daemon:
        argv = [sys.executable, "-m", "ramstage", "daemon", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.wrap, *argv, *["--debug"] * debug],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        if wait:
            # A socket file can be left by a killed daemon: wait for one that answers.
            wait_for(lambda: self.answers() or self.process.poll() is not None)  # type: ignore[union-attr]
            assert self.process.poll() is None, self.log()
        return self

    def answers(self) -> bool:
        try:
            self.request("status")
        except NotRunning:
            return False
        return True

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ramstage",
                *args[:1],
                "--config",
                str(self.config_path),
                *args[1:],
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        # 1: the daemon runs and some model is in trouble (missing, error…); the JSON says which.
        assert result.returncode in (0, 1), result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def request(self, cmd: str, **args: Any) -> Any:
        """Asks the daemon over its socket from this process: fast enough to poll a copy."""
        return request(self.socket, cmd, **args)

    def model(self, name: str) -> dict[str, Any]:
        return next(m for m in self.request("status")["models"] if m["name"] == name)

    def wait_state(self, name: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            model = self.model(name)
            return model if model["state"] == state else None

        return wait_for(reached, timeout, context=self.log)  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def cleanup(self) -> None:
        self.stop(
            signal.SIGKILL if self.process and self.process.poll() is None else signal.SIGTERM
        )
        if self.mount:
            for path in (self.store, self.root / "rings"):  # the store, and its rings beside it
                subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """make_daemon(models=[...], mount=False, root=None, **config overrides) -> Daemon (not
    started), under tmp_path or under root."""
    made: list[Daemon] = []

    def make(
        models: list[dict[str, Any]],
        mount: bool = False,
        root: Path | None = None,
        **overrides: Any,
    ) -> Daemon:
        daemon = Daemon((root or tmp_path) / f"d{len(made)}", mount, models, **overrides)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.cleanup()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (tmp_path's parents are 0700), for tests that run
    commands as an unprivileged user. Request it before make_daemon, so it goes last."""
    path = Path(tempfile.mkdtemp(prefix="ramstage-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class LinkWatcher(threading.Thread):
    """Reads a link as fast as it can and records anything an application must never see: no
    link at all, or a target that is neither the source nor a complete, published generation."""

    def __init__(self, link: Path, source: Path, store: Path) -> None:
        super().__init__(daemon=True)
        self.link, self.source, self.store = link, source, store
        self.size = source.stat().st_size
        self.violations: list[str] = []
        self.targets: set[str] = set()
        self.reads = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.reads += 1
            target = links.read(self.link)  # absolute, however the link is written
            if target is None:
                self.violations.append(f"no link at {self.link}")
                continue
            self.targets.add(target)
            if target == str(self.source):
                continue
            problem = self._problem(Path(target))
            # The link may have moved on while we looked (and the old generation been freed, as
            # it may be then): only a problem seen while the link still points there counts.
            if problem and links.read(self.link) == target:
                self.violations.append(problem)

    def _problem(self, target: Path) -> str | None:
        generation = target.parent
        manifest = generation.parent / f"{generation.name}.json"
        if generation.parent.parent != self.store or generation.name.startswith("."):
            return f"not a generation in the store: {target}"
        try:
            if json.loads(manifest.read_text())["files"][0]["size_bytes"] != self.size:
                return f"manifest of another size for {target}"
            st = os.stat(target)
        except (OSError, ValueError) as error:
            return f"{target}: {error}"
        if st.st_size != self.size or st.st_mode & 0o222:
            return f"incomplete or writable: {target}"
        return None

    def stop(self) -> None:
        self._done.set()
        self.join()


class LinkReader(threading.Thread):
    """Opens and reads whole files through links as fast as it can, as an application loading
    a model would, and records every read that fails (a dangling link: ENOENT) or returns bytes
    that are none of the versions allowed for that path (a partial or wrong copy), and the
    (st_dev, st_ino) of every file it read. `paths` maps a path through a link (the link
    itself, or LINK/relpath) to the sha256 digests it may show, and None where the link may be
    gone (a model removed from the config); tests may change it between steps."""

    def __init__(self, paths: dict[Path, set[str | None]]) -> None:
        super().__init__(daemon=True)
        self.paths = paths
        self.failures: list[str] = []
        self.inodes: dict[Path, set[tuple[int, int]]] = {path: set() for path in paths}
        self.reads = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for path, allowed in list(self.paths.items()):
                try:
                    with open(path, "rb") as f:
                        st = os.fstat(f.fileno())
                        data = f.read()
                except FileNotFoundError as error:
                    # A link that may be gone must be gone, not left dangling.
                    if None not in allowed or os.path.lexists(path):
                        self.failures.append(f"{path}: {error}")
                    continue
                except OSError as error:
                    self.failures.append(f"{path}: {error}")
                    continue
                self.reads += 1
                self.inodes.setdefault(path, set()).add((st.st_dev, st.st_ino))
                if hashlib.sha256(data).hexdigest() not in allowed:
                    self.failures.append(f"{path}: {len(data)} bytes, not a version it had")

    def stop(self) -> None:
        self._done.set()
        self.join()
