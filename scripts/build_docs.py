#!/usr/bin/env python3
"""Writes what is generated from the parser and the config schema, at package build time, so
it cannot drift: the man pages ramstage(8) and ramstage.yaml(5), and bash and zsh completion,
into OUT_DIR (default build/docs). With --schema it rewrites ramstage/config.schema.json from
ramstage/schema.py instead.

Needs Debian 12's argparse-manpage 1.2.2 and shtab 1.5.5 (python3-argparse-manpage,
python3-shtab)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

import shtab
from build_manpages.manpage import Manpage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ramstage import __version__  # noqa: E402
from ramstage.cli import build_parser  # noqa: E402
from ramstage.schema import SCHEMA, SCHEMA_FILE, schema_text  # noqa: E402

SUMMARY = "stage ML model checkpoints in RAM behind stable links"
# The parser's epilog blocks, as man page sections.
EPILOG_HEADINGS = {"examples": "Examples", "exit codes": "Exit status"}
FILES = """\
/etc/ramstage/ramstage.yaml: the config, see ramstage.yaml(5).
/run/ramstage/models/NAME: the link an application loads NAME from.
/run/ramstage/store: the tmpfs that holds the copies.
/run/ramstage/control.sock: the control socket.
/usr/share/doc/ramstage: the documentation."""
ENVIRONMENT = "RAMSTAGE_CONFIG: the config file, unless --config is given."
NO_HYPHENATION = ".nh"  # paths and key names are not to be broken across lines
SEE_ALSO = "ramstage.yaml(5), systemctl(1), journalctl(1), tmpfs(5)"
# Model names for completion: the `name:` keys of the config's models, read without starting
# Python (a keypress must not wait for it).
MODEL_NAMES = (
    r"""sed -n -E 's/^[[:space:]]*(-[[:space:]]+)?name:[[:space:]]*["'\'']?"""
    r"""([A-Za-z0-9][A-Za-z0-9._-]*).*/\2/p' "${RAMSTAGE_CONFIG:-/etc/ramstage/ramstage.yaml}" """
    "2>/dev/null"
)
PREAMBLE = {
    "bash": f'_ramstage_models() {{\n  compgen -W "$({MODEL_NAMES})" -- "$1"\n}}\n',
    "zsh": f'_ramstage_models() {{\n  local -a names\n  names=(${{(f)"$({MODEL_NAMES})"}})\n'
    "  _describe 'model' names\n}\n",
}


def build_date() -> str:
    """The date of the release, from SOURCE_DATE_EPOCH (reproducible builds), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else None
    return (when or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%d")


def _with_model_names(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Completes every NAME argument with the config's model names."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for argument in sub._actions:
                    if argument.metavar == "NAME" and not argument.option_strings:
                        argument.complete = {  # type: ignore[attr-defined]
                            "bash": "_ramstage_models",
                            "zsh": "_ramstage_models",
                        }
    return parser


# shtab 1.5.5 reads only the first of a positional's choices in bash (`${!name}` of an array):
# `ramstage st<TAB>` offered nothing. Every choice, one a line, as its compgen call splits them.
SHTAB_FIRST_CHOICE = 'current_action_choices="${!current_action_choices_var}"'
SHTAB_EVERY_CHOICE = (
    'local current_action_choices_all="${current_action_choices_var}[@]"\n'
    '  current_action_choices="$(printf \'%s\\n\' "${!current_action_choices_all}")"'
)


def completion(shell: str) -> str:
    script = shtab.complete(_with_model_names(build_parser()), shell=shell, preamble=PREAMBLE)
    return script.replace(SHTAB_FIRST_CHOICE, SHTAB_EVERY_CHOICE)


def epilog_sections(epilog: str) -> list[dict[str, str]]:
    """`heading:` lines and the indented lines under them (the --help epilog) as sections."""
    sections: list[dict[str, str]] = []
    for line in epilog.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            sections.append({"heading": EPILOG_HEADINGS.get(line[:-1], line[:-1]), "content": ""})
        elif line.strip():
            sections[-1]["content"] += line[2:] + "\n"
    return sections


def _with_command_exits(parser: argparse.ArgumentParser) -> None:
    """argparse-manpage 1.2.2 shows no epilog: each command's exit codes go after its
    description."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if sub.epilog:
                    sub.description = f"{sub.description}. {sub.epilog[0].upper()}{sub.epilog[1:]}."


