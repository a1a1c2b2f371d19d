"""The pool of a file copy's second stream: daemon threads that nothing joins at exit."""

from __future__ import annotations

import threading

import pytest

from ramstage.threads import DaemonPool


def test_a_thread_that_cannot_start_fails_the_submit_and_the_pool_still_closes(monkeypatch):
    """No threads left (RuntimeError: can't start new thread): the copy fails with that error
    instead of waiting for ever, on leaving the pool, for work that no thread will run."""
    start, outcome = threading.Thread.start, []

    def body() -> None:
        try:
            with DaemonPool(1, "ramstage-test") as pool:
                pool.submit(int, 1)
        except RuntimeError as error:
            outcome.append(error)

    def refuse(thread: threading.Thread) -> None:
        if thread.name == "ramstage-test":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    runner = threading.Thread(target=body, daemon=True)
    start(runner)
    runner.join(5)
    assert not runner.is_alive(), "leaving the pool waited for work no thread runs"
    assert [str(e) for e in outcome] == ["can't start new thread"]


def test_work_submitted_is_done_before_the_pool_is_left():
    done = []
    with DaemonPool(2, "ramstage-test") as pool:
        futures = [pool.submit(done.append, n) for n in range(5)]
    assert sorted(done) == list(range(5)) and all(f.done() for f in futures)


def test_an_error_in_the_work_is_the_futures():
    with DaemonPool(1, "ramstage-test") as pool:
        future = pool.submit(int, "not a number")
    with pytest.raises(ValueError):
        future.result()
