"""The copy workers (`staging.workers`) that every copy in flight shares: at most that many files
are copied at once, whichever models and shards they belong to, each on a daemon thread of its
own that ends with the file. So the threads stay bounded by the setting, never its square.

A copy that holds no worker gets the next free one before a copy that holds some takes
another: every copy in flight moves, and a long shard of one model does not starve another.
Copies may share a lane with a bound of its own: every copy from one spinning disk reads one
file at a time between them, where two streams would make the disk seek between them.
A worker blocked for good on a hung mount is given back when its copy is given up (forfeit),
so a hung source costs its copy, not the workers of every later one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import Any

# Where staging.workers is not set: one worker per core, at most this many (docs/benchmarks.md,
# "How many workers": a worker keeps a core busy at 1.4-2 GB/s, so 8 outrun two NVMe drives).
MOST_WORKERS = 8
# How often a copy waiting for a worker says it is alive (the stall watchdog must not take
# waiting for another copy's shard for a hung read).
TICK_SECONDS = 0.5


def default_workers(cores: int) -> int:
    return max(min(cores, MOST_WORKERS), 1)


class Crew:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._changed = threading.Condition()
        self._holding: dict[object, int] = {}  # a copy (its cancel event) -> workers it holds
        self._lanes: dict[object, object] = {}  # a copy holding workers -> its lane
        self._starving: dict[object, tuple[object, int | None]] = {}  # waiting, holding none

    def resize(self, workers: int) -> None:
        """A reload's new `staging.workers`: files copying now finish on the workers they have."""
        with self._changed:
            self.workers = workers
            self._changed.notify_all()

    def busy(self) -> int:
        with self._changed:
            return sum(self._holding.values())

    def run_all(
        self,
        owner: threading.Event,
        tasks: Sequence[Callable[[], Any]],
        *,
        stop: threading.Event,
        tick: Callable[[], None],
        lane: object = None,
        most: int | None = None,
    ) -> list[Future[Any]]:
        """Runs each task on a worker as one comes free, with at most `most` in `lane` (every
        copy's tasks in it together) at once; without a lane, the copy is a lane of its own. Stops
        starting them once `owner` (the copy's cancel event) or `stop` is set or one failed.
        Sets `stop` once one failed, and returns once those started have stopped."""
        futures: list[Future[Any]] = []
        for task in tasks:
            failed = any(f.done() and f.exception() for f in futures)
            if failed or not self._take(owner, stop, tick, owner if lane is None else lane, most):
                break
            future: Future[Any] = Future()
            futures.append(future)
            threading.Thread(
                target=self._work, args=(owner, task, future), name="ramstage-copy", daemon=True
            ).start()
        wait(futures, return_when=FIRST_EXCEPTION)
        stop.set()  # when one failed, the others stop at their next chunk
        wait(futures)  # so that what they used may be released after
        return futures

    def forfeit(self, owner: threading.Event) -> None:
        """The copy was given up, maybe with a thread blocked for good: its workers are free."""
        with self._changed:
            self._holding.pop(owner, None)
            self._lanes.pop(owner, None)
            self._changed.notify_all()

    def _take(
        self,
        owner: threading.Event,
        stop: threading.Event,
        tick: Callable[[], None],
        lane: object,
        most: int | None,
    ) -> bool:
        with self._changed:
            while not (owner.is_set() or stop.is_set()):
                held = self._holding.get(owner, 0)
                free = self.workers - sum(self._holding.values())
                others = sum(
                    1
                    for o, (ln, m) in self._starving.items()
                    if o is not owner and self._open(ln, m)
                )
                if free > (others if held else 0) and self._open(lane, most):
                    self._starving.pop(owner, None)
                    self._holding[owner], self._lanes[owner] = held + 1, lane
                    return True
                if not held:
                    self._starving[owner] = (lane, most)
                self._changed.wait(TICK_SECONDS)
                tick()
            self._starving.pop(owner, None)
            return False

    def _open(self, lane: object, most: int | None) -> bool:
        """Whether a copy in `lane` may take one more worker."""
        taken = sum(n for o, n in self._holding.items() if self._lanes[o] == lane)
        return most is None or taken < most

    def _work(self, owner: threading.Event, task: Callable[[], Any], future: Future[Any]) -> None:
        try:
            future.set_result(task())
        except BaseException as error:
            future.set_exception(error)
        finally:
            with self._changed:
                if owner in self._holding:  # else forfeited: its workers were given back
                    self._holding[owner] -= 1
                    if not self._holding[owner]:
                        del self._holding[owner], self._lanes[owner]
                self._changed.notify_all()
