"""A pool of worker threads that nothing joins: a file copy's second stream (the file workers
themselves are the crew's, crew.py, daemon threads too).

concurrent.futures.ThreadPoolExecutor joins its threads when the interpreter exits
(threading._register_atexit), so one blocked for good on a hung mount (a FUSE read its server
never answers: a killable wait, fuse(4)) would keep a stopped daemon from exiting. These are
daemon threads instead, as the copy jobs themselves are: the process exits without them, and
exit_group(2) ends them with it.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, wait
from types import TracebackType
from typing import Any, Callable, TypeVar

T = TypeVar("T")
_Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class DaemonPool:
    """submit() and a `with` block as ThreadPoolExecutor has them: leaving the block waits for
    the work submitted, so what it used may be released after it, and then for the threads,
    which have nothing left to do by then."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers, self.name = workers, name
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._futures: list[Future[Any]] = []
        self._threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if len(self._threads) < self.workers:
            # Started before the work is queued: a thread that cannot start (no threads left)
            # fails this call, instead of leaving work no thread runs for the exit to wait on.
            thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            thread.start()
            self._threads.append(thread)
        future: Future[T] = Future()
        self._futures.append(future)
        self._tasks.put((future, fn, args))
        return future

    def __enter__(self) -> DaemonPool:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for _ in self._threads:
            self._tasks.put(None)  # each thread ends once the work before it is done
        wait(self._futures)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as error:
                future.set_exception(error)
            else:
                future.set_result(result)
