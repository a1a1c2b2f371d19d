"""The words the daemon's core speaks: a model's record, what its link serves, why it is not in
RAM, the copy job, the events the loop is sent and the actions the loop carries out.

A leaf: it imports nothing of ramstage, so every other module may use it. The loop is the only
writer of a record; lifecycle.py decides what to write, as actions.
"""

from __future__ import annotations

import enum
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

Identities = tuple[tuple[str, tuple[int, ...]], ...]  # (relpath, (dev, ino, size, mtime, ctime))


class Settings(Protocol):
    """What the core reads of a model's configuration (config.ModelConfig has it)."""

    @property
    def name(self) -> str: ...
    def resolve(self, *, read_refs: bool = True) -> Path: ...  # a hub repo: reads refs/
    @property
    def refs(self) -> Path | None: ...  # a hub repo's refs/, that resolve() reads
    @property
    def priority(self) -> int: ...
    @property
    def digest(self) -> str | None: ...
    @property
    def validate(self) -> str: ...
    @property
    def trust(self) -> Any: ...  # access.Trust: the leaf names no type of ramstage


class Serving(enum.Enum):
    """What the link serves: the one fact `status` derives the contract's state from."""

    RAM = "ram"  # a verified generation
    SOURCE = "source"
    NOTHING = "nothing"  # no link: no source and no copy


class Phase(enum.Enum):
    """The contract's `state`, derived by phase(); never stored."""

    PENDING = "pending"
    STAGING = "staging"
    STAGED = "staged"
    FALLBACK = "fallback"
    MISSING = "missing"


class Reason(enum.Enum):
    """Why a model is not in RAM, or why its copy in RAM is not the newest source version."""

    PRESSURE = "pressure"
    TOO_LARGE = "too_large"
    STORE_FULL = "store_full"  # it would fit but for files of others in the store
    EVICTED = "evicted"
    SOURCE_CHANGED = "source_changed"
    SOURCE_MISSING = "source_missing"
    UNTRUSTED = "untrusted"  # the trust rule refused the source (access.py)
    ERROR = "error"


@dataclass(frozen=True)
class Why:
    """A reason and, for `error`, what went wrong; str() is the contract's `reason` text."""

    reason: Reason
    detail: str = ""
    # What the decision was made on (need_bytes, store_free_bytes, …): shown in status, and
    # not part of the reason, so the same refusal with other figures is the same reason.
    figures: tuple[tuple[str, int], ...] = field(default=(), compare=False)
    # A fault that may clear on its own (EIO, a hung read): tried again after a backoff.
    retry: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


@dataclass(frozen=True)
class Backoff:
    count: int  # evictions (or refusals) for pressure, or failed copies, in a row
    at: float  # monotonic seconds of the last one
    delay_seconds: float

    @property
    def not_before(self) -> float:
        return self.at + self.delay_seconds


@dataclass
class Work:
    """Bytes done of a long piece of work (a copy, a verify), for status to show the rate."""

    started_at: float  # monotonic
    done_bytes: int = 0
    total_bytes: int = 0
    moved_at: float = 0.0  # monotonic: the last bytes done (a copy's stall watchdog)
    files_done: int = 0  # a copy's files copied, of files_total (a verify's stay 0)
    files_total: int = 0


@dataclass
class Job:
    """One copy in flight. The worker writes only `partial` and `progress`; the loop publishes."""

    partial: Path
    identities: Identities  # the source version being copied
    need_bytes: int = 0  # of the store and of MemAvailable, as admitted
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: float = 0.0
    work: Work = field(default_factory=lambda: Work(0.0))
    future: Future[Any] | None = None


@dataclass
class Tally:
    """What a model went through since the daemon started, for status and metrics."""

    copies: int = 0  # copies published
    last_copy_seconds: float | None = None
    last_copy_bytes: int | None = None
    evictions: dict[str, int] = field(default_factory=dict)  # RAM given up, by reason
    verify_failures: int = 0
    wanted_since: float | None = None  # monotonic: since a version not yet in RAM was wanted


