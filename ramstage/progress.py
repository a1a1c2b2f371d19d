"""Long work seen from the command line: a request (stage, verify) that runs in a thread while
the status of its models is drawn, as frames of text that cli.py prints. On a terminal each
frame redraws one line per model in place; in a pipe, a plain line per model now and then."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ramstage import view
from ramstage.errors import NoAnswer
from ramstage.protocol import request

LONG_TIMEOUT_SECONDS = 3700.0  # stage and verify: the daemon's own limit is an hour
LIVE_SECONDS = 0.5  # a progress bar's redraw
PLAIN_SECONDS = 5.0  # a progress line in a pipe

Models = list[dict[str, Any]]


class Background(threading.Thread):
    """One request, run while the main thread draws; its outcome is raised or returned there."""

    def __init__(self, socket: Path, cmd: str, **args: Any) -> None:
        super().__init__(name=f"ramstage-{cmd}", daemon=True)
        self.socket, self.cmd, self.args = socket, cmd, args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = request(self.socket, self.cmd, timeout=LONG_TIMEOUT_SECONDS, **self.args)
        except BaseException as error:  # handed to the main thread, which reports it
            self.error = error

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


def frames(
    socket: Path,
    names: list[str],
    live: bool,
    *,
    done: Callable[[Models], bool] = lambda models: False,
    over: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Text to print, until done(models) is true (it may raise to end with an error) or the
    work is over(); over() is asked before status, so the last frame shows how it ended.
    With over, a status poll left unanswered in time is skipped while the work goes on."""
    patient = over is not None
    over = over or (lambda: False)
    width = max(map(len, names), default=0)
    drawn, last_plain, states, said = 0, 0.0, [""], ""
    while True:
        ended = over()
        try:
            status = request(socket, "status")
        except NoAnswer:
            # While a request works (over given), a status the daemon is too busy to answer
            # in time is only a frame missed: the request itself still decides the outcome.
            if patient and not ended:
                continue
            raise
        models = [m for m in status["models"] if m["name"] in names]
        finished = ended or done(models)
        if live:
            up = f"\x1b[{drawn}F" if drawn else ""  # back to the first line drawn
            lines = [view.progress_line(m, width, live=True) for m in models]
            yield up + "".join(f"\x1b[2K{line}\n" for line in lines)
            drawn = len(lines)
        else:
            # A line when a state changes, every PLAIN_SECONDS meanwhile, and how it ended
            # unless that was just said: a log stays short.
            text = "".join(view.progress_line(m, width, live=False) + "\n" for m in models)
            now_states = [m["state"] for m in models]
            due = now_states != states or time.monotonic() - last_plain >= PLAIN_SECONDS
            if due or (finished and text != said):
                last_plain, states, said = time.monotonic(), now_states, text
                yield text
        if finished:
            return
        pause_until = time.monotonic() + LIVE_SECONDS
        while time.monotonic() < pause_until and not over():  # the outcome shown at once
            time.sleep(0.02)


def model_names(socket: Path, names: list[str], state: str | None = None) -> list[str]:
    """The models named, or every configured one (in `state`, if given)."""
    if names:
        return names
    models = request(socket, "status")["models"]
    return [m["name"] for m in models if state in (None, m["state"])]
