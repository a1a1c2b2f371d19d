"""The command line as an operator uses it, against real daemons: the status table on real
terminals (a pty) of 60 and 200 columns and in pipes, colour, --watch, exit codes, progress
bars while a copy runs, `ramstage wait`, broken pipes and the journal's priorities."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ramstage.config import PsiTrigger
from ramstage.memwatch import unprivileged_trigger_line
from tests.conftest import Daemon, wait_for, write_random

M = 1 << 20
LONG_NAME = "a-model-name-of-sixty-four-characters-" + "x" * 20 + "-tail1"
CLEAR = "\x1b[H\x1b[2J"
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def ramstage(daemon: Daemon, *args: str) -> list[str]:
    # --config before the command: global options go either side of it.
    return [sys.executable, "-m", "ramstage", "--config", str(daemon.config_path), *args]


class Terminal:
    """A command on a real pseudo-terminal of a given width; `output` is what it drew."""

    def __init__(self, argv: list[str], columns: int, env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR")}
        environ["TERM"] = "xterm"
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env={**environ, **(env or {})}
        )
        os.close(slave)
        self.master, self.raw = master, b""

    def read_until(self, done: Callable[[str], bool] | None = None, timeout: float = 60) -> str:
        """Reads until done(output) is true or the command has closed the terminal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (done and done(self.output)):
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every end of the slave side is closed
                break
            if not chunk:
                break
            self.raw += chunk
        return self.output

    @property
    def output(self) -> str:
        return self.raw.decode(errors="replace").replace("\r\n", "\n")

    def finish(self, timeout: float = 60) -> int:
        self.read_until(timeout=timeout)
        os.close(self.master)
        return self.process.wait(timeout)


def on_terminal(argv: list[str], columns: int = 200, **env: str) -> tuple[int, str]:
    terminal = Terminal(argv, columns, env)
    code = terminal.finish()
    return code, terminal.output


def table_rows(output: str) -> list[str]:
    lines = COLOUR.sub("", output).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NAME"))
    return lines[start:]


@pytest.fixture
def slow_cpu() -> Iterator[Callable[..., None]]:
    """slow_cpu(pid): the kernel gives the process 2% of a CPU (a cgroup's CFS quota), so a
    copy of a few MiB takes seconds: long enough to watch its progress on any machine."""
    made: dict[int, Path] = {}

    def throttle(pid: int, percent: float = 2) -> None:
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        quota = str(int(percent * 4000))  # of a 400 ms period: the kernel's least quota is 1 ms
        if (v1 / "cgroup.procs").exists():
            group = made.get(pid) or v1 / f"ramstage-test-{pid}"
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text("400000")
            (group / "cpu.cfs_quota_us").write_text(quota)
        elif "cpu" in (v2 / "cgroup.controllers").read_text().split():
            group = made.get(pid) or v2 / f"ramstage-test-{pid}"
            group.mkdir(exist_ok=True)
            (group / "cpu.max").write_text(f"{quota} 400000")
        else:
            pytest.skip("no writable cgroup CPU controller")
        made[pid] = group
        (group / "cgroup.procs").write_text(str(pid))

    yield throttle
    for group in made.values():
        root = group.parent / "cgroup.procs"
        for pid in (group / "cgroup.procs").read_text().split():
            root.write_text(pid)
        group.rmdir()


