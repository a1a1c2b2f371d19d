"""The config file read as YAML, bounded so that any file is refused in little time and memory,
with errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ramstage.errors import ConfigError

# Bounds on what the loader takes, so that any file is refused in little time and memory: a
# config is a few kilobytes, nested 5 deep.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000  # counting every use of an alias in full ("billion laughs")


class _TooComplex(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses, while it composes and before anything is built, nesting deeper
    than MAX_DEPTH (PyYAML composes recursively: RecursionError) and aliases that expand to
    more than MAX_NODES nodes. PyYAML builds an alias as a shared object, cheap to hold, but
    anything that walks the result (repr in an error message, the converters) expands it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0  # composed so far, each alias counted as the nodes it stands for
        self._sizes: dict[int, int] = {}  # id(node) -> its nodes, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:
                size = self._sizes.get(id(anchored))
                if size is None:
                    raise _TooComplex(f"alias *{event.anchor} within its own anchor{_at(event)}")
                self._count(size, event)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _TooComplex(f"nested deeper than {MAX_DEPTH} levels{_at(event)}")
        before = self._nodes
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._count(1, event)
        self._sizes[id(node)] = self._nodes - before
        return node

    def _count(self, nodes: int, event: yaml.Event) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise _TooComplex(f"more than {MAX_NODES} values with every alias expanded{_at(event)}")


def _at(event: yaml.Event) -> str:
    return _at_mark(event.start_mark)


def _at_mark(mark: Any) -> str:  # yaml.Mark, or libyaml's, or None
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """One line that says where, in place of PyYAML's several, which name the text that was
    parsed ("<unicode string>") rather than the file."""
    problem = f"{error.problem or 'a syntax error'}{_at_mark(error.problem_mark)}"
    if error.context:
        problem += f", {error.context}{_at_mark(error.context_mark)}"
    return problem


def read_yaml(path: Path) -> Any:
    """The file's YAML, bounded in size, depth and alias expansion; ConfigError otherwise."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the config file: {error.strerror}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it the config?"])
    try:
        text = raw.decode()
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 (byte {error.start})"]) from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: plain data only
    except _TooComplex as error:
        raise ConfigError([f"{path}: {error}"]) from None
    except yaml.MarkedYAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {_yaml_problem(error)}"]) from None
    except yaml.reader.ReaderError as error:  # a character YAML does not allow, such as NUL
        line = text.count("\n", 0, error.position)
        column = error.position - text.rfind("\n", 0, error.position) - 1
        raise ConfigError(
            [
                f"{path}: not valid YAML: character #x{error.character:04x} (line {line + 1},"
                f" column {column + 1}): {error.reason}"
            ]
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {error}"]) from None
    except ValueError as error:
        # Values YAML parses but Python refuses to build: an integer of more than 4300 digits
        # (sys.get_int_max_str_digits), a timestamp such as 2001-02-30.
        raise ConfigError([f"{path}: a value that cannot be loaded: {error}"]) from None
