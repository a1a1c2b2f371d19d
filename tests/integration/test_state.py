"""What `status` says while copies run: a model whose link serves RAM is `staged`, whatever
else is being copied, and can be waited for and evicted at once (docs/design.md, `state`)."""

from __future__ import annotations

import os
import time

import pytest
from conftest import wait_for, write_random

from ramstage import client

G = 1 << 30


@pytest.mark.root
@pytest.mark.torch
def test_a_model_in_ram_stays_staged_and_evictable_while_another_copies_1gib(tmp_path, make_daemon):
    import torch

    # a: a 1 GiB torch checkpoint, checked with torch after its copy (validate: torch), so its
    # staging lasts the copy and a torch.load in a subprocess: long enough for every step below
    # even on a loaded machine, and every step checks that it still runs.
    a = tmp_path / "src" / "a.pt"
    a.parent.mkdir()
    torch.save({"weight": torch.zeros(G // 4)}, a)
    b = write_random(tmp_path / "src" / "b.ckpt", 4 << 20, seed=2)
    daemon = make_daemon(
        [
            {"name": "a", "source": str(a), "validate": "torch"},
            {"name": "b", "source": str(b), "priority": 10},  # staged first
        ],
        mount=True,
        store={"size": "3G"},
        watch={"settle": "100ms"},
    )
    daemon.start()
    wait_for(lambda: daemon.model("a")["state"] == "staging", context=daemon.log)
    # Both copy at once (staging.workers): b's 4 MiB may still be in flight when a's starts.
    wait_for(lambda: daemon.model("b")["state"] == "staged", context=daemon.log)
    assert daemon.model("a")["state"] == "staging"
    first = daemon.model("b")["generation"]

    # A new version of b while a copies: its copy has to wait for a's, and meanwhile b's link
    # still serves the verified previous version, which is what its state says.
    write_random(b, 4 << 20, seed=3)
    seen: list[tuple[str, str, str | None, float]] = []

    def taken_up() -> bool:
        status = {m["name"]: m for m in daemon.request("status")["models"]}
        b_model = status["b"]
        seen.append(
            (status["a"]["state"], b_model["state"], b_model["reason"], b_model["progress"])
        )
        return status["b"]["state"] != "staged" or status["b"]["reason"] == "source_changed"

    wait_for(taken_up, interval=0.01, context=daemon.log)
    assert seen[-1][0] == "staging", "a's copy ended before b's update was seen"
    assert {b_state for _, b_state, _, _ in seen} == {"staged"}
    assert seen[-1][2:] == ("source_changed", 0.0)  # b's own copy waits for a's

    started = time.monotonic()
    entry = client.wait_staged("b", timeout=30, config=daemon.config_path)
    assert time.monotonic() - started < 1.0
    assert (entry["state"], entry["generation"]) == ("staged", first)
    assert daemon.model("a")["state"] == "staging"

    result = daemon.cli("evict", "b")
    assert result.returncode == 0, result.stderr
    assert daemon.model("a")["state"] == "staging", "a's copy ended before the evict was done"
    b_status = daemon.model("b")
    assert (b_status["state"], b_status["reason"]) == ("fallback", "evicted")
    assert os.readlink(daemon.links / "b") == str(b)
    assert not list((daemon.store / "b").glob("[!.]*"))  # its RAM copy is gone

    daemon.wait_state("a", "staged", timeout=120)
    assert daemon.model("b")["state"] == "fallback"  # evicted by hand: stays on its source