def ramstage_8() -> str:
    parser = build_parser()
    parser.man_short_description = SUMMARY  # type: ignore[attr-defined]
    _with_command_exits(parser)
    # --help keeps the description's line breaks (RawDescriptionHelpFormatter); man fills it.
    parser.description = " ".join((parser.description or "").split())
    parser._manpage = [  # type: ignore[attr-defined]
        *epilog_sections(parser.epilog or ""),
        {"heading": "Environment", "content": ENVIRONMENT},
        {"heading": "Files", "content": FILES},
        {"heading": "See also", "content": SEE_ALSO},
    ]
    header, _, body = str(Manpage(parser)).partition("\n")
    assert header.startswith(".TH ramstage "), header  # argparse-manpage 1.2.2 writes section 1
    title = f'.TH RAMSTAGE 8 "{build_date()}" "ramstage {__version__}" "System Administration"'
    return f"{title}\n{NO_HYPHENATION}\n{body}"


def roff(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in ".'" else line for line in escaped.split("\n"))


def _keys(properties: dict[str, Any], prefix: str) -> list[str]:
    lines = []
    for key, entry in properties.items():
        path = prefix + key
        lines += [".TP", f".B {roff(path)}", roff(entry["description"])]
        if "enum" in entry:
            lines.append(roff("One of: " + ", ".join(entry["enum"]) + "."))
        if "default" in entry:
            default = entry["default"]
            shown = str(default).lower() if isinstance(default, bool) else str(default)
            lines.append(roff(f"Default: {shown}."))
        if "properties" in entry:
            lines += _keys(entry["properties"], path + ".")
        elif entry.get("items", {}).get("properties"):
            lines += _keys(entry["items"]["properties"], path + "[].")
    return lines


def ramstage_yaml_5(example: str) -> str:
    lines = [
        f'.TH RAMSTAGE.YAML 5 "{build_date()}" "ramstage {__version__}" "File Formats"',
        NO_HYPHENATION,
        ".SH NAME",
        "ramstage.yaml \\- configuration of ramstage(8)",
        ".SH SYNOPSIS",
        ".B /etc/ramstage/ramstage.yaml",
        ".SH DESCRIPTION",
        roff(
            "A YAML mapping, read when ramstage starts and on reload (systemctl reload ramstage)."
            " Unknown keys are errors; every error names the key path and the bad value, and"
            " a file with errors is refused whole: a reload keeps the config in use. Check a file"
            " with: ramstage check-config PATH. A JSON Schema of it is"
            " /usr/share/ramstage/config.schema.json."
        ),
        ".SH KEYS",
        *_keys(SCHEMA["properties"], ""),
        ".SH EXAMPLE",
        ".nf",
        roff(example.rstrip("\n")),
        ".fi",
        ".SH SEE ALSO",
        ".BR ramstage (8)",
    ]
    return "\n".join(lines) + "\n"


def generated_files(example: str) -> dict[str, str]:
    return {
        "man/ramstage.8": ramstage_8(),
        "man/ramstage.yaml.5": ramstage_yaml_5(example),
        "completion/bash/ramstage": completion("bash"),
        "completion/zsh/_ramstage": completion("zsh"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("build/docs"))
    parser.add_argument("--schema", action="store_true", help="rewrite the packaged schema")
    args = parser.parse_args()
    if args.schema:
        SCHEMA_FILE.write_text(schema_text())
        return
    example = (Path(__file__).resolve().parents[1] / "etc" / "ramstage.yaml").read_text()
    for relpath, text in generated_files(example).items():
        path = args.out_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)


if __name__ == "__main__":
    main()
