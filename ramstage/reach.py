"""Looks at sources from outside the loop's thread, each look with a deadline.

A source on a FUSE or network mount can hang: a getattr or read its server never answers
blocks the caller in the kernel until the server answers or the connection is aborted
(fuse(4); a killable wait, so only SIGKILL ends it). The loop owns all state and must keep
answering, so every stat and listing of a source it needs runs in a helper thread, and the loop
waits for it at most `timeout_seconds`. A look still blocked holds its path: a later look at
that path or below it fails at once instead of piling up threads, until the first returns.
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
TIMEOUT_SECONDS = 0.5


class Unreachable(OSError):
    """A source that did not answer within the deadline (a hung mount, say)."""


def _under(path: str, blocked: str) -> bool:
    return path == blocked or path.startswith(blocked.rstrip("/") + "/")


class Reach:
    def __init__(self, timeout_seconds: float = TIMEOUT_SECONDS) -> None:
        self.timeout_seconds = timeout_seconds
        self._lock = threading.Lock()
        self._blocked: set[str] = set()  # paths with a look still running past its deadline

    def call(self, path: Path | str, look: Callable[[], T]) -> T:
        """look(), which touches `path`, in a helper thread; Unreachable past the deadline."""
        key = str(path)
        with self._lock:
            stuck = next((b for b in self._blocked if _under(key, b)), None)
        if stuck is not None:
            raise Unreachable(errno.ETIMEDOUT, f"{stuck} still gives no answer (a hung mount?)")
        future: Future[T] = Future()
        thread = threading.Thread(
            target=self._run, args=(key, look, future), name="ramstage-reach", daemon=True
        )
        thread.start()
        thread.join(self.timeout_seconds)
        with self._lock:
            if not future.done():
                self._blocked.add(key)
                message = f"{key} gave no answer within {self.timeout_seconds:g}s (a hung mount?)"
                raise Unreachable(errno.ETIMEDOUT, message)
        return future.result()

    def _run(self, key: str, look: Callable[[], T], future: Future[T]) -> None:
        try:
            result = look()
        except BaseException as error:
            with self._lock:
                self._blocked.discard(key)
                future.set_exception(error)
            return
        with self._lock:
            self._blocked.discard(key)
            future.set_result(result)

    def exists(self, path: Path) -> bool:
        """Whether the source is there to serve: one that cannot be reached (ENOTCONN from a
        disconnected FUSE mount, EIO, no answer) counts as absent, since a link to it would
        only move the error, or the hang, into the application."""
        return self.problem(path) is None

    def stat(self, path: Path) -> os.stat_result:
        return self.call(path, lambda: os.stat(path))

    def problem(self, path: Path) -> OSError | None:
        """None if the path can be stat'ed now, else what went wrong."""
        try:
            self.stat(path)
        except OSError as error:
            return error
        return None
