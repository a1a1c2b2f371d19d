"""The configuration file: schema, converters and errors that name the key path."""

from __future__ import annotations

import grp
import os
import pwd
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import yaml

from ramstage.access import Trust, group_name, user_name
from ramstage.digest import INSTALL, available_algorithms, default_algorithm
from ramstage.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/ramstage/ramstage.yaml")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_PSI_RE = re.compile(r"^(some|full)\s+(\S+)\s+(\S+)$")
CHECKSUMS = ("xxh3", "sha256", "blake3")
_DIGEST_RE = re.compile(r"(xxh3:[0-9a-f]{32}|(sha256|blake3):[0-9a-f]{64})")
HUGE_MODES = ("within_size", "never", "always", "advise")  # tmpfs huge= (tmpfs.rst)
READY_MODES = ("links", "staged")
VALIDATE_MODES = ("format", "torch", "none")
# Bounds on what the loader takes, so that any file is refused in little time and memory: a
# config is a few kilobytes, nested 5 deep.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000  # counting every use of an alias in full ("billion laughs")
MAX_SIZE_BYTES = 1 << 60
MAX_SECONDS = 366 * 86400.0
SHOWN_CHARS = 120


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path("/run/ramstage/store")
    size_bytes: int = 8 << 30
    mount: bool = True
    huge: str = "within_size"


@dataclass(frozen=True)
class PsiTrigger:
    kind: str = "some"
    stall_seconds: float = 0.15
    window_seconds: float = 1.0

    def trigger_line(self) -> str:
        """The line written to /proc/pressure/memory (psi.rst: "some|full STALL_US WINDOW_US")."""
        return f"{self.kind} {round(self.stall_seconds * 1e6)} {round(self.window_seconds * 1e6)}"


@dataclass(frozen=True)
class MemoryConfig:
    min_available_bytes: int = 2 << 30
    resume_available_bytes: int = 4 << 30
    psi: PsiTrigger = field(default_factory=PsiTrigger)
    cooldown_seconds: float = 0.0  # 0: twice the PSI window

    @property
    def effective_cooldown_seconds(self) -> float:
        return self.cooldown_seconds or 2 * self.psi.window_seconds


@dataclass(frozen=True)
class WatchConfig:
    settle_seconds: float = 2.0
    rescan_seconds: float = 300.0


@dataclass(frozen=True)
class StagingConfig:
    # Files of one model copied at once. Two: on these 2-core machines a second stream
    # overlaps one file's reads with another's writes and checks (docs/benchmarks.md).
    workers: int = 2


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: Path
    priority: int = 0
    digest: str | None = None  # "sha256:<hex>", "xxh3:<hex>" or "blake3:<hex>"
    validate: str = "format"
    trust: Trust = field(
        default_factory=Trust
    )  # the top-level trust: and the model's own, together