@pytest.mark.root
@pytest.mark.parametrize("columns", [60, 200])
def test_the_table_fits_the_terminal_for_names_of_1_and_64_characters(
    tmp_path, make_daemon, columns
):
    small = write_random(tmp_path / "src" / "small.ckpt", 1 * M)
    big = write_random(tmp_path / "src" / "big.ckpt", 24 * M, seed=1)
    assert len(LONG_NAME) == 64
    daemon = make_daemon(
        [
            {"name": "a", "source": str(small)},
            {"name": LONG_NAME, "source": str(small)},
            {"name": "big", "source": str(big)},
        ],
        mount=True,
        store={"size": "16M"},
    ).start()
    daemon.wait_state("a", "staged")
    daemon.wait_state(LONG_NAME, "staged")
    daemon.wait_state("big", "fallback")

    code, output = on_terminal(ramstage(daemon, "status"), columns)
    assert code == 0, output
    lines = COLOUR.sub("", output).splitlines()
    assert all(len(line) <= columns for line in lines), "\n".join(lines)
    rows = table_rows(output)
    state_at = rows[0].index("STATE")
    states = {row.split()[0]: row[state_at:].split()[0] for row in rows[1:]}
    assert sorted(states.values()) == ["fallback", "staged", "staged"]  # never cut
    reason = rows[-1][rows[0].index("REASON") :]
    if columns == 200:
        assert LONG_NAME in states
        assert re.fullmatch(r"too_large: needs 24 MiB, store has [\d.]+ MiB free", reason)
        assert rows[0].split() == [
            *("NAME", "STATE", "WHERE", "SIZE", "DIGEST", "SINCE", "USERS", "PINNED", "REASON")
        ]
        digest = daemon.model("a")["digest"].partition(":")[2]
        assert rows[1].split()[:5] == ["a", "staged", "ram", "1.0", "MiB"]
        assert digest[:8] in rows[1]
    else:
        cut = next(name for name in states if "…" in name)
        assert LONG_NAME.startswith(cut.partition("…")[0]) and LONG_NAME.endswith(cut[-3:])
        assert reason.startswith("too_large: needs 24 MiB")


@pytest.mark.parametrize("how", ["terminal", "NO_COLOR", "pipe"])
def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path, make_daemon, how):
    source = write_random(tmp_path / "m.ckpt", 1 * M)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    if how == "pipe":
        result = subprocess.run(ramstage(daemon, "status"), capture_output=True, text=True)
        code, output = result.returncode, result.stdout
    else:
        env = {"NO_COLOR": "1"} if how == "NO_COLOR" else {}
        code, output = on_terminal(ramstage(daemon, "status"), **env)
    assert code == 0
    assert ("\x1b[32mstaged\x1b[0m" in output) is (how == "terminal"), repr(output)
    if how != "terminal":
        assert "\x1b[" not in output
    assert re.search(r"^m +staged +ram", COLOUR.sub("", output), re.M)


def test_status_of_one_model_tells_every_detail(tmp_path, make_daemon):
    source = tmp_path / "src" / "sd15"
    write_random(source / "unet" / "model.safetensors.bin", 2 * M)
    (source / "escape.bin").symlink_to("/etc/hostname")
    daemon = make_daemon([{"name": "sd15", "source": str(source)}]).start()
    model = daemon.wait_state("sd15", "staged")
    target = Path(model["target"]) / "unet" / "model.safetensors.bin"
    hold = "import sys; f = open(sys.argv[1], 'rb'); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(target)], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: holder.pid in daemon.model("sd15")["users"])
        result = subprocess.run(ramstage(daemon, "status", "sd15"), capture_output=True, text=True)
    finally:
        holder.communicate(b"")
    assert result.returncode == 0, result.stderr
    facts = dict(
        re.match(r"  ([a-z ]+): +(.*)", line).groups()  # type: ignore[union-attr]
        for line in result.stdout.splitlines()
        if re.match(r"  [a-z]", line)
    )
    model = daemon.model("sd15")
    assert facts["state"] == "staged" and facts["where"] == "ram"
    assert facts["link"] == f"{daemon.links / 'sd15'} -> {model['target']}"
    assert facts["source"] == str(source)
    assert facts["generation"] == model["generation"]
    assert facts["digest"] == model["digest"] and facts["algorithm"] == "sha256"
    assert facts["size"] == "2.0 MiB"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(.+ ago\)", facts["staged at"])
    assert re.fullmatch(r"\S+ at \S+ \w+/s", facts["copy took"])
    assert facts["holders"] == f"{holder.pid} ({Path(sys.executable).name[:15]})"
    assert facts["pressure evictions"] == "0" and facts["backoff"] == facts["retry"] == "-"
    assert facts["skipped"] == "1 file"
    assert "    escape.bin: symlink leads outside the source" in result.stdout.splitlines()


