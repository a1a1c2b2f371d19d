"""The config file as an operator meets it: `ramstage check-config` on good and bad files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ramstage.cli import main
from ramstage.config import load_config, parse_config
from ramstage.converters import parse_duration, parse_size
from ramstage.hub import HubRepo
from ramstage.system import System

REPO = Path(__file__).resolve().parents[2]
GOOD_DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"weights")
    return path


def check(tmp_path: Path, data: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "ramstage.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    code = main(["check-config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def model(path: Path, **changes: Any) -> dict[str, Any]:
    return {"name": "m", "source": str(path), **changes}


# (what is wrong, config built from the source path, key path, the bad value as printed)
BAD = [
    ("unknown top key", lambda s: {"colour": "red"}, "colour", "'red'"),
    ("unknown store key", lambda s: {"store": {"sise": "1G"}}, "store.sise", "'1G'"),
    ("unknown memory key", lambda s: {"memory": {"floor": "1G"}}, "memory.floor", "'1G'"),
    ("unknown watch key", lambda s: {"watch": {"poll": "1s"}}, "watch.poll", "'1s'"),
    ("unknown model key", lambda s: {"models": [model(s, size=3)]}, "models[0].size", "3"),
    ("size unit", lambda s: {"store": {"size": "8X"}}, "store.size", "'8X'"),
    ("size word", lambda s: {"store": {"size": "lots"}}, "store.size", "'lots'"),
    ("size negative", lambda s: {"store": {"size": -1}}, "store.size", "-1"),
    ("size zero", lambda s: {"store": {"size": "0"}}, "store.size", "'0'"),
    ("size bare iB", lambda s: {"store": {"size": "10iB"}}, "store.size", "'10iB'"),
    ("percent over 100", lambda s: {"store": {"size": "150%"}}, "store.size", "'150%'"),
    ("size boolean", lambda s: {"store": {"size": True}}, "store.size", "True"),
    (
        "floor size",
        lambda s: {"memory": {"min_available": "2 gigs"}},
        "memory.min_available",
        "'2 gigs'",
    ),
    ("duration unit", lambda s: {"watch": {"settle": "2d"}}, "watch.settle", "'2d'"),
    ("duration negative", lambda s: {"watch": {"settle": -1}}, "watch.settle", "-1"),
    ("duration word", lambda s: {"watch": {"rescan": "often"}}, "watch.rescan", "'often'"),
    ("watch.config word", lambda s: {"watch": {"config": "yes"}}, "watch.config", "'yes'"),
    ("cooldown", lambda s: {"memory": {"cooldown": "soon"}}, "memory.cooldown", "'soon'"),
    ("name ../x", lambda s: {"models": [model(s, name="../x")]}, "models[0].name", "'../x'"),
    ("name a/b", lambda s: {"models": [model(s, name="a/b")]}, "models[0].name", "'a/b'"),
    ("name .", lambda s: {"models": [model(s, name=".")]}, "models[0].name", "'.'"),
    ("name ..", lambda s: {"models": [model(s, name="..")]}, "models[0].name", "'..'"),
    ("name empty", lambda s: {"models": [model(s, name="")]}, "models[0].name", "''"),
    (
        "name 65 chars",
        lambda s: {"models": [model(s, name="a" * 65)]},
        "models[0].name",
        repr("a" * 65),
    ),
    ("name NUL", lambda s: {"models": [model(s, name="a\0b")]}, "models[0].name", "'a\\x00b'"),
    ("name newline", lambda s: {"models": [model(s, name="a\n")]}, "models[0].name", "'a\\n'"),
    (
        "name dot first",
        lambda s: {"models": [model(s, name=".hidden")]},
        "models[0].name",
        "'.hidden'",
    ),
    ("name number", lambda s: {"models": [model(s, name=7)]}, "models[0].name", "7"),
    ("name missing", lambda s: {"models": [{"source": str(s)}]}, "models[0].name", "is required"),
    ("duplicate", lambda s: {"models": [model(s), model(s)]}, "models[1].name", "duplicate name"),
    (
        "relative source",
        lambda s: {"models": [model(s, source="ssd/m.ckpt")]},
        "models[0].source",
        "'ssd/m.ckpt'",
    ),
    (
        "missing source",
        lambda s: {"models": [model(s, source="/nonexistent/m.ckpt")]},
        "models[0].source",
        "'/nonexistent/m.ckpt'",
    ),
    (
        "source NUL",
        lambda s: {"models": [model(s, source="/a\0b")]},
        "models[0].source",
        "'/a\\x00b'",
    ),
    (
        "source not a file",
        lambda s: {"models": [model(s, source="/dev/null")]},
        "models[0].source",
        "'/dev/null'",
    ),
    ("relative store", lambda s: {"store": {"path": "run/store"}}, "store.path", "'run/store'"),
    ("relative links", lambda s: {"links_dir": "models"}, "links_dir", "'models'"),
    ("relative socket", lambda s: {"socket": "control.sock"}, "socket", "'control.sock'"),
    (
        "resume < min",
        lambda s: {"memory": {"min_available": "4G", "resume_available": "2G"}},
        "memory.resume_available",
        "'2G'",
    ),
    ("psi syntax", lambda s: {"memory": {"psi": "150ms 1s"}}, "memory.psi", "'150ms 1s'"),
    ("psi kind", lambda s: {"memory": {"psi": "most 150ms 1s"}}, "memory.psi", "'most 150ms 1s'"),
    (
        "psi window",
        lambda s: {"memory": {"psi": "some 150ms 20s"}},
        "memory.psi",
        "'some 150ms 20s'",
    ),
    (
        "psi stall > window",
        lambda s: {"memory": {"psi": "some 2s 1s"}},
        "memory.psi",
        "'some 2s 1s'",
    ),
    (
        "digest algorithm",
        lambda s: {"models": [model(s, digest="md5:" + "ab" * 16)]},
        "models[0].digest",
        "'md5:",
    ),
    (
        "digest short",
        lambda s: {"models": [model(s, digest="sha256:abc")]},
        "models[0].digest",
        "'sha256:abc'",
    ),
    (
        "digest upper",
        lambda s: {"models": [model(s, digest=GOOD_DIGEST.upper())]},
        "models[0].digest",
        repr(GOOD_DIGEST.upper()),
    ),
    ("priority", lambda s: {"models": [model(s, priority="high")]}, "models[0].priority", "'high'"),
    ("validate", lambda s: {"models": [model(s, validate="deep")]}, "models[0].validate", "'deep'"),
    (
        "trust user unknown",
        lambda s: {"models": [model(s, trust={"users": ["no-such-user-here"]})]},
        "models[0].trust.users",
        "['no-such-user-here']",
    ),
    ("trust groups not a list", lambda s: {"trust": {"groups": "adm"}}, "trust.groups", "'adm'"),
    ("trust key", lambda s: {"trust": {"hosts": []}}, "trust.hosts", "[]"),
    ("checksum", lambda s: {"checksum": "md5"}, "checksum", "'md5'"),
    ("ready", lambda s: {"ready": "sometimes"}, "ready", "'sometimes'"),
    ("mount", lambda s: {"store": {"mount": "maybe"}}, "store.mount", "'maybe'"),
    ("models not a list", lambda s: {"models": {"name": "m"}}, "models", "{'name': 'm'}"),
    ("model not a mapping", lambda s: {"models": ["m"]}, "models[0]", "'m'"),
    ("store not a mapping", lambda s: {"store": "/run/store"}, "store", "'/run/store'"),
    ("top not a mapping", lambda s: ["models"], "(top level)", "['models']"),
    ("hf repo id", lambda s: {"models": [hf("a/b/c")]}, "models[0].hf", "'a/b/c'"),
    ("hf repo dashes", lambda s: {"models": [hf("a--b")]}, "models[0].hf", "'a--b'"),
    ("hf dot-dot", lambda s: {"models": [hf("../x")]}, "models[0].hf", "'../x'"),
    (
        "hf revision",
        lambda s: {"models": [hf(revision="../main")]},
        "models[0].revision",
        "'../main'",
    ),
    ("hf cache relative", lambda s: {"hf_cache": "hub"}, "hf_cache", "'hub'"),
    (
        "hf cache user",
        lambda s: {"models": [hf(hf_cache="~nobody-x")]},
        "models[0].hf_cache",
        "'~nobody-x'",
    ),
    ("hf and source", lambda s: {"models": [hf(source="/x")]}, "models[0].source", "'/x'"),
    (
        "revision alone",
        lambda s: {"models": [model(s, revision="v1")]},
        "models[0].revision",
        "'v1'",
    ),
    ("neither", lambda s: {"models": [{"name": "m"}]}, "models[0].source", "None"),
]


def hf(repo_id: str = "org/name", **changes: Any) -> dict[str, Any]:
    return {"name": "m", "hf": repo_id, **changes}


@pytest.mark.parametrize(("build", "key", "value"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_config_exits_2_naming_the_key_path_and_value(
    tmp_path, source, capsys, build, key, value
):
    code, output = check(tmp_path, build(source), capsys)
    assert code == 2
    assert any(
        line.strip().startswith(f"{key}:") and value in line for line in output.splitlines()
    ), output


def test_every_problem_is_listed_at_once(tmp_path, source, capsys):
    data = {
        "colour": "red",
        "store": {"size": "8X", "path": "rel"},
        "memory": {"min_available": "4G", "resume_available": "1G"},
        "models": [
            {"name": "../x", "source": "relative", "priority": "high", "digest": "sha256:zz"},
            model(source, name="ok"),
            model(source, name="ok", source="/nonexistent"),
        ],
    }
    code, output = check(tmp_path, data, capsys)
    assert code == 2
    keys = [line.split(":")[0].strip() for line in output.splitlines()[1:]]
    assert sorted(keys) == sorted(
        [
            "colour",
            "store.size",
            "store.path",
            "memory.resume_available",
            "models[0].name",
            "models[0].source",
            "models[0].priority",
            "models[0].digest",
            "models[2].name",
            "models[2].source",
        ]
    )


def test_yaml_that_does_not_parse_is_a_config_error_naming_the_file_and_line(tmp_path, capsys):
    code, output = check(tmp_path, "store:\n  size: [unclosed\nmodels: []\n", capsys)
    assert code == 2
    problems = output.splitlines()[1:]
    assert problems == [
        f"  {tmp_path / 'ramstage.yaml'}: not valid YAML: expected ',' or ']', but got ':'"
        " (line 3, column 7), while parsing a flow sequence (line 2, column 9)"
    ], output


def test_a_yaml_boolean_where_a_word_is_expected_names_the_words(tmp_path, source, capsys):
    code, output = check(
        tmp_path, f"models: [{{name: m, source: {source}, validate: yes}}]", capsys
    )
    assert code == 2
    assert output.splitlines()[1:] == [
        "  models[0].validate: expected one of format, torch, none (an unquoted yes, no, on or"
        " off is a YAML boolean): True"
    ], output


def test_a_missing_config_file_says_so(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 << 20),
        ("8G", 8 << 30),
        ("1.5GiB", 3 << 29),
        ("64k", 64 << 10),
        ("1T", 1 << 40),
        ("100", 100),
        ("2GB", 2 << 30),
        (4096, 4096),
    ],
)
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("model_cache", "top_cache", "environ", "expected"),
    [
        ("/m/hub", "/top/hub", {"HF_HUB_CACHE": "/env/hub"}, "/m/hub"),
        (None, "/top/hub", {"HF_HUB_CACHE": "/env/hub"}, "/top/hub"),
        (None, None, {"HF_HUB_CACHE": "/env/hub", "HF_HOME": "/hf"}, "/env/hub"),
        (None, None, {"HF_HOME": "/hf", "HOME": "/home/x"}, "/hf/hub"),
        (None, None, {"HOME": "/home/x"}, "/home/x/.cache/huggingface/hub"),
        (None, None, {"HOME": "/home/x", "XDG_CACHE_HOME": "/xdg"}, "/xdg/huggingface/hub"),
        ("~root", None, {"HF_HUB_CACHE": "/env/hub"}, "/root/.cache/huggingface/hub"),
    ],
)
def test_an_hf_model_finds_its_cache_config_first_then_as_huggingface_hub_does(
    model_cache, top_cache, environ, expected
):
    data: dict[str, Any] = {"models": [hf(**({"hf_cache": model_cache} if model_cache else {}))]}
    if top_cache:
        data["hf_cache"] = top_cache
    (model_config,) = parse_config(data, system=System(environ=environ)).models
    assert model_config.origin == HubRepo("org/name", "main", Path(expected))
    assert model_config.resolve() == Path(expected) / "models--org--name" / "snapshots" / "main"


def test_a_percentage_is_of_total_ram():
    total = System().meminfo_bytes("MemTotal")
    # MemTotal, as sysinfo(2) counts it too.
    assert total == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert parse_size("25%", total_bytes=total) == total // 4


def test_a_percentage_in_the_config_is_of_the_ram_the_system_reports(tmp_path):
    class Machine(System):
        def meminfo_bytes(self, field: str) -> int:
            return 8 << 30 if field == "MemTotal" else super().meminfo_bytes(field)

    config = parse_config({"store": {"size": "25%"}}, system=Machine())
    assert config.store.size_bytes == 2 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), (3, 3.0)],
)
def test_durations_parse(text, expected):
    assert parse_duration(text) == expected


def test_a_good_config_parses_into_what_it_says(tmp_path, source, capsys):
    data = {
        "store": {"path": "/run/x/store", "size": "1.5GiB", "mount": False},
        "links_dir": "/run/x/models/",
        "checksum": "sha256",
        "ready": "staged",
        "memory": {"min_available": "512M", "resume_available": "1G", "psi": "full 200ms 2s"},
        "watch": {"settle": "500ms", "rescan": "1m", "config": True},
        "trust": {"users": ["daemon", 4242]},
        "models": [
            model(source, priority=-3, digest=GOOD_DIGEST, validate="none", trust={"groups": [0]})
        ],
    }
    code, output = check(tmp_path, data, capsys)
    assert code == 0, output
    assert "OK (1 models)" in output
    config = load_config(tmp_path / "ramstage.yaml")
    assert config.store.size_bytes == 3 << 29 and config.store.mount is False
    assert str(config.links_dir) == "/run/x/models"
    assert config.memory.psi.trigger_line() == "full 200000 2000000"
    assert config.watch.settle_seconds == 0.5 and config.watch.rescan_seconds == 60
    assert config.watch.config is True
    assert config.models[0].priority == -3 and config.models[0].digest == GOOD_DIGEST
    assert config.models[0].resolve() == source
    # The model's own trust adds to the top-level one.
    assert config.models[0].trust.uids == {1, 4242} and config.models[0].trust.gids == {0}


def test_a_name_of_64_characters_is_fine(tmp_path, source, capsys):
    code, output = check(tmp_path, {"models": [model(source, name="a" * 64)]}, capsys)
    assert code == 0, output


def test_the_example_config_passes_check_config():
    result = subprocess.run(
        [sys.executable, "-m", "ramstage", "check-config", str(REPO / "etc" / "ramstage.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_the_example_models_pass_once_their_sources_exist(tmp_path, capsys):
    """The commented-out models in etc/ramstage.yaml are valid config as written."""
    text = (REPO / "etc" / "ramstage.yaml").read_text()
    data = yaml.safe_load(text)
    commented = "\n".join(
        line[2:] for line in text.splitlines()[text.splitlines().index("models: []") + 1 :]
    )
    data["models"] = yaml.safe_load(commented)["models"]
    for index, entry in enumerate(data["models"]):
        if "hf" in entry:
            repo = tmp_path / "hub" / ("models--" + entry["hf"].replace("/", "--"))
            (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
            (repo / "refs").mkdir()
            (repo / "refs" / entry["revision"]).write_text("0" * 40)
            entry["hf_cache"] = str(tmp_path / "hub")
            continue
        entry["source"] = str(tmp_path / f"source{index}")
        Path(entry["source"]).write_bytes(b"x")
    code, output = check(tmp_path, data, capsys)
    assert code == 0, output
