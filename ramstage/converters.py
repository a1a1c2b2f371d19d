"""The config's small converters, each turning one value of the file into what the schema
holds or saying, in an Invalid, what was expected; a Section reads one mapping with them and
collects every problem under its key path (config.py puts the schema together)."""

from __future__ import annotations

import grp
import os
import pwd
import re
import reprlib
from pathlib import Path
from typing import Any, Callable

from ramstage.access import Trust
from ramstage.hub import HubRepo, user_cache

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_REPO_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,96}(/[A-Za-z0-9_.-]{1,96})?")
_DIGEST_RE = re.compile(r"(xxh3:[0-9a-f]{32}|(sha256|blake3):[0-9a-f]{64})")
MAX_SIZE_BYTES = 1 << 60
MAX_SECONDS = 366 * 86400.0
SHOWN_CHARS = 120


class Problems:
    """Collects every problem in one pass, so check-config can list them all at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str, value: Any) -> None:
        self.items.append(f"{key}: {message}: {shown(value)}")


def shown(value: Any) -> str:
    """repr(), cut short: a value may be a megabyte of text, or aliases that expand to gigabytes
    (reprlib looks at the first few items of each container, a few levels deep; what that
    leaves is cut again as a whole)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = SHOWN_CHARS
    short.maxlevel, short.maxlist, short.maxdict, short.maxlong = 3, 8, 8, 40
    text = short.repr(value)
    return text if len(text) <= 2 * SHOWN_CHARS else text[: 2 * SHOWN_CHARS - 3] + "..."


def key_name(key: Any) -> str:
    """A key of the file as a key path names it: a short printable string as written, else
    shown(), so that every problem is one line (a message crosses the socket as lines)."""
    if isinstance(key, str) and len(key) <= SHOWN_CHARS and key.isprintable():
        return key
    return shown(key)


class Invalid(Exception):
    pass


def parse_size(text: Any, *, total_bytes: int | None = None) -> int:
    """`512M`, `8G`, `1.5GiB`, `25%` (of total_bytes, the machine's RAM) or a plain number of
    bytes; units are powers of 1024."""
    if isinstance(text, bool):
        raise Invalid("expected a size such as 512M, 8G, 1.5GiB or 25%")
    if isinstance(text, int):
        if text < 0:
            raise Invalid("a size cannot be negative")
        return _bounded_size(text)
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            percent = float(text.strip()[:-1])
        except ValueError:
            raise Invalid("expected a percentage such as 25%") from None
        if not 0 < percent <= 100:
            raise Invalid("a percentage must be above 0 and at most 100")
        if total_bytes is None:
            raise Invalid("a percentage of RAM is not taken here")
        return int(total_bytes * percent / 100)
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    if not match or (match.group(3) and not match.group(2) and match.group(3).lower() != "b"):
        raise Invalid("expected a size such as 512M, 8G, 1.5GiB or 25%")
    power = " KMGT".index(match.group(2).upper() or " ")
    return _bounded_size(float(match.group(1)) * 1024**power)


def _bounded_size(size: float) -> int:
    # float("9" * 400) is inf, and int(inf) raises OverflowError.
    if not size <= MAX_SIZE_BYTES:
        raise Invalid("a size must be at most 1 EiB")
    return int(size)


def parse_duration(text: Any) -> float:
    """`500ms`, `2s`, `1m`, `1h`, or a plain number of seconds."""
    if isinstance(text, bool):
        raise Invalid("expected a duration such as 500ms, 2s or 1m")
    if isinstance(text, (int, float)):
        if text < 0:
            raise Invalid("a duration cannot be negative")
        return _bounded_seconds(text)
    match = _DURATION_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise Invalid("expected a duration such as 500ms, 2s or 1m")
    return _bounded_seconds(float(match.group(1)) * _DURATION_UNITS[match.group(2)])


def _bounded_seconds(seconds: float) -> float:
    # NaN fails every comparison, so asking for what is wanted refuses it, and inf; Python
    # compares an int of any size with a float exactly.
    if not seconds <= MAX_SECONDS:
        raise Invalid("a duration must be finite and at most a year")
    return float(seconds)


