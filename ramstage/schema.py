"""The config file described once, as a JSON Schema with a description and an example for every
key: editors and Kubernetes tooling validate with it (`ramstage/config.schema.json`, written
from here), and ramstage.yaml(5) is generated from it. config.py remains the parser; the tests
hold both to the same examples, and the schema's keys to the parser's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).with_name("config.schema.json")
# What the converters take (converters.py): units are powers of 1024, a percentage is of RAM.
SIZE_PATTERN = (
    r"^\s*[0-9]+(\.[0-9]+)?\s*([KMGTkmgt][Ii]?[Bb]?|[Bb])?\s*$|^\s*[0-9]+(\.[0-9]+)?%\s*$"
)
DURATION_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h)?\s*$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DIGEST_PATTERN = r"^(xxh3:[0-9a-f]{32}|(sha256|blake3):[0-9a-f]{64})$"
REPO_PATTERN = r"^[A-Za-z0-9_.-]{1,96}(/[A-Za-z0-9_.-]{1,96})?$"
PSI_PATTERN = r"^(some|full)\s+\S+\s+\S+$"
LISTEN_PATTERN = r"^([^\s:]*:|\[[0-9A-Fa-f:.]+\]:)?[0-9]{1,5}$"


def _size(description: str, default: str) -> dict[str, Any]:
    return {
        "description": description + " A size: 512M, 8G, 1.5GiB, 25% (of RAM) or bytes.",
        "default": default,
        "oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
        "examples": [default],
    }


def _duration(description: str, default: str) -> dict[str, Any]:
    return {
        "description": description + " A duration: 500ms, 2s, 1m, 1h or seconds.",
        "default": default,
        "oneOf": [
            {"type": "number", "minimum": 0},
            {"type": "string", "pattern": DURATION_PATTERN},
        ],
        "examples": [default],
    }


def _path(description: str, default: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "description": description + " An absolute path.",
        "type": "string",
        "pattern": "^/",
        "examples": [default or "/var/lib/prometheus/node-exporter/ramstage.prom"],
    }
    if default is not None:
        entry["default"] = default
    return entry


def _choice(description: str, options: tuple[str, ...]) -> dict[str, Any]:
    return {
        "description": description,
        "enum": list(options),
        "default": options[0],
        "examples": [options[0]],
    }


def _section(description: str, properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "description": description,
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        **more,
    }


def _trust(description: str) -> dict[str, Any]:
    names = {
        "type": "array",
        "items": {"oneOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]},
    }
    return _section(
        description,
        {
            "users": {**names, "description": "User names or ids.", "examples": [["root"]]},
            "groups": {**names, "description": "Group names or ids.", "examples": [["root"]]},
        },
    )


def _hf_cache(description: str) -> dict[str, Any]:
    return {
        "description": description + " An absolute path, or ~USER for that user's"
        " ~/.cache/huggingface/hub.",
        "type": "string",
        "pattern": "^[/~]",
        "examples": ["/srv/hf/hub"],
    }


MODEL = _section(
    "One model: a name, and a source or a Hugging Face repo (hf).",
    {
        "name": {
            "description": "The link's name, LINKS_DIR/NAME: 1 to 64 of A-Z a-z 0-9 . _ -,"
            " starting with a letter or digit.",
            "type": "string",
            "pattern": NAME_PATTERN,
            "not": {"enum": [".", ".."]},
            "examples": ["lama"],
        },
        "source": _path("The checkpoint file, or a directory of them, on disk.", None)
        | {"examples": ["/ssd/ai_models/big-lama.ckpt"]},
        "hf": {
            "description": "A Hugging Face repo, ORG/NAME, in the hub cache, instead of source.",
            "type": "string",
            "pattern": REPO_PATTERN,
            "not": {"pattern": "--|[.][.]"},
            "examples": ["meta-llama/Llama-3.1-8B-Instruct"],
        },
        "revision": {
            "description": "With hf: a branch, a tag or a commit hash.",
            "type": "string",
            "pattern": "^[^/]+(/[^/]+)*$",
            "not": {"pattern": "(^|/)[.][.]?(/|$)"},
            "default": "main",
            "examples": ["main"],
        },
        "hf_cache": _hf_cache("With hf: the hub cache, over the top-level hf_cache."),
        "priority": {
            "description": "Higher stays in RAM longer under pressure.",
            "type": "integer",
            "default": 0,
            "examples": [10],
        },
        "digest": {
            "description": "The expected digest of a file source; its algorithm is used.",
            "type": "string",
            "pattern": DIGEST_PATTERN,
            "examples": ["xxh3:" + "0" * 32],
        },
        "validate": _choice(
            "format: safetensors and torch zip checks; torch: also torch.load in a subprocess;"
            " none.",
            ("format", "torch", "none"),
        ),
        "trust": _trust("Added to the top-level trust for this model's source."),
    },
    required=["name"],
    # source: or hf:, not both; revision: and hf_cache: only with hf:.
    oneOf=[{"required": ["source"]}, {"required": ["hf"]}],
    dependencies={"revision": ["hf"], "hf_cache": ["hf"]},
)

SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "$id": "https://ramstage.example.org/config.schema.json",
    **_section(
        "ramstage's config file, /etc/ramstage/ramstage.yaml. Unknown keys are errors.",
        {
            "store": _section(
                "The tmpfs that holds the copies.",
                {
                    "path": _path("Where the tmpfs is mounted.", "/run/ramstage/store"),
                    "size": _size("The hard bound of the tmpfs (its size= option).", "8G"),
                    "mount": {
                        "description": "false: use an existing directory as the store, with no"
                        " mount (unprivileged use).",
                        "type": "boolean",
                        "default": True,
                        "examples": [True],
                    },
                    "huge": _choice(
                        "tmpfs huge pages, when ramstage mounts the store.",
                        ("within_size", "never", "always", "advise"),
                    ),
                    "rings": _size(
                        "The bound of the tmpfs mounted beside the store (its directory's"
                        " rings/) that keeps the fast loader's host rings in RAM between"
                        " processes; 0: none.",
                        "1G",
                    ),
                },
            ),
            "links_dir": _path(
                "Where the links are: applications use LINKS_DIR/NAME.", "/run/ramstage/models"
            ),
            "socket": _path("The control socket.", "/run/ramstage/control.sock"),
            "checksum": _choice(
                "The hash that verifies copies: xxh3, sha256, or blake3 (pip only).",
                ("xxh3", "sha256", "blake3"),
            ),
            "ready": _choice(
                "When systemd hears READY=1: links, once every link exists; staged, once every"
                " model is staged or has a reason not to be.",
                ("links", "staged"),
            ),
            "staging": _section(
                "How copies run.",
                {
                    "workers": {
                        "description": "The copy workers every copy in flight shares: files"
                        " copied at once, and models copied at once. Unset: one per core, at"
                        " most 8, and one file at a time from a spinning disk.",
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 64,
                        "examples": [2],
                    }
                },
            ),
            "memory": _section(
                "When RAM is given back, and when models are staged again.",
                {
                    "min_available": _size("Below this MemAvailable, models are evicted.", "2G"),
                    "resume_available": _size(
                        "Models are staged again only above this (at least min_available).", "4G"
                    ),
                    "psi": {
                        "description": "The memory pressure trigger (/proc/pressure/memory):"
                        " some|full STALL WINDOW, the window from 500ms to 10s.",
                        "type": "string",
                        "pattern": PSI_PATTERN,
                        "default": "some 150ms 1s",
                        "examples": ["some 150ms 1s"],
                    },
                    "cooldown": _duration(
                        "No pressure for this long before staging again; 0 means twice the PSI"
                        " window.",
                        "0",
                    ),
                },
            ),
            "watch": _section(
                "How sources are watched for updates.",
                {
                    "settle": _duration(
                        "A changed source must be quiet this long before it is staged.", "2s"
                    ),
                    "rescan": _duration(
                        "A full rescan, for file systems where inotify says nothing.", "5m"
                    ),
                    "config": {
                        "description": "true: reload (as SIGHUP) when this file's contents"
                        " change; for files replaced atomically (a Kubernetes ConfigMap).",
                        "type": "boolean",
                        "default": False,
                        "examples": [True],
                    },
                },
            ),
            "hf_cache": _hf_cache(
                "Where hf: models are looked for; by default $HF_HUB_CACHE, else $HF_HOME/hub,"
                " else ~/.cache/huggingface/hub of the daemon's user."
            ),
            "metrics": _section(
                "Prometheus metrics, off unless a textfile or listen is set.",
                {
                    "textfile": _path(
                        "A file for node_exporter's textfile collector, replaced atomically;"
                        " its name ends in .prom.",
                        None,
                    )
                    | {"pattern": r"^/.*\.prom$"},
                    "listen": {
                        "description": "Serve /metrics over HTTP on [HOST:]PORT; HOST is"
                        " 127.0.0.1 unless given. The unit's PrivateNetwork=yes and"
                        " RestrictAddressFamilies=AF_UNIX need an override for it.",
                        "oneOf": [
                            {"type": "integer", "minimum": 1, "maximum": 65535},
                            {"type": "string", "pattern": LISTEN_PATTERN},
                        ],
                        "examples": ["127.0.0.1:9101"],
                    },
                    "interval": _duration("How often the textfile is written.", "15s"),
                },
            ),
            "trust": _trust(
                "Besides root and each source's owner, who may own or write the directories on"
                " a source's path and own the symlinks to it."
            ),
            "models": {
                "description": "The models to stage.",
                "type": ["array", "null"],
                "items": MODEL,
                "examples": [[{"name": "lama", "source": "/ssd/ai_models/big-lama.ckpt"}]],
            },
        },
    ),
}


def schema_text() -> str:
    return json.dumps(SCHEMA, indent=2) + "\n"
