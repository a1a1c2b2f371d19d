"""The man pages and the completion scripts the package builds generate (scripts/build_docs.py):
man renders them without a warning, bash and zsh load the completion, and bash completes
commands, options and the config's model names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_docs.py"), str(out)],
                   check=True, capture_output=True)  # fmt: skip
    return out


@pytest.mark.skipif(not shutil.which("man"), reason="needs man-db")
@pytest.mark.parametrize(
    ("page", "heading"), [("ramstage.8", "RAMSTAGE(8)"), ("ramstage.yaml.5", "RAMSTAGE.YAML(5)")]
)
def test_man_renders_the_pages_without_a_warning(built: Path, page: str, heading: str):
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    result = subprocess.run(["man", "--warnings", "-l", str(built / "man" / page)],
                            capture_output=True, text=True, env=env, check=True)  # fmt: skip
    assert result.stderr == ""
    assert result.stdout.startswith(heading)
    assert "EXIT STATUS" in result.stdout or "KEYS" in result.stdout


def test_the_man_pages_cover_every_command_and_config_key(built: Path):
    command = (built / "man" / "ramstage.8").read_text()
    for name in ("daemon", "status", "stage", "evict", "verify", "wait", "check-config", "bench"):
        assert f".SH OPTIONS 'ramstage {name}'" in command
    for heading in ("EXAMPLES", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert f".SH {heading}\n" in command
    config = (built / "man" / "ramstage.yaml.5").read_text()
    for key in ("store.size", "memory.psi", "metrics.listen", "models[].digest"):
        assert f".B {key}" in config


CONFIG = """\
models:
  - name: lama
    source: /ssd/lama.ckpt
  - source: /ssd/sd15
    name: "sd-15"
# - name: commented
"""


def bash_complete(built: Path, config: Path, *words: str) -> list[str]:
    script = (
        f"source {built / 'completion' / 'bash' / 'ramstage'}\n"
        f"COMP_WORDS=(ramstage {' '.join(repr(w) for w in words)}); COMP_CWORD={len(words)}\n"
        "_shtab_ramstage; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    env = {**os.environ, "RAMSTAGE_CONFIG": str(config)}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                            check=True)  # fmt: skip
    assert result.stderr == ""
    return result.stdout.split()


def test_bash_completes_commands_options_and_model_names(built: Path, tmp_path: Path):
    config = tmp_path / "ramstage.yaml"
    config.write_text(CONFIG)
    assert bash_complete(built, config, "st") == ["status", "stage"]
    assert "check-config" in bash_complete(built, config, "")
    assert bash_complete(built, config, "status", "--j") == ["--json"]
    assert bash_complete(built, config, "evict", "") == ["lama", "sd-15"]
    assert bash_complete(built, config, "stage", "lama", "s") == ["sd-15"]
    assert bash_complete(built, tmp_path / "absent.yaml", "path", "") == []


@pytest.mark.skipif(not shutil.which("zsh"), reason="needs zsh")
def test_zsh_loads_the_completion_for_ramstage(built: Path):
    function = built / "completion" / "zsh" / "_ramstage"
    subprocess.run(["zsh", "-n", str(function)], check=True)
    script = (
        f"fpath=({function.parent} $fpath); autoload -U compinit; compinit -u -D\n"
        "print -r -- ${_comps[ramstage]}; autoload +X _ramstage && whence -w _ramstage"
    )
    result = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True,
                            check=True)  # fmt: skip
    assert result.stdout.split("\n")[:2] == ["_ramstage", "_ramstage: function"]
    assert result.stderr == ""


@pytest.mark.skipif(not shutil.which("zsh"), reason="needs zsh")
def test_zsh_offers_the_model_names_of_the_config(built: Path, tmp_path: Path):
    config = tmp_path / "ramstage.yaml"
    config.write_text(CONFIG)
    # Outside a completion, _arguments and _describe stand in: _describe lists what it offers.
    script = (
        "_arguments() { return 1 }; _describe() { print -l -- ${(P)2} }\n"
        f"source {built / 'completion' / 'zsh' / '_ramstage'}; _ramstage_models"
    )
    env = {**os.environ, "RAMSTAGE_CONFIG": str(config)}
    result = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True, env=env,
                            check=True)  # fmt: skip
    assert result.stdout.split() == ["lama", "sd-15"]


def test_troubleshooting_explains_every_reason_status_can_give():
    from ramstage.model import Reason

    table = (REPO / "docs" / "troubleshooting.md").read_text()
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")}
    for reason in Reason:
        assert any(row.startswith(f"`{reason.value}") for row in rows), reason.value
