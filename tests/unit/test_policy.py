from __future__ import annotations

import math

import pytest

from ramstage import policy
from ramstage.policy import Backoff, Candidate, Resident

G = 1 << 30


@pytest.mark.parametrize(
    ("need", "store_free", "others", "available", "floor", "expected"),
    [
        (1 * G, 4 * G, 0, 10 * G, 2 * G, None),
        (8 * G, 4 * G, 0, 20 * G, 2 * G, "too_large"),  # never fits the store
        (8 * G, 4 * G, 3 * G, 20 * G, 2 * G, "too_large"),  # not even once others' files go
        (8 * G, 4 * G, 4 * G, 20 * G, 2 * G, "store_full"),  # fits once others' files go
        (1 * G, 0, 1 * G, 20 * G, 2 * G, "store_full"),
        (3 * G, 4 * G, 0, 4 * G, 2 * G, "pressure"),  # 4 - 3 = 1 GiB would be under the floor
        (2 * G, 4 * G, 0, 4 * G, 2 * G, None),  # exactly at the floor is allowed
        (2 * G + 1, 4 * G, 0, 4 * G, 2 * G, "pressure"),
        (5 * G, 4 * G, 0, 1 * G, 2 * G, "too_large"),  # the store is checked first
        (0, 0, 0, 1 * G, 2 * G, "pressure"),  # already under the floor: not even an empty copy
    ],
)
def test_admit_budget(need, store_free, others, available, floor, expected):
    assert policy.admit(need, store_free, others, available, floor) == expected


@pytest.mark.parametrize(
    ("residents", "expected"),
    [
        ([], []),
        (  # priority first, whatever the use and size
            [Resident("a", 10, 1.0, 1), Resident("b", 0, 100.0, 1), Resident("c", 5, 0.0, 9)],
            ["b", "c", "a"],
        ),
        (  # equal priority: least recently used first
            [Resident("a", 0, 30.0, 1), Resident("b", 0, 10.0, 1), Resident("c", 0, 20.0, 1)],
            ["b", "c", "a"],
        ),
        (  # held right now counts as the most recent use
            [Resident("held", 0, math.inf, 9 * G), Resident("idle", 0, 50.0, 1)],
            ["idle", "held"],
        ),
        (  # equal priority and use: largest first
            [
                Resident("s", 0, 5.0, 1 * G),
                Resident("l", 0, 5.0, 3 * G),
                Resident("m", 0, 5.0, 2 * G),
            ],
            ["l", "m", "s"],
        ),
        (  # all equal: name order, so the plan is stable
            [Resident("y", 0, 5.0, 1), Resident("x", 0, 5.0, 1)],
            ["x", "y"],
        ),
        (
            [
                Resident("hi-old", 9, 1.0, 1),
                Resident("lo-new", -1, 99.0, 1),
                Resident("lo-old", -1, 2.0, 5),
            ],
            ["lo-old", "lo-new", "hi-old"],
        ),
    ],
)
def test_eviction_order(residents, expected):
    assert policy.eviction_order(residents) == expected


@pytest.mark.parametrize(
    ("available", "floor", "trigger", "evicted", "expected"),
    [
        (1 * G, 2 * G, "floor", 0, True),
        (1 * G, 2 * G, "floor", 3, True),  # still under: go on
        (3 * G, 2 * G, "floor", 0, False),  # the reading was stale: nothing to do
        (2 * G, 2 * G, "floor", 0, False),  # at the floor is not under it
        (3 * G, 2 * G, "psi", 0, True),  # a PSI stall above the floor costs one model
        (3 * G, 2 * G, "psi", 1, False),  # ...and only one
        (1 * G, 2 * G, "psi", 1, True),  # under the floor: go on whatever the trigger
        (3 * G, 2 * G, "systemd", 0, True),
        (3 * G, 2 * G, "systemd", 1, False),
    ],
)
def test_keep_evicting(available, floor, trigger, evicted, expected):
    assert policy.keep_evicting(available, floor, trigger, evicted) is expected


@pytest.mark.parametrize(
    ("available", "since", "pressure", "may_resume"),
    [
        (10 * G, None, False, True),  # never any pressure
        (1 * G, None, True, False),  # under the floor (2 GiB)
        (3 * G, None, False, False),  # between floor and resume (4 GiB): hold, don't flap
        (3 * G, 100.0, False, False),
        (4 * G, 100.0, False, True),  # at resume, quiet long enough
        (10 * G, 1.0, True, False),  # plenty, but pressure 1 s ago (cooldown 2 s)
        (10 * G, 2.0, False, True),  # the cooldown has just passed
        (1 * G, 100.0, True, False),
    ],
)
def test_hysteresis(available, since, pressure, may_resume):
    floor, resume, cooldown = 2 * G, 4 * G, 2.0
    assert policy.under_pressure(available, floor, since, cooldown) is pressure
    assert policy.may_resume(available, resume, since, cooldown) is may_resume


@pytest.mark.parametrize(
    ("previous", "now", "expected"),
    [
        (None, 100.0, Backoff(1, 100.0, 2.0)),
        (Backoff(1, 100.0, 2.0), 105.0, Backoff(2, 105.0, 4.0)),  # again soon: double
        (Backoff(2, 105.0, 4.0), 112.0, Backoff(3, 112.0, 8.0)),
        (Backoff(9, 0.0, 512.0), 600.0, Backoff(10, 600.0, 600.0)),  # capped
        (Backoff(10, 0.0, 600.0), 2400.0, Backoff(11, 2400.0, 600.0)),  # within 4 delays
        (Backoff(10, 0.0, 600.0), 2401.0, Backoff(1, 2401.0, 2.0)),  # quiet 4 delays: over
        (Backoff(3, 0.0, 8.0), 60.0, Backoff(4, 60.0, 16.0)),  # within the 60 s minimum
        (Backoff(3, 0.0, 8.0), 60.5, Backoff(1, 60.5, 2.0)),  # quiet for a minute: over
    ],
)
def test_backoff(previous, now, expected):
    backoff = policy.next_backoff(previous, now, base_seconds=2.0)
    assert backoff == expected
    assert backoff.not_before == expected.at + expected.delay_seconds


def test_backoff_doubles_with_every_eviction_in_a_row():
    backoff = None
    delays = []
    for now in range(0, 50, 5):
        backoff = policy.next_backoff(backoff, float(now), base_seconds=1.0)
        delays.append(backoff.delay_seconds)
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize(
    ("waiting", "expected"),
    [
        ([], None),
        ([Candidate("a", 0), Candidate("b", 5)], "b"),
        ([Candidate("b", 1), Candidate("a", 1)], "a"),
    ],
)
def test_next_to_stage(waiting, expected):
    assert policy.next_to_stage(waiting) == expected


def test_reload_plan():
    old = {"kept": ("/a", None), "gone": ("/b", None), "moved": ("/c", None)}
    new = {"kept": ("/a", None), "moved": ("/d", None), "added": ("/e", None)}
    plan = policy.reload_plan(old, new)
    assert plan == policy.ReloadPlan(
        removed=("gone",), added=("added",), replaced=("moved",), kept=("kept",)
    )