@dataclass
class Model:
    settings: Settings
    link: Path
    # What is staged and what the link serves in fallback: settings.resolve() as the loop last
    # resolved it, with a deadline (updates.SourceUpdates.locate), never on attribute access.
    source: Path
    serving: Serving = Serving.SOURCE
    generation: str | None = None  # the id of the generation served, when serving RAM
    job: Job | None = None  # the copy in flight, whatever the link serves meanwhile
    want: bool = True  # a copy is wanted: the loop starts one when admission allows
    why: Why | None = None
    held: bool = False  # evicted by the operator: stays on its source until `stage`
    changed_at: float | None = None  # last source event not yet looked at (settle timer)
    seen: Identities | None = None  # the source version last taken up
    backoff: Backoff | None = None  # after evictions for pressure (backoff timer)
    retry: Backoff | None = None  # after copies failed for a fault that may clear (Why.retry)
    waiters: list[Future[str | None]] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    actions: int = 0  # applied to this record so far: what was looked at before may be stale

    @property
    def name(self) -> str:
        return self.settings.name


def phase(model: Model) -> Phase:
    """The contract's state: what the link serves comes first, so a model in RAM reports
    `staged` while a newer version is copied or waits its turn."""
    if model.serving is Serving.RAM:
        return Phase.STAGED
    if model.job:
        return Phase.STAGING
    if model.serving is Serving.NOTHING:
        return Phase.MISSING
    return Phase.PENDING if model.want and not model.held else Phase.FALLBACK


# ---- events: what the loop is sent --------------------------------------------------------


@dataclass(frozen=True)
class Stop:
    signum: int


@dataclass(frozen=True)
class Reload:
    future: Future[Any] | None = None


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]
    future: Future[Any]


@dataclass(frozen=True)
class JobDone:
    name: str
    job: Job


@dataclass(frozen=True)
class VerifyFailed:
    name: str
    generation_id: str


@dataclass(frozen=True)
class SourceEvent:
    name: str


@dataclass(frozen=True)
class Rescan:
    reason: str


@dataclass(frozen=True)
class Pressure:
    kind: str  # "psi" (system-wide trigger), "systemd" ($MEMORY_PRESSURE_WATCH), "floor"
    available_bytes: int


@dataclass(frozen=True)
class Sync:
    """Answered once the loop has published a snapshot of everything sent before it: a request
    that changed something waits for it, so that a status asked next shows the change."""

    future: Future[None]


Event = Union[Stop, Reload, Request, JobDone, VerifyFailed, SourceEvent, Rescan, Pressure, Sync]


# ---- actions: what the loop carries out on one model, in order ----------------------------


@dataclass(frozen=True)
class Serve:
    """Point the link (atomically) at a generation, the source, or remove it. A generation the
    link leaves for a newer one gets a grace period; one left for the source goes at once."""

    serving: Serving
    generation: str | None = None


@dataclass(frozen=True)
class StartCopy:
    identities: Identities
    need_bytes: int = 0


@dataclass(frozen=True)
class DropCopy:
    """The copy in flight is no longer the model's: it is called off if still running, and its
    partial is deleted when it reports back."""


@dataclass(frozen=True)
class Note:
    why: Why | None


@dataclass(frozen=True)
class Want:
    want: bool


@dataclass(frozen=True)
class Hold:
    held: bool


@dataclass(frozen=True)
class Remember:
    seen: Identities | None


@dataclass(frozen=True)
class Mark:
    changed_at: float | None


@dataclass(frozen=True)
class BackOff:
    backoff: Backoff


@dataclass(frozen=True)
class RetryLater:
    """A copy failed for a fault that may clear: tried again once `retry` has run out (None:
    it was copied, nothing to try again)."""

    retry: Backoff | None


@dataclass(frozen=True)
class Locate:
    """The source resolved anew: a hub repo's revision moved to another snapshot."""

    source: Path


@dataclass(frozen=True)
class Answer:
    """Answer everyone waiting for the model to be staged: None, or why it is not."""

    outcome: str | None


@dataclass(frozen=True)
class Await:
    """Someone asked for the model to be staged: answer them when that is decided."""

    waiter: Future[str | None]


@dataclass(frozen=True)
class Configure:
    """A reload gave the model new settings."""

    settings: Settings


@dataclass(frozen=True)
class Log:
    level: int
    message: str


Action = Union[
    Serve,
    StartCopy,
    DropCopy,
    Note,
    Want,
    Hold,
    Remember,
    Mark,
    BackOff,
    RetryLater,
    Locate,
    Answer,
    Await,
    Configure,
    Log,
]