def test_status_exits_1_for_a_model_in_trouble_and_3_without_a_daemon(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 * M)
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}, {"name": "gone", "source": str(tmp_path / "no")}]
    ).start()
    daemon.wait_state("m", "staged")
    daemon.wait_state("gone", "missing")
    for args in (("status",), ("status", "--json"), ("status", "gone")):
        assert subprocess.run(ramstage(daemon, *args), capture_output=True).returncode == 1
    assert subprocess.run(ramstage(daemon, "status", "m"), capture_output=True).returncode == 0
    result = subprocess.run(ramstage(daemon, "status", "nope"), capture_output=True, text=True)
    assert result.returncode == 2 and "no model named nope" in result.stderr
    daemon.stop()
    result = subprocess.run(ramstage(daemon, "status"), capture_output=True, text=True)
    assert result.returncode == 3 and "ramstage is not running" in result.stderr


def test_watch_redraws_in_place_until_interrupted(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 * M)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    terminal = Terminal(ramstage(daemon, "status", "--watch", "--interval", "0.2"), 120)
    output = terminal.read_until(lambda text: text.count(CLEAR) >= 3 and text.endswith("\n"))
    terminal.process.send_signal(signal.SIGINT)
    assert terminal.finish() == 0
    frames = output.split(CLEAR)[1:]
    assert len(frames) >= 2
    for frame in frames[:2]:
        assert frame.startswith("ramstage ") and re.search(
            r"^m +staged", COLOUR.sub("", frame), re.M
        )


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_a_reader_that_goes_away_is_no_error(tmp_path, make_daemon, reader):
    """`true` exits before ramstage writes, so the write surely meets a closed pipe."""
    source = write_random(tmp_path / "m.ckpt", 1 * M)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    command = " ".join(ramstage(daemon, "status", "--json")) + f" | {reader}"
    result = subprocess.run(
        ["bash", "-c", command + "; exit ${PIPESTATUS[0]}"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == ("{\n" if reader == "head -1" else "")


@pytest.mark.root
def test_stage_draws_a_progress_bar_on_a_terminal_and_lines_in_a_pipe(
    tmp_path, make_daemon, slow_cpu
):
    source = write_random(tmp_path / "big.ckpt", 64 * M)
    daemon = make_daemon([{"name": "big", "source": str(source)}]).start()
    daemon.wait_state("big", "staged")
    assert daemon.process is not None
    daemon.cli("evict", "big", check=True)
    slow_cpu(daemon.process.pid)

    code, output = on_terminal(ramstage(daemon, "stage", "big"))
    assert code == 0, output
    bars = re.findall(r"\x1b\[2Kbig  \[([#.]{20})\]\s+(\d+)%  (.*)", output)
    partial = [(fill, rest) for fill, percent, rest in bars if 0 < int(percent) < 100]
    assert partial, output
    assert all(re.fullmatch(r"#*\.*", fill) for fill, _ in partial), output  # filled from the left
    assert any(fill.startswith("#") for fill, _ in partial), output  # a first bar under 2.5%: none
    assert re.fullmatch(r"[\d.]+ \w+ of 64 MiB at [\d.]+ \w+/s, ETA \S+", partial[0][1]), output
    assert "\x1b[1F" in output  # the line was redrawn in place
    assert output.rstrip().endswith("staged: big")

    daemon.cli("evict", "big", check=True)
    result = daemon.cli("stage", "big", check=True)
    assert result.stdout == "staged: big\n"
    # In a pipe: a plain line when the state changes (and every 5 s meanwhile).
    assert re.search(r"^big: staging \d+%: ", result.stderr, re.M), result.stderr
    assert result.stderr.splitlines()[-1] == "big: staged: 64 MiB"

    daemon.cli("evict", "big", check=True)
    result = daemon.cli("stage", "big", "--no-wait", check=True)
    assert result.stdout == "staging: big\n"
    assert daemon.model("big")["state"] in ("pending", "staging")  # it returned at once
    daemon.wait_state("big", "staged", timeout=300)  # at 2% of a CPU: the other stages wait as long
    code, output = on_terminal(ramstage(daemon, "verify", "big"))
    assert code == 0 and output.rstrip().endswith("verified: big"), output
    assert re.search(r"big  \[#*\.+\]\s+\d+%  verifying [\d.]+ \w+ of 64 MiB at", output), output


@pytest.mark.root
def test_wait_exits_0_when_staged_1_when_it_cannot_be_and_3_without_a_daemon(
    tmp_path, make_daemon, slow_cpu
):
    fast = write_random(tmp_path / "fast.ckpt", 1 * M)
    slow = write_random(tmp_path / "slow.ckpt", 64 * M, seed=1)
    daemon = make_daemon(
        [
            {"name": "fast", "source": str(fast)},
            {"name": "slow", "source": str(slow)},
            {"name": "gone", "source": str(tmp_path / "nowhere.ckpt")},
        ]
    ).start()
    result = subprocess.run(ramstage(daemon, "wait", "fast"), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "staged: fast\n", result.stderr
    result = subprocess.run(
        ramstage(daemon, "wait", "fast", "gone"), capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "gone is not staged (missing): source_missing" in result.stderr
    daemon.cli("evict", "fast", check=True)
    result = subprocess.run(ramstage(daemon, "wait", "fast"), capture_output=True, text=True)
    assert result.returncode == 1 and "fast is not staged (fallback): evicted" in result.stderr

    daemon.wait_state("slow", "staged")
    daemon.cli("evict", "slow", check=True)
    assert daemon.process is not None
    slow_cpu(daemon.process.pid)
    daemon.cli("stage", "slow", "--no-wait", check=True)
    result = subprocess.run(
        ramstage(daemon, "wait", "slow", "--timeout", "0.3"), capture_output=True, text=True
    )
    assert result.returncode == 1 and "not staged within 0.3s: slow" in result.stderr
    # A whole CPU again: at 2% the daemon's answers to `wait` could take over the client's 10 s
    # (seen once on a loaded 2-core machine), and what is checked here is the exit status.
    slow_cpu(daemon.process.pid, 100)
    result = subprocess.run(ramstage(daemon, "wait", "slow"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    result = subprocess.run(ramstage(daemon, "wait", "nope"), capture_output=True, text=True)
    assert result.returncode == 2 and "no model named nope" in result.stderr
    daemon.stop()
    result = subprocess.run(ramstage(daemon, "wait", "fast"), capture_output=True, text=True)
    assert result.returncode == 3 and "ramstage is not running" in result.stderr


def test_under_the_journal_every_line_carries_its_priority(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 * M)
    daemon = make_daemon(
        [{"name": "m", "source": str(source)}, {"name": "gone", "source": str(tmp_path / "no")}]
    )
    daemon.log_path.touch()
    st = daemon.log_path.stat()  # the daemon's stderr, as systemd would have connected it
    daemon.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    daemon.wait_state("m", "staged")
    lines = daemon.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert "<4>gone: source " in daemon.log()
    assert re.search(r"^<6>m: staging 1\.0 MiB from ", daemon.log(), re.M)
    assert not re.search(r"\d{6,} ?bytes|\d{6,}-byte", daemon.log())


def test_status_shows_the_psi_trigger_the_kernel_took(tmp_path, make_daemon):
    """Without CAP_SYS_RESOURCE the kernel refuses a window under 2 s (psi.rst), and the
    daemon arms the rounded-up trigger instead: status shows that one, not the configured."""
    source = write_random(tmp_path / "m.ckpt", 1 * M)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    assert daemon.process is not None
    configured = PsiTrigger("some", 0.15, 1.0)
    caps = Path(f"/proc/{daemon.process.pid}/status").read_text()
    effective = int(re.search(r"^CapEff:\s+(\w+)", caps, re.M).group(1), 16)  # type: ignore[union-attr]
    privileged = bool(effective & (1 << 24))  # CAP_SYS_RESOURCE, capability.h
    expected = configured.trigger_line() if privileged else unprivileged_trigger_line(configured)
    memory = daemon.status()["memory"]
    assert memory["psi_trigger"] == expected
    assert ("refused (no CAP_SYS_RESOURCE?)" in daemon.log()) is not privileged
    table = subprocess.run(ramstage(daemon, "status"), capture_output=True, text=True).stdout
    assert ("PSI some 300ms/2s" if not privileged else "PSI some 150ms/1s") in table
