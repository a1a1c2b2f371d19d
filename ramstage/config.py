"""The configuration file: schema, converters and errors that name the key path."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from ramstage import converters as convert
from ramstage.access import Trust, group_name, user_name
from ramstage.digest import BLAKE3_INSTALL, DEFAULT_ALGORITHM, available_algorithms
from ramstage.errors import ConfigError
from ramstage.hub import HubRepo, default_cache
from ramstage.system import System
from ramstage.yamlfile import read_yaml

DEFAULT_CONFIG = Path("/etc/ramstage/ramstage.yaml")
_PSI_RE = re.compile(r"^(some|full)\s+(\S+)\s+(\S+)$")
CHECKSUMS = ("xxh3", "sha256", "blake3")
HUGE_MODES = ("within_size", "never", "always", "advise")  # tmpfs huge= (tmpfs.rst)
READY_MODES = ("links", "staged")
VALIDATE_MODES = ("format", "torch", "none")


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path("/run/ramstage/store")
    size_bytes: int = 8 << 30
    mount: bool = True
    huge: str = "within_size"
    rings_bytes: int = 1 << 30  # the fast loader's ring files, a tmpfs beside the store (rings.py)

    @property
    def rings_path(self) -> Path:
        return self.path.parent / "rings"


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
    config: bool = False  # reload when the config file changes (watcher.ConfigWatcher)


@dataclass(frozen=True)
class StagingConfig:
    # The copy workers every copy in flight shares: files copied at once, and models copied
    # at once. None: one per core, at most crew.MOST_WORKERS, and one file at a time from a
    # spinning disk (docs/design.md, "Parallel copies").
    workers: int | None = None


@dataclass(frozen=True)
class MetricsConfig:
    textfile: Path | None = None  # for node_exporter's textfile collector
    listen: tuple[str, int] | None = None  # (host, port) of the HTTP endpoint
    interval_seconds: float = 15.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    origin: Path | HubRepo  # `source:`, or `hf:` with its revision and cache
    priority: int = 0
    digest: str | None = None  # "sha256:<hex>", "xxh3:<hex>" or "blake3:<hex>"
    validate: str = "format"
    trust: Trust = field(
        default_factory=Trust
    )  # the top-level trust: and the model's own, together

    def resolve(self, *, read_refs: bool = True) -> Path:
        """What is staged, and what the link points at in fallback: `source:`, or the hub
        snapshot that the revision names now, read from its refs/ file (which may hang: the
        daemon reads it only through reach, updates.SourceUpdates.locate). Without read_refs,
        the snapshot the revision names by itself (only a commit hash names one)."""
        if isinstance(self.origin, HubRepo):
            return self.origin.snapshot(self.trust if read_refs else None)
        return self.origin

    @property
    def refs(self) -> Path | None:
        """A hub repo's refs/ directory: read to resolve the source, watched for a moved
        revision. None for `source:`, which resolves to itself."""
        return self.origin.refs if isinstance(self.origin, HubRepo) else None

    def problem(self) -> str | None:
        """Why there is nothing to stage now, if so."""
        return _problem(self.origin, self.trust)


@dataclass(frozen=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    links_dir: Path = Path("/run/ramstage/models")
    socket: Path = Path("/run/ramstage/control.sock")
    checksum: str = DEFAULT_ALGORITHM
    ready: str = "links"
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    staging: StagingConfig = field(default_factory=StagingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    trust: Trust = field(default_factory=Trust)
    models: tuple[ModelConfig, ...] = ()

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def parse_psi(text: Any) -> PsiTrigger:
    """`some 150ms 1s`: the kernel takes windows from 500ms to 10s (psi.rst)."""
    match = _PSI_RE.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise convert.Invalid("expected 'some|full STALL WINDOW', such as 'some 150ms 1s'")
    stall, window = convert.parse_duration(match.group(2)), convert.parse_duration(match.group(3))
    if not 0.5 <= window <= 10:
        raise convert.Invalid("the window must be from 500ms to 10s")
    if not 0 < stall <= window:
        raise convert.Invalid("the stall must be above 0 and at most the window")
    return PsiTrigger(match.group(1), stall, window)


def _problem(origin: Path | HubRepo, trust: Trust) -> str | None:
    if isinstance(origin, HubRepo):
        return origin.problem(trust)
    return _source_problem(origin)


def _source_problem(source: Path) -> str | None:
    if not os.path.exists(source):  # nor reachable: os.path's checks take any OSError as no
        return "no such file or directory"
    if not (os.path.isfile(source) or os.path.isdir(source)):
        return "not a regular file or directory"
    return None


_ORIGIN_KEYS = ("source", "hf", "revision", "hf_cache")
MODEL_KEYS = ("name", *_ORIGIN_KEYS, "priority", "digest", "validate", "trust")


def _parse_models(
    data: Any, problems: convert.Problems, check_sources: bool, trust: Trust, cache: Path
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
        section = convert.Section(item, key, problems, MODEL_KEYS)
        name = section.require("name", convert.name)
        origin = convert.origin(section, cache)
        # Every key is converted even when name or source is bad, so all problems show at once.
        priority = section.get("priority", convert.integer, 0)
        digest = section.get("digest", convert.digest, None)
        validate = section.get("validate", convert.choice(VALIDATE_MODES), "format")
        own_trust = convert.trust(section.data.get("trust"), f"{key}.trust", problems)
        problem = _problem(origin, trust | own_trust) if check_sources and origin else None
        if problem and origin:
            problems.add(f"{key}.{_origin_key(origin)}", problem, str(origin))
        if name is not None and name in seen:
            problems.add(f"{key}.name", "duplicate name", name)
        elif name is not None and origin is not None:
            seen.add(name)
            models.append(ModelConfig(name, origin, priority, digest, validate, trust | own_trust))
    return tuple(models)


def _origin_key(origin: Path | HubRepo) -> str:
    return "hf" if isinstance(origin, HubRepo) else "source"


_SETTINGS_KEYS = ("store", "links_dir", "socket", "checksum", "ready", "memory", "watch")
TOP_KEYS = (*_SETTINGS_KEYS, "staging", "metrics", "trust", "hf_cache", "models")


def parse_config(data: Any, *, check_sources: bool = False, system: System | None = None) -> Config:
    """Turns the loaded YAML into a Config, or raises ConfigError listing every problem.
    With check_sources, sources that are missing now are problems too (check-config); the
    daemon takes them as models to serve once they appear. Percentages of RAM are of the
    MemTotal that `system` reads."""
    problems = convert.Problems()
    top = convert.Section(data, "", problems, TOP_KEYS)
    system = system or System()
    total = system.meminfo_bytes("MemTotal")
    size = partial(convert.parse_size, total_bytes=total)
    section = partial(_section, top, problems)
    store = section("store", ("path", "size", "mount", "huge", "rings"))
    watch = section("watch", ("settle", "rescan", "config"))
    defaults = Config()
    trust = convert.trust(top.data.get("trust"), "trust", problems)
    hf_cache = top.get("hf_cache", convert.hub_cache, None)
    config = Config(
        store=StoreConfig(
            path=store.get("path", convert.absolute_path, defaults.store.path),
            size_bytes=store.get("size", size, defaults.store.size_bytes),
            mount=store.get("mount", convert.boolean, defaults.store.mount),
            huge=store.get("huge", convert.choice(HUGE_MODES), defaults.store.huge),
            rings_bytes=store.get("rings", size, defaults.store.rings_bytes),
        ),
        links_dir=top.get("links_dir", convert.absolute_path, defaults.links_dir),
        socket=top.get("socket", convert.absolute_path, defaults.socket),
        checksum=top.get("checksum", convert.choice(CHECKSUMS), defaults.checksum),
        ready=top.get("ready", convert.choice(READY_MODES), defaults.ready),
        memory=_memory(section("memory", MEMORY_KEYS), problems, size),
        watch=WatchConfig(
            settle_seconds=watch.get("settle", convert.parse_duration, WatchConfig.settle_seconds),
            rescan_seconds=watch.get("rescan", convert.parse_duration, WatchConfig.rescan_seconds),
            config=watch.get("config", convert.boolean, WatchConfig.config),
        ),
        staging=StagingConfig(
            workers=section("staging", ("workers",)).get(
                "workers", convert.workers, StagingConfig.workers
            )
        ),
        metrics=_metrics(section("metrics", ("textfile", "listen", "interval"))),
        trust=trust,
        models=_parse_models(
            top.data.get("models"),
            problems,
            check_sources,
            trust,
            hf_cache or default_cache(system.environ),
        ),
    )
    _check_algorithms(config, problems)
    if config.store.size_bytes == 0:
        problems.add("store.size", "must be above 0", store.data.get("size"))
    if problems.items:
        raise ConfigError(problems.items)
    return config


MEMORY_KEYS = ("min_available", "resume_available", "psi", "cooldown")


def _section(
    top: convert.Section, problems: convert.Problems, key: str, known: tuple[str, ...]
) -> convert.Section:
    return convert.Section(top.data.get(key), key, problems, known)


def _memory(
    memory: convert.Section, problems: convert.Problems, size: Callable[[Any], int]
) -> MemoryConfig:
    defaults = MemoryConfig()
    min_available = memory.get("min_available", size, defaults.min_available_bytes)
    resume_available = memory.get(
        "resume_available", size, max(defaults.resume_available_bytes, min_available)
    )
    if resume_available < min_available:
        problems.add(
            "memory.resume_available",
            f"must be at least memory.min_available ({min_available} bytes)",
            memory.data.get("resume_available"),
        )
    return MemoryConfig(
        min_available_bytes=min_available,
        resume_available_bytes=resume_available,
        psi=memory.get("psi", parse_psi, defaults.psi),
        cooldown_seconds=memory.get("cooldown", convert.parse_duration, 0.0),
    )


def _metrics(metrics: convert.Section) -> MetricsConfig:
    return MetricsConfig(
        textfile=metrics.get("textfile", convert.textfile, None),
        listen=metrics.get("listen", convert.listen_address, None),
        interval_seconds=metrics.get("interval", convert.interval, MetricsConfig.interval_seconds),
    )


def _check_algorithms(config: Config, problems: convert.Problems) -> None:
    """The checksum, and the algorithm of each model's digest, must be installed."""
    for key, algorithm in [("checksum", config.checksum)] + [
        (f"models[{i}].digest", m.digest.partition(":")[0])
        for i, m in enumerate(config.models)
        if m.digest
    ]:
        if algorithm not in available_algorithms():
            problems.add(key, f"{algorithm} is not installed ({BLAKE3_INSTALL})", algorithm)


def source_problems(config: Config) -> list[str]:
    """Sources that are missing now, for the daemon to log: it serves them once they appear."""
    problems = convert.Problems()
    for index, model in enumerate(config.models):
        problem = model.problem()
        if problem:
            problems.add(f"models[{index}].{_origin_key(model.origin)}", problem, str(model.origin))
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
                f"{model.origin}: they can choose what ramstage copies into RAM and who reads it"
            )
    return warnings


def config_path(
    explicit: str | os.PathLike[str] | None = None, system: System | None = None
) -> Path:
    """--config PATH, else $RAMSTAGE_CONFIG, else /etc/ramstage/ramstage.yaml."""
    environ = (system or System()).environ
    return Path(explicit or environ.get("RAMSTAGE_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path, *, check_sources: bool = False, system: System | None = None) -> Config:
    """The config in the file, or ConfigError for whatever the file holds."""
    return parse_config(read_yaml(path), check_sources=check_sources, system=system)
