"""What the daemon's loop owns: the models with their jobs, and the events it is sent."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ramstage.config import ModelConfig
from ramstage.manifest import Identity
from ramstage.pressure import Pressure
from ramstage.store import Generation
from ramstage.users import FileKey


@dataclass
class Job:
    partial: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    identities: tuple[tuple[str, Identity], ...] = ()  # the source version being copied
    progress: float = 0.0
    future: Future[Generation] | None = None


@dataclass
class Model:
    config: ModelConfig
    link: Path
    state: str = "pending"
    reason: str | None = None
    generation: Generation | None = None
    job: Job | None = None
    held: bool = False  # evicted by the operator: stays on its source until `stage`
    changed_at: float | None = None  # last source event not yet looked at
    seen: tuple[tuple[str, Identity], ...] | None = None  # the source version last taken up
    waiters: list[Future[str | None]] = field(default_factory=list)
    retired: dict[FileKey, int] = field(default_factory=dict)  # unlinked files, by size
    outgoing: list[tuple[float, Generation]] = field(default_factory=list)  # (delete at, gen)

    def settle(self, outcome: str | None) -> None:
        """Answers everyone waiting for this model to be staged: None, or why it is not."""
        for waiter in self.waiters:
            waiter.set_result(outcome)
        self.waiters.clear()


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


Event = Union[Stop, Reload, Request, JobDone, VerifyFailed, SourceEvent, Rescan, Pressure]