@dataclass(frozen=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    links_dir: Path = Path("/run/ramstage/models")
    socket: Path = Path("/run/ramstage/control.sock")
    checksum: str = field(default_factory=default_algorithm)
    ready: str = "links"
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    staging: StagingConfig = field(default_factory=StagingConfig)
    trust: Trust = field(default_factory=Trust)
    models: tuple[ModelConfig, ...] = ()

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


class _Problems:
    """Collects every problem in one pass, so check-config can list them all at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str, value: Any) -> None:
        self.items.append(f"{key}: {message}: {shown(value)}")


def shown(value: Any) -> str:
    """repr(), cut short: a value may be a megabyte of text, or aliases that expand to gigabytes
    (reprlib looks at the first few items of each container, a few levels deep)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = SHOWN_CHARS
    short.maxlevel, short.maxlist, short.maxdict, short.maxlong = 3, 8, 8, 40
    return short.repr(value)


class _Invalid(Exception):
    pass


def parse_size(text: Any) -> int:
    """`512M`, `8G`, `1.5GiB`, `25%` (of RAM) or a plain number of bytes; units are powers of
    1024."""
    if isinstance(text, bool):
        raise _Invalid("expected a size such as 512M, 8G, 1.5GiB or 25%")
    if isinstance(text, int):
        if text < 0:
            raise _Invalid("a size cannot be negative")
        return _bounded_size(text)
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            percent = float(text.strip()[:-1])
        except ValueError:
            raise _Invalid("expected a percentage such as 25%") from None
        if not 0 < percent <= 100:
            raise _Invalid("a percentage must be above 0 and at most 100")
        return int(psutil.virtual_memory().total * percent / 100)
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    if not match or (match.group(3) and not match.group(2) and match.group(3).lower() != "b"):
        raise _Invalid("expected a size such as 512M, 8G, 1.5GiB or 25%")
    power = " KMGT".index(match.group(2).upper() or " ")
    return _bounded_size(float(match.group(1)) * 1024**power)


def _bounded_size(size: float) -> int:
    # float("9" * 400) is inf, and int(inf) raises OverflowError.
    if not size <= MAX_SIZE_BYTES:
        raise _Invalid("a size must be at most 1 EiB")
    return int(size)


def parse_duration(text: Any) -> float:
    """`500ms`, `2s`, `1m`, `1h`, or a plain number of seconds."""
    if isinstance(text, bool):
        raise _Invalid("expected a duration such as 500ms, 2s or 1m")
    if isinstance(text, (int, float)):
        if text < 0:
            raise _Invalid("a duration cannot be negative")
        return _bounded_seconds(text)
    match = _DURATION_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise _Invalid("expected a duration such as 500ms, 2s or 1m")
    return _bounded_seconds(float(match.group(1)) * _DURATION_UNITS[match.group(2)])


def _bounded_seconds(seconds: float) -> float:
    # NaN fails every comparison, so asking for what is wanted refuses it, and inf; Python
    # compares an int of any size with a float exactly.
    if not seconds <= MAX_SECONDS:
        raise _Invalid("a duration must be finite and at most a year")
    return float(seconds)


def parse_psi(text: Any) -> PsiTrigger:
    """`some 150ms 1s`: the kernel takes windows from 500ms to 10s (psi.rst)."""
    match = _PSI_RE.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise _Invalid("expected 'some|full STALL WINDOW', such as 'some 150ms 1s'")
    stall, window = parse_duration(match.group(2)), parse_duration(match.group(3))
    if not 0.5 <= window <= 10:
        raise _Invalid("the window must be from 500ms to 10s")
    if not 0 < stall <= window:
        raise _Invalid("the stall must be above 0 and at most the window")
    return PsiTrigger(match.group(1), stall, window)


def _absolute_path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise _Invalid("expected a path")
    if "\0" in value:
        raise _Invalid("a path cannot contain NUL")
    if not os.path.isabs(value):
        raise _Invalid("must be an absolute path")
    return Path(os.path.normpath(value))


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise _Invalid("expected one of " + ", ".join(options))
        return str(value)

    return convert


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected true or false")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("expected a whole number")
    return value


def _workers(value: Any) -> int:
    workers = _integer(value)
    if not 1 <= workers <= 64:
        raise _Invalid("expected 1 to 64")
    return workers


def _name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise _Invalid(
            "a name is 1 to 64 of A-Z a-z 0-9 . _ - starting with a letter or digit, not . or .."
        )
    return value


def _digest(value: Any) -> str:
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise _Invalid(
            "expected sha256:<64 hex digits>, xxh3:<32 hex digits> or blake3:<64 hex digits>"
        )
    return value


def _ids(lookup: Callable[[str], int], what: str) -> Callable[[Any], frozenset[int]]:
    def convert(value: Any) -> frozenset[int]:
        if not isinstance(value, list):
            raise _Invalid(f"expected a list of {what} names or ids")
        ids = set()
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                ids.add(item)
                continue
            if not isinstance(item, str):
                raise _Invalid(f"expected {what} names or ids, not {shown(item)}")
            try:
                ids.add(lookup(item))
            except (KeyError, ValueError):  # ValueError: a NUL in the name
                raise _Invalid(f"no such {what}: {shown(item)}") from None
        return frozenset(ids)

    return convert


_users = _ids(lambda name: pwd.getpwnam(name).pw_uid, "user")
_groups = _ids(lambda name: grp.getgrnam(name).gr_gid, "group")


def _trust(data: Any, key: str, problems: _Problems) -> Trust:
    """trust: {users: [...], groups: [...]}: besides root and each source's owner, who may own
    or write the directories on a source's path (docs/security.md)."""
    if data is None:
        return Trust()
    section = _Section(data, key, problems, ("users", "groups"))
    return Trust(
        section.get("users", _users, frozenset()), section.get("groups", _groups, frozenset())
    )


class _Section:
    """Reads one mapping of the file, converting each key and rejecting unknown ones."""

    def __init__(self, data: Any, key: str, problems: _Problems, known: tuple[str, ...]) -> None:
        self.key, self.problems = key, problems
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.add(key or "(top level)", "expected a mapping", data)
            data = {}
        self.data = data
        # Keys may be numbers, dates or null as well as strings; each is named as written.
        for unknown in sorted((k for k in data if k not in known), key=shown):
            name = unknown if isinstance(unknown, str) else shown(unknown)
            problems.add(self._path(name), "unknown key", data[unknown])

    def _path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, convert: Callable[[Any], Any], default: Any) -> Any:
        if name not in self.data:
            return default
        try:
            return convert(self.data[name])
        except _Invalid as error:
            self.problems.add(self._path(name), str(error), self.data[name])
            return default

    def require(self, name: str, convert: Callable[[Any], Any]) -> Any:
        if name not in self.data:
            self.problems.add(self._path(name), "is required", None)
            return None
        return self.get(name, convert, None)


