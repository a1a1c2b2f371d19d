"""Hypothesis fuzzing of the config: any value YAML can give, and any file, ends as a Config or
a ConfigError whose every problem names a key path or the file; check-config exits 2 on it,
never 1 with "unexpected error", and a daemon's start refuses it with the same problems.

In CI the examples are fixed (derandomize) and bounded: 7,000 structures and 3,000 files, about
a minute of CPU. For a long run on purpose, with fresh random examples each time:

    RAMSTAGE_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest -q tests/unit/test_config_fuzz.py
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from strategies import assert_names_where, config, files, fuzz_settings

from ramstage.cli import main
from ramstage.config import Config, load_config, parse_config
from ramstage.daemon import run_daemon
from ramstage.errors import ConfigError
from ramstage.system import System

SYSTEM = System()


@fuzz_settings(7000)
@given(config)
def test_any_structure_is_a_config_or_a_config_error_naming_key_paths(data):
    try:
        assert isinstance(parse_config(data, system=SYSTEM), Config)
    except ConfigError as error:
        assert_names_where(error, data)


# ---- files: YAML as dumped, then damaged; text made of YAML's syntax; bytes ------------------


FILES = Path(tempfile.mkdtemp(prefix="ramstage-fuzz-"))


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


@fuzz_settings(3000)
@given(files)
def test_any_file_is_a_config_or_exit_2_at_check_config_and_at_start(content):
    path = FILES / "ramstage.yaml"
    path.write_bytes(content)
    try:
        load_config(path, system=SYSTEM)
        problems = None
    except ConfigError as error:
        data = None
        with contextlib.suppress(Exception):
            data = yaml.load(content, Loader=yaml.CSafeLoader)
        assert_names_where(error, data, path)
        problems = error.problems
    code, output = run_cli("check-config", str(path))
    assert code == (0 if problems is None and "has problems" not in output else 2), output
    assert "unexpected error" not in output
    if problems is not None:
        # The daemon's start (`ramstage daemon` turns a ConfigError into exit 2, as above),
        # in this process: a valid file would start it.
        with pytest.raises(ConfigError) as raised:
            run_daemon(path, SYSTEM)
        assert raised.value.problems == problems
