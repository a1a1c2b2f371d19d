"""The trust rule and the permission arithmetic of access.py, table-driven. The uids and gids
here have no passwd or group entries, so their group memberships are unknown: every mix is
considered, as for a user nobody has heard of."""

from __future__ import annotations

import pytest

from ramstage.access import Owner, Trust, Untrusted, check_symlink, check_writers, gate, through

ALICE, BOB, TEAM = 61001, 61002, 61500
ROOT_DIR = Owner(0, 0, 0o755)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ([ROOT_DIR, ROOT_DIR], Owner(0, 0, 0o111)),  # anyone may pass
        ([ROOT_DIR, Owner(0, 0, 0o700)], Owner(0, 0, 0)),  # root alone
        ([ROOT_DIR, Owner(ALICE, ALICE, 0o700)], Owner(ALICE, ALICE, 0o100)),  # a private home
        ([ROOT_DIR, Owner(ALICE, ALICE, 0o711)], Owner(0, 0, 0o111)),  # searchable by all
        ([ROOT_DIR, Owner(0, TEAM, 0o750), ROOT_DIR], Owner(0, TEAM, 0o110)),  # a team's tree
        ([Owner(0, 0, 0o1777), Owner(ALICE, ALICE, 0o750)], Owner(ALICE, ALICE, 0o110)),
        # Two private directories of two owners: nobody but root passes both.
        ([Owner(ALICE, ALICE, 0o700), Owner(BOB, BOB, 0o700)], Owner(0, 0, 0)),
    ],
)
def test_the_gate_lets_through_exactly_who_passes_every_directory(path, expected):
    assert gate(path) == expected


def test_a_gate_that_no_owner_can_stand_for_is_refused():
    # Alice passes only if she is in TEAM, which is not known: no one gate says that.
    with pytest.raises(Untrusted, match="cannot let through exactly"):
        gate([Owner(0, TEAM, 0o750), Owner(ALICE, ALICE, 0o700)])


@pytest.mark.parametrize(
    ("owner", "path", "expected"),
    [
        (Owner(ALICE, ALICE, 0o644), [], 0o444),
        (Owner(ALICE, ALICE, 0o6755), [], 0o555),  # no setuid, setgid or write bits
        (Owner(ALICE, ALICE, 0o644), [ROOT_DIR], 0o444),
        (Owner(ALICE, ALICE, 0o644), [Owner(ALICE, ALICE, 0o700)], 0o400),
        (Owner(0, TEAM, 0o644), [Owner(0, TEAM, 0o750)], 0o440),
        (Owner(ALICE, ALICE, 0o644), [Owner(BOB, BOB, 0o700)], 0o000),
    ],
)
def test_through_keeps_a_bit_only_for_a_class_that_passes_every_directory(owner, path, expected):
    assert through(owner, path).mode == expected


@pytest.mark.parametrize(
    ("directory", "source_owner", "entry_uid", "trust", "problem"),
    [
        (ROOT_DIR, ALICE, None, Trust(), None),
        (Owner(ALICE, ALICE, 0o755), ALICE, None, Trust(), None),
        (Owner(BOB, BOB, 0o755), ALICE, None, Trust(), "owned by uid 61002"),
        (Owner(BOB, BOB, 0o755), ALICE, None, Trust(uids=frozenset({BOB})), None),
        (Owner(0, 0, 0o777), ALICE, None, Trust(), "writable by every user"),
        (Owner(0, 0, 0o1777), ALICE, ALICE, Trust(), None),  # /tmp, entry of the owner
        (Owner(0, 0, 0o1777), ALICE, 0, Trust(), None),
        (Owner(0, 0, 0o1777), ALICE, BOB, Trust(), "writable by every user"),  # planted
        (Owner(0, TEAM, 0o775), ALICE, None, Trust(gids=frozenset({TEAM})), None),
        (Owner(0, 0, 0o775), ALICE, None, Trust(), None),  # group root: root alone
    ],
)
def test_who_may_change_a_source_path(directory, source_owner, entry_uid, trust, problem):
    if problem is None:
        check_writers("/d", directory, source_owner, trust, entry_uid=entry_uid)
    else:
        with pytest.raises(Untrusted, match=problem):
            check_writers("/d", directory, source_owner, trust, entry_uid=entry_uid)


@pytest.mark.parametrize(
    ("link_uid", "target_uid", "trust", "followed"),
    [
        (0, ALICE, Trust(), True),  # made by root
        (ALICE, ALICE, Trust(), True),  # made by the target's owner (a Hugging Face cache)
        (BOB, ALICE, Trust(), False),  # made by someone else: where it leads is not theirs
        (BOB, 0, Trust(), False),  # ... least of all to root's files
        (BOB, ALICE, Trust(uids=frozenset({BOB})), True),
    ],
)
def test_a_symlink_is_followed_only_if_root_or_the_targets_owner_made_it(
    link_uid, target_uid, trust, followed
):
    target = Owner(target_uid, target_uid, 0o644)
    if followed:
        check_symlink("/l", link_uid, target, trust)
    else:
        with pytest.raises(Untrusted, match="is a symlink owned by"):
            check_symlink("/l", link_uid, target, trust)