def interval(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 1:
        raise Invalid("expected at least 1s")
    return seconds


def textfile(value: Any) -> Path:
    path = absolute_path(value)
    if path.suffix != ".prom":
        raise Invalid("must end in .prom: node_exporter's textfile collector reads only those")
    return path


def listen_address(value: Any) -> tuple[str, int]:
    """`9101`, `:9101` or `HOST:PORT` (`[::1]:9101`): loopback unless a host is given."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    host, _, port = text.rpartition(":") if isinstance(text, str) else ("", "", "")
    if (
        not (port.isascii() and port.isdigit())
        or not 1 <= int(port) <= 65535
        or any(c.isspace() for c in host)
    ):
        raise Invalid("expected PORT or HOST:PORT, such as 127.0.0.1:9101")
    return host.strip("[]") or "127.0.0.1", int(port)


def absolute_path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise Invalid("expected a path")
    if "\0" in value:
        raise Invalid("a path cannot contain NUL")
    if not os.path.isabs(value):
        raise Invalid("must be an absolute path")
    return Path(os.path.normpath(value))


def choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted yes, no, on or off as a boolean.
            raise Invalid(
                f"expected one of {', '.join(options)}"
                " (an unquoted yes, no, on or off is a YAML boolean)"
            )
        if value not in options:
            raise Invalid("expected one of " + ", ".join(options))
        return str(value)

    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("expected true or false")
    return value


def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("expected a whole number")
    return value


def workers(value: Any) -> int:
    workers = integer(value)
    if not 1 <= workers <= 64:
        raise Invalid("expected 1 to 64")
    return workers


def name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise Invalid(
            "a name is 1 to 64 of A-Z a-z 0-9 . _ - starting with a letter or digit, not . or .."
        )
    return value


def digest(value: Any) -> str:
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise Invalid(
            "expected sha256:<64 hex digits>, xxh3:<32 hex digits> or blake3:<64 hex digits>"
        )
    return value


def hub_repo(value: Any) -> str:
    """A Hugging Face repo id: ORG/NAME or NAME, as the hub allows them."""
    if (
        not isinstance(value, str)
        or not _REPO_ID_RE.fullmatch(value)
        or "--" in value
        or ".." in value
    ):
        raise Invalid("expected a Hugging Face repo id such as org/name")
    return value


def revision(value: Any) -> str:
    """A branch, a tag (refs/REVISION in the cache) or a commit hash."""
    parts = value.split("/") if isinstance(value, str) and "\0" not in value else [""]
    if any(part in ("", ".", "..") for part in parts):
        raise Invalid("expected a branch, a tag or a commit hash, such as main")
    return str(value)


def hub_cache(value: Any) -> Path:
    """A hub cache: an absolute path, or ~USER for that user's ~/.cache/huggingface/hub."""
    if isinstance(value, str) and value.startswith("~"):
        try:
            return user_cache(value[1:])
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise Invalid(f"no such user: {shown(value[1:])}") from None
    return absolute_path(value)


def _ids(lookup: Callable[[str], int], what: str) -> Callable[[Any], frozenset[int]]:
    def convert(value: Any) -> frozenset[int]:
        if not isinstance(value, list):
            raise Invalid(f"expected a list of {what} names or ids")
        ids = set()
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                ids.add(item)
                continue
            if not isinstance(item, str):
                raise Invalid(f"expected {what} names or ids, not {shown(item)}")
            try:
                ids.add(lookup(item))
            except (KeyError, ValueError):  # ValueError: a NUL in the name
                raise Invalid(f"no such {what}: {shown(item)}") from None
        return frozenset(ids)

    return convert


users = _ids(lambda name: pwd.getpwnam(name).pw_uid, "user")
groups = _ids(lambda name: grp.getgrnam(name).gr_gid, "group")


def trust(data: Any, key: str, problems: Problems) -> Trust:
    """trust: {users: [...], groups: [...]}: besides root and each source's owner, who may own
    or write the directories on a source's path (docs/security.md)."""
    if data is None:
        return Trust()
    section = Section(data, key, problems, ("users", "groups"))
    return Trust(
        section.get("users", users, frozenset()), section.get("groups", groups, frozenset())
    )


class Section:
    """Reads one mapping of the file, converting each key and rejecting unknown ones."""

    def __init__(self, data: Any, key: str, problems: Problems, known: tuple[str, ...]) -> None:
        self.key, self.problems = key, problems
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.add(key or "(top level)", "expected a mapping", data)
            data = {}
        self.data = data
        # Keys may be numbers, dates or null as well as strings; each is named as written
        # (cut short).
        for unknown in sorted((k for k in data if k not in known), key=shown):
            problems.add(self._path(key_name(unknown)), "unknown key", data[unknown])

    def problem(self, name: str, message: str) -> None:
        self.problems.add(self._path(name), message, self.data.get(name))

    def _path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, convert: Callable[[Any], Any], default: Any) -> Any:
        if name not in self.data:
            return default
        try:
            return convert(self.data[name])
        except Invalid as error:
            self.problems.add(self._path(name), str(error), self.data[name])
            return default

    def require(self, name: str, convert: Callable[[Any], Any]) -> Any:
        if name not in self.data:
            self.problems.add(self._path(name), "is required", None)
            return None
        return self.get(name, convert, None)


def origin(section: Section, cache: Path) -> Path | HubRepo | None:
    """`source: PATH`, or `hf: ORG/NAME` with `revision:` (default main) and `hf_cache:`."""
    if "hf" not in section.data:
        for key in ("revision", "hf_cache"):
            if key in section.data:
                section.problem(key, "only taken with hf:")
        source: Path | None = section.require("source", absolute_path)
        return source
    if "source" in section.data:
        section.problem("source", "a model has source: or hf:, not both")
        return None
    repo_id = section.get("hf", hub_repo, None)
    named = section.get("revision", revision, "main")
    cache = section.get("hf_cache", hub_cache, cache)
    return HubRepo(repo_id, named, cache) if repo_id else None
