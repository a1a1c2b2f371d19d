"""The command line's pure parts: figures in human units, the table's fit to a width, the
parser (help for every argument, global options either side of the command, did-you-mean),
check-config's warning of a model larger than the store, and the journal's priorities."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest
import yaml

from ramstage import units, view
from ramstage.cli import build_parser, main
from ramstage.service import JournalFormatter, journal_stream
from ramstage.system import System

G, M = 1 << 30, 1 << 20


@pytest.mark.parametrize(
    "nbytes, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (944 * M, "944 MiB"),
     (2 * G + 2552, "2.0 GiB"), (10 * G, "10 GiB"), (3 * G // 2, "1.5 GiB"),
     (1 << 60, "1.0 EiB"), (None, "-")],
)  # fmt: skip
def test_sizes_in_binary_units(nbytes, text):
    assert units.size(nbytes) == text


@pytest.mark.parametrize(
    "seconds, text",
    [(0.15, "150ms"), (2, "2s"), (2.5, "2.5s"), (12.4, "12s"), (185, "3m05s"),
     (7620, "2h07m"), (273600, "3d04h"), (None, "-")],
)  # fmt: skip
def test_durations(seconds, text):
    assert units.duration(seconds) == text


def test_a_copy_of_several_files_says_how_many_are_done():
    copy = {"done_bytes": 1 << 30, "total_bytes": 2 << 30, "rate_bytes_per_second": 1 << 30}
    several = view.copy_text({**copy, "files_done": 3, "files_total": 16})
    assert several == "1.0 GiB of 2.0 GiB, 3 of 16 files at 1.0 GiB/s, ETA 1s"
    one = view.copy_text({**copy, "files_done": 0, "files_total": 1})
    assert one == "1.0 GiB of 2.0 GiB at 1.0 GiB/s, ETA 1s"


def test_a_reason_with_its_figures():
    figures = {"need_bytes": 2 * G + 2552, "store_free_bytes": 944 * M, "available_bytes": 20 * G,
               "floor_bytes": 2 * G}  # fmt: skip
    assert units.reason("too_large", figures) == "too_large: needs 2.0 GiB, store has 944 MiB free"
    assert units.reason("pressure", figures) == (
        "pressure: needs 2.0 GiB, 20 GiB available, floor 2.0 GiB"
    )
    assert units.reason("pressure", None) == "pressure"
    assert units.reason("error: bad", None) == "error: bad"
    assert units.reason(None, None) == ""


def model(name: str, state: str = "staged", reason: str | None = None) -> dict[str, object]:
    return {"name": name, "state": state, "progress": 1.0, "size_bytes": 512 * M,
            "digest": "sha256:" + "ab" * 32, "since": None, "users": [], "pinned_bytes": 0,
            "reason": reason, "reason_figures": None, "skipped": [], "copy": None}  # fmt: skip


@pytest.mark.parametrize("width", [40, 60, 80, 120, 200, None])
def test_the_table_fits_a_width_cutting_the_name_and_reason_never_the_state(width):
    long = "n" * 30 + "-middle-" + "e" * 26
    models = [model("a"), model(long, "fallback", "untrusted: " + "/very/long/path" * 8),
              model("b", "missing", "source_missing")]  # fmt: skip
    lines = view.table(models, width, view.Style(colour=False))
    if width is not None and width >= 60:
        assert all(len(line) <= width for line in lines), lines
    state_at = lines[0].index("STATE")
    assert [line[state_at:].split()[0] for line in lines[1:]] == ["staged", "fallback", "missing"]
    if width is None:
        assert long in lines[2] and "/very/long/path" * 8 in lines[2]
    else:  # both cut, in proportion: the name in its middle, the reason at its end
        name = lines[2].split()[0]
        assert "…" in name and long.startswith(name.partition("…")[0])
        assert long.endswith(name.partition("…")[2])
        assert lines[2].endswith("…") and "untrusted: /very" in lines[2]


def test_models_in_trouble():
    assert not view.in_trouble(model("a"))
    assert not view.in_trouble(model("a", "fallback", "too_large"))
    assert not view.in_trouble(model("a", "fallback", "evicted"))
    assert view.in_trouble(model("a", "missing", "source_missing"))
    assert view.in_trouble(model("a", "staged", "source_missing"))
    assert view.in_trouble(model("a", "fallback", "error: invalid checkpoint"))
    assert view.in_trouble(model("a", "fallback", "untrusted: /ssd is world-writable"))


def test_every_argument_has_help_and_the_help_has_examples_and_exit_codes(capsys):
    parser = build_parser()
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "keeps ML model checkpoints in RAM" in text and "only module" not in text
    assert "examples:" in text and "exit codes:" in text
    commands = next(a for a in parser._actions if a.dest == "command")
    for name, sub in [("ramstage", parser), *commands.choices.items()]:  # type: ignore[attr-defined]
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"


@pytest.mark.parametrize(
    "argv", [["--config", "X", "status"], ["status", "--config", "X"], ["--config=X", "status"]]
)
def test_global_options_go_before_or_after_the_command(argv):
    args = build_parser().parse_args([*argv, "--debug"])
    assert args.config == "X" and args.debug and args.command == "status"
    assert build_parser().parse_args(["--debug", *argv]).debug


@pytest.mark.parametrize(
    "argv, hint",
    [(["stauts"], "did you mean 'status'?"), (["--config", "x.yaml", "chek-config"],
     "did you mean 'check-config'?"), (["frobnicate"], "(ramstage --help lists them)")],
)  # fmt: skip
def test_a_mistyped_command_gets_a_suggestion(argv, hint, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ramstage: unknown command '{argv[-1]}'") and hint in err


def test_check_config_warns_of_a_model_larger_than_the_store(tmp_path, capsys):
    big, small = tmp_path / "big.ckpt", tmp_path / "small.ckpt"
    big.write_bytes(b"\0" * (3 * M))
    small.write_bytes(b"\0" * M)
    config = tmp_path / "ramstage.yaml"
    config.write_text(yaml.safe_dump({
        "store": {"path": str(tmp_path / "store"), "size": "2M", "mount": False},
        "models": [{"name": "small", "source": str(small)}, {"name": "big", "source": str(big)}],
    }))  # fmt: skip
    assert main(["check-config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{config}: OK (2 models)\n"
    assert err == (
        "ramstage: warning: models[1] (big): needs 3.0 MiB, more than store.size 2.0 MiB;"
        " it will stay on its source (too_large)\n"
    )


def test_journal_lines_carry_their_syslog_priority():
    formatter = JournalFormatter("%(message)s")
    levels = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}  # fmt: skip
    for level, priority in levels.items():
        record = logging.LogRecord("ramstage", level, __file__, 1, "one\ntwo", None, None)
        assert formatter.format(record) == f"<{priority}>one\n<{priority}>two"


def test_the_journal_is_recognised_by_its_device_and_inode(tmp_path):
    stream, other = tmp_path / "stream", tmp_path / "other"
    stream.touch()
    other.touch()
    st = stream.stat()
    system = System(environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    for path, expected in ((stream, True), (other, False)):
        with open(path, "w") as opened:
            assert journal_stream(system, opened) is expected
            assert journal_stream(System(environ={}), opened) is False
    assert journal_stream(system, io.StringIO()) is False  # no descriptor (pytest's capture)


def test_psi_trigger_shown_in_human_units():
    assert view.psi_text("some 150000 1000000") == "some 150ms/1s"
    assert view.psi_text("full 300000 2000000") == "full 300ms/2s"
    assert view.psi_text(None) == "no trigger"


def test_a_command_run_by_systemd_reports_its_error_at_error_priority(tmp_path):
    """The unit's `ramstage mount` and friends write to the journal too: their errors are
    filed as errors, not as the info lines journald assumes for unprefixed output."""
    config = tmp_path / "ramstage.yaml"
    config.write_text(yaml.safe_dump({"socket": str(tmp_path / "control.sock")}))
    stderr = tmp_path / "stderr"
    stderr.touch()
    st = stderr.stat()
    for env, prefix in (({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, "<3>"), ({}, "")):
        with open(stderr, "w") as err:
            code = subprocess.run(
                [sys.executable, "-m", "ramstage", "--config", str(config), "status"],
                stderr=err, stdout=subprocess.DEVNULL, env={**os.environ, **env}, check=False,
            ).returncode  # fmt: skip
        assert code == 3
        assert stderr.read_text().startswith(f"{prefix}ramstage: ramstage is not running")


def unanswered_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """progress's status poll: no answer the first time (a daemon too busy), then one model."""
    from ramstage import progress
    from ramstage.errors import NoAnswer

    asked: list[str] = []

    def request(socket: object, cmd: str, **args: object) -> object:
        asked.append(cmd)
        if len(asked) == 1:
            raise NoAnswer("no answer from ramstage within 10s")
        return {"models": [{"name": "m", "state": "staged", "reason": "verified"}]}

    monkeypatch.setattr(progress, "request", request)
    return asked


def test_a_status_poll_left_unanswered_is_skipped_while_a_request_works(monkeypatch):
    from ramstage import progress

    asked = unanswered_once(monkeypatch)
    shown = list(progress.frames(None, ["m"], False, done=lambda models: True, over=lambda: False))
    assert asked == ["status", "status"] and len(shown) == 1 and shown[0].startswith("m")


def test_a_status_poll_left_unanswered_ends_a_wait(monkeypatch):
    """`ramstage wait` has no request of its own: an unanswered status is its error (exit 1)."""
    from ramstage import progress
    from ramstage.errors import NoAnswer

    unanswered_once(monkeypatch)
    with pytest.raises(NoAnswer, match="no answer from ramstage within 10s"):
        list(progress.frames(None, ["m"], False, done=lambda models: True))