def _source_problem(source: Path) -> str | None:
    if not source.exists():
        return "no such file or directory"
    if not (source.is_file() or source.is_dir()):
        return "not a regular file or directory"
    return None


def _parse_models(
    data: Any, problems: _Problems, check_sources: bool, trust: Trust
) -> tuple[ModelConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        problems.add("models", "expected a list", data)
        return ()
    models: list[ModelConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        key = f"models[{index}]"
        section = _Section(
            item, key, problems, ("name", "source", "priority", "digest", "validate", "trust")
        )
        name = section.require("name", _name)
        source = section.require("source", _absolute_path)
        # Every key is converted even when name or source is bad, so all problems show at once.
        priority = section.get("priority", _integer, 0)
        digest = section.get("digest", _digest, None)
        validate = section.get("validate", _choice(VALIDATE_MODES), "format")
        own_trust = _trust(section.data.get("trust"), f"{key}.trust", problems)
        problem = _source_problem(source) if check_sources and source is not None else None
        if problem:
            problems.add(f"{key}.source", problem, str(source))
        if name is not None and name in seen:
            problems.add(f"{key}.name", "duplicate name", name)
        elif name is not None:
            seen.add(name)
            if source is not None:
                models.append(
                    ModelConfig(name, source, priority, digest, validate, trust | own_trust)
                )
    return tuple(models)


def parse_config(data: Any, *, check_sources: bool = False) -> Config:
    """Turns the loaded YAML into a Config, or raises ConfigError listing every problem.
    With check_sources, sources that are missing now are problems too (check-config); the
    daemon takes them as models to serve once they appear."""
    problems = _Problems()
    top = _Section(
        data,
        "",
        problems,
        (
            "store",
            "links_dir",
            "socket",
            "checksum",
            "ready",
            "memory",
            "watch",
            "staging",
            "trust",
            "models",
        ),
    )
    store = _Section(top.data.get("store"), "store", problems, ("path", "size", "mount", "huge"))
    memory = _Section(
        top.data.get("memory"),
        "memory",
        problems,
        ("min_available", "resume_available", "psi", "cooldown"),
    )
    watch = _Section(top.data.get("watch"), "watch", problems, ("settle", "rescan"))
    staging = _Section(top.data.get("staging"), "staging", problems, ("workers",))
    defaults = Config()
    trust = _trust(top.data.get("trust"), "trust", problems)
    min_available = memory.get("min_available", parse_size, defaults.memory.min_available_bytes)
    resume_available = memory.get(
        "resume_available", parse_size, max(defaults.memory.resume_available_bytes, min_available)
    )
    if resume_available < min_available:
        problems.add(
            "memory.resume_available",
            f"must be at least memory.min_available ({min_available} bytes)",
            memory.data.get("resume_available"),
        )
    config = Config(
        store=StoreConfig(
            path=store.get("path", _absolute_path, defaults.store.path),
            size_bytes=store.get("size", parse_size, defaults.store.size_bytes),
            mount=store.get("mount", _boolean, defaults.store.mount),
            huge=store.get("huge", _choice(HUGE_MODES), defaults.store.huge),
        ),
        links_dir=top.get("links_dir", _absolute_path, defaults.links_dir),
        socket=top.get("socket", _absolute_path, defaults.socket),
        checksum=top.get("checksum", _choice(CHECKSUMS), defaults.checksum),
        ready=top.get("ready", _choice(READY_MODES), defaults.ready),
        memory=MemoryConfig(
            min_available_bytes=min_available,
            resume_available_bytes=resume_available,
            psi=memory.get("psi", parse_psi, defaults.memory.psi),
            cooldown_seconds=memory.get("cooldown", parse_duration, 0.0),
        ),
        watch=WatchConfig(
            settle_seconds=watch.get("settle", parse_duration, defaults.watch.settle_seconds),
            rescan_seconds=watch.get("rescan", parse_duration, defaults.watch.rescan_seconds),
        ),
        staging=StagingConfig(workers=staging.get("workers", _workers, defaults.staging.workers)),
        trust=trust,
        models=_parse_models(top.data.get("models"), problems, check_sources, trust),
    )
    for key, algorithm in [("checksum", config.checksum)] + [
        (f"models[{i}].digest", m.digest.partition(":")[0])
        for i, m in enumerate(config.models)
        if m.digest
    ]:
        if algorithm not in available_algorithms():
            problems.add(key, f"{algorithm} is not installed ({INSTALL[algorithm]})", algorithm)
    if config.store.size_bytes == 0:
        problems.add("store.size", "must be above 0", store.data.get("size"))
    if problems.items:
        raise ConfigError(problems.items)
    return config


def source_problems(config: Config) -> list[str]:
    """Sources that are missing now, for the daemon to log: it serves them once they appear."""
    problems = _Problems()
    for index, model in enumerate(config.models):
        problem = _source_problem(model.source)
        if problem:
            problems.add(f"models[{index}].source", problem, str(model.source))
    return problems.items


def trust_warnings(config: Config) -> list[str]:
    """Each model whose sources more users than root and their owners may change, for the log."""
    warnings = []
    for model in config.models:
        if model.trust.uids or model.trust.gids:
            users = ", ".join(user_name(uid) for uid in sorted(model.trust.uids)) or "-"
            groups = ", ".join(group_name(gid) for gid in sorted(model.trust.gids)) or "-"
            warnings.append(
                f"{model.name}: trusting users {users} and groups {groups} with the paths to "
                f"{model.source}: they can choose what ramstage copies into RAM and who reads it"
            )
    return warnings


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--config PATH, else $RAMSTAGE_CONFIG, else /etc/ramstage/ramstage.yaml."""
    return Path(explicit or os.environ.get("RAMSTAGE_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path, *, check_sources: bool = False) -> Config:
    """The config in the file, or ConfigError for whatever the file holds."""
    return parse_config(read_yaml(path), check_sources=check_sources)


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
    mark = event.start_mark
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


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
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {error}"]) from None
    except ValueError as error:
        # Values YAML parses but Python refuses to build: an integer of more than 4300 digits
        # (sys.get_int_max_str_digits), a timestamp such as 2001-02-30.
        raise ConfigError([f"{path}: a value that cannot be loaded: {error}"]) from None
