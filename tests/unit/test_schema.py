"""The JSON Schema of the config and the parser accept and reject the same examples, and know
the same keys; the schema file in the package is the one schema.py describes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ramstage import config
from ramstage import converters as convert
from ramstage.errors import ConfigError
from ramstage.schema import SCHEMA, SCHEMA_FILE, schema_text

REPO = Path(__file__).resolve().parents[2]
MODEL = {"name": "lama", "source": "/ssd/lama.ckpt"}
HF_MODEL = {"name": "llama", "hf": "org/name"}
HF_KEYS = ("hf", "revision", "hf_cache")
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


def parser_accepts(data: Any) -> bool:
    try:
        config.parse_config(data)
    except ConfigError:
        return False
    return True


def schema_accepts(data: Any) -> bool:
    return VALIDATOR.is_valid(data)


def test_the_schema_is_a_valid_draft_7_schema():
    jsonschema.Draft7Validator.check_schema(SCHEMA)


def test_the_packaged_schema_file_is_generated_from_schema_py():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "run: .venv/bin/python scripts/build_docs.py --schema"
    )


def parser_keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """The keys the parser knows in each mapping, by key path (models[0], not models[])."""
    known: dict[str, set[str]] = {}
    section = convert.Section.__init__

    def recording(self: Any, data: Any, key: str, problems: Any, keys: tuple[str, ...]) -> None:
        known[key] = set(keys)
        section(self, data, key, problems, keys)

    monkeypatch.setattr(convert.Section, "__init__", recording)
    config.parse_config({"trust": {}, "models": [{**MODEL, "trust": {}}]})
    return known


def schema_keys(properties: dict[str, Any], path: str = "") -> dict[str, set[str]]:
    keys = {path: set(properties)}
    for key, entry in properties.items():
        inner = f"{path}.{key}" if path else key
        if "properties" in entry:
            keys.update(schema_keys(entry["properties"], inner))
        elif "properties" in entry.get("items", {}):
            keys.update(schema_keys(entry["items"]["properties"], inner + "[0]"))
    return keys


def test_the_schema_knows_the_parsers_keys_in_every_mapping(monkeypatch: pytest.MonkeyPatch):
    assert schema_keys(SCHEMA["properties"]) == parser_keys(monkeypatch)


def examples(properties: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key path, a mapping that sets that key to one of its examples), for every key below."""
    cases = []
    for key, entry in properties.items():
        if "properties" in entry:
            inner = examples(entry["properties"])
            cases += [(f"{key}.{path}", {key: data}) for path, data in inner]
        else:
            cases += [(key, {key: value}) for value in entry["examples"]]
    return cases


def every_example() -> list[tuple[str, Any]]:
    model = examples(SCHEMA["properties"]["models"]["items"]["properties"])
    in_a_model = [
        (f"models[0].{path}", {"models": [{**(HF_MODEL if path in HF_KEYS else MODEL), **data}]})
        for path, data in model
    ]
    return examples(SCHEMA["properties"]) + in_a_model


@pytest.mark.parametrize(("key", "data"), every_example(), ids=[k for k, _ in every_example()])
def test_every_example_in_the_schema_is_accepted_by_both(key: str, data: Any):
    assert schema_accepts(data), key
    assert parser_accepts(data), key


ACCEPTED = [
    {},
    {"models": None},
    {"store": {"size": "1.5GiB", "mount": False, "huge": "never"}},
    {"store": {"size": "25%"}},
    {"store": {"size": 1048576}},
    {"memory": {"min_available": "512M", "resume_available": "1G", "psi": "full 100ms 2s"}},
    {"memory": {"cooldown": 3}},
    {"watch": {"settle": "500ms", "rescan": "1h"}},
    {"metrics": {"listen": 9101, "interval": "1s"}},
    {"metrics": {"listen": ":9101", "textfile": "/var/lib/node/ramstage.prom"}},
    {"metrics": {"listen": "[::1]:9101"}},
    {"trust": {"users": ["root", 0], "groups": ["root"]}},
    {"models": [{**MODEL, "digest": "sha256:" + "a" * 64, "validate": "none", "priority": -1}]},
    {"models": [MODEL, {"name": "sd-1.5_x", "source": "/ssd/sd15"}]},
    {"hf_cache": "/srv/hf/hub", "models": [HF_MODEL]},
    {"models": [{**HF_MODEL, "revision": "v2.0/rc", "hf_cache": "/srv/hf"}]},
    {"models": [{**HF_MODEL, "hf": "gpt2"}]},
]

REJECTED = [
    [],
    {"stor": {}},
    {"store": {"size": "8 gigabytes"}},
    {"store": {"size": "8Q"}},
    {"store": {"size": -1}},
    {"store": {"mount": "yes"}},
    {"store": {"huge": "sometimes"}},
    {"store": {"path": "relative/path"}},
    {"store": {"colour": "red"}},
    {"checksum": "md5"},
    {"ready": True},
    {"staging": {"workers": 0}},
    {"staging": {"workers": 65}},
    {"staging": {"workers": "2"}},
    {"memory": {"psi": "sometimes"}},
    {"memory": {"cooldown": "soon"}},
    {"watch": {"settle": -1}},
    {"metrics": {"listen": "localhost"}},
    {"metrics": {"listen": 70000}},
    {"metrics": {"textfile": "metrics.prom"}},
    {"metrics": {"textfile": "/var/lib/node/ramstage.txt"}},
    {"trust": {"users": "root"}},
    {"trust": {"people": []}},
    {"models": {"lama": "/ssd/lama.ckpt"}},
    {"models": [{"name": "lama"}]},
    {"models": [{"source": "/ssd/lama.ckpt"}]},
    {"models": [{**MODEL, "name": "-lama"}]},
    {"models": [{**MODEL, "name": "a/b"}]},
    {"models": [{**MODEL, "name": "x" * 65}]},
    {"models": [{**MODEL, "digest": "md5:abc"}]},
    {"models": [{**MODEL, "validate": True}]},
    {"models": [{**MODEL, "priority": 1.5}]},
    {"models": [{**MODEL, "extra": 1}]},
    {"models": [{**MODEL, "hf": "org/name"}]},
    {"models": [{**MODEL, "revision": "main"}]},
    {"models": [{**HF_MODEL, "hf": "org/na--me"}]},
    {"models": [{**HF_MODEL, "hf": "a/b/c"}]},
    {"models": [{**HF_MODEL, "revision": "../main"}]},
    {"models": [{**HF_MODEL, "hf_cache": "relative"}]},
    {"hf_cache": "relative/hub"},
]


@pytest.mark.parametrize("data", ACCEPTED, ids=json.dumps)
def test_both_accept(data: Any):
    assert schema_accepts(data)
    assert parser_accepts(data)


@pytest.mark.parametrize("data", REJECTED, ids=json.dumps)
def test_both_reject(data: Any):
    assert not schema_accepts(data)
    assert not parser_accepts(data)


def test_both_accept_the_example_config_with_its_models():
    data = yaml.safe_load((REPO / "etc" / "ramstage.yaml").read_text())
    commented = (REPO / "etc" / "ramstage.yaml").read_text().split("# models:\n", 1)[1]
    data["models"] = yaml.safe_load(commented.replace("#   ", "  ").replace("#     #", "#"))
    assert len(data["models"]) == 3
    assert schema_accepts(data)
    assert parser_accepts(data)
