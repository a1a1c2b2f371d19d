"""Who may read what: the trust rule for sources, and the permissions a copy keeps.

ramstage runs as root and reads paths that users control, so two promises hold (docs/security.md):
- a source is read only through paths that nobody but root, its owner and the users the operator
  trusts could have changed (sshd's StrictModes; the kernel's fs.protected_symlinks for links);
- a copy is never more readable than its source: every file and directory keeps its source's
  owner, group and mode minus write bits, and the directories above the source, which the copy
  does not have, are stood for by one execute-only "gate" directory that lets through exactly
  the users who can search all of them.
"""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ramstage.errors import RamstageError

READ, SEARCH = 0o4, 0o1  # permission bits of the "other" class; << 3 group, << 6 owner
_NOBODY_KNOWN = -1  # a user who is none of the owners named: any uid, any groups
_MAX_GROUPS = 10  # the user kinds to check grow as 2**groups; real paths name two or three


class Untrusted(RamstageError):
    """A source, or a path to it, that someone other than root, its owner or a trusted user
    could have changed; it is not read, and the model stays on its source."""


@dataclass(frozen=True)
class Trust:
    """Users and groups besides root and a source's owner that may own or write the directories
    on a source's path, and own the symlinks that lead to it (config `trust:`)."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def __or__(self, other: Trust) -> Trust:
        return Trust(self.uids | other.uids, self.gids | other.gids)


NO_TRUST = Trust()


@dataclass(frozen=True)
class Owner:
    """Who owns an inode and its permission bits (no file type)."""

    uid: int
    gid: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Owner:
        return cls(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))

    def read_only(self) -> Owner:
        """The same minus write bits, and minus setuid, setgid and sticky, which a copy in a
        nosuid store has no use for."""
        return Owner(self.uid, self.gid, self.mode & 0o555)

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.uid, self.gid, self.mode)

    def describe(self) -> str:
        return f"{user_name(self.uid)}:{group_name(self.gid)} {self.mode:04o}"


def check_writers(
    path: str, owner: Owner, source_owner: int, trust: Trust, *, entry_uid: int | None = None
) -> None:
    """A source, and every directory on the way to it, may be changed only by root, the
    source's owner or a trusted user. Owning an inode is as good as writing it (chmod). A sticky
    directory that others may write (/tmp) is fine where its entry on the path belongs to a
    trusted user: the sticky bit keeps others from renaming or removing it (unlink(2))."""

    def trusted(uid: int) -> bool:
        return uid in (0, source_owner) or uid in trust.uids

    if not trusted(owner.uid):
        raise Untrusted(f"{path} is owned by {user_name(owner.uid)}, who could change it")
    group_writes = (
        owner.mode & 0o020
        and owner.gid not in trust.gids
        and not all(trusted(uid) for uid in _members(owner.gid))
    )
    other_writes = owner.mode & 0o002
    if not (group_writes or other_writes):
        return
    if owner.mode & stat.S_ISVTX and entry_uid is not None and trusted(entry_uid):
        return
    writers = "every user" if other_writes else f"group {group_name(owner.gid)}"
    raise Untrusted(f"{path} is writable by {writers} ({owner.describe()})")


def check_symlink(path: str, link_uid: int, target: Owner, trust: Trust) -> None:
    """A symlink is followed only if root, a trusted user or the target's owner made it
    (fs.protected_symlinks: otherwise anyone who can write its directory chooses what we read)."""
    if link_uid not in (0, target.uid) and link_uid not in trust.uids:
        raise Untrusted(
            f"{path} is a symlink owned by {user_name(link_uid)} to a file owned by "
            f"{user_name(target.uid)}"
        )


def gate(path: Sequence[Owner]) -> Owner:
    """The execute-only directory that stands for the directories above a source: it lets
    through exactly the users who can search all of them. Its owner and group are root's or
    those of one of the directories; where no choice lets through exactly the same users (two
    private directories of different owners, say), the source is refused rather than served to
    too many users or too few."""
    required = [(owner, SEARCH) for owner in path]
    kinds = list(_user_kinds(path))
    everyone, nobody = Owner(0, 0, 0o111), Owner(0, 0, 0)  # root passes either way
    candidates = [everyone, nobody] + [Owner(o.uid, o.gid, o.mode & 0o111) for o in path]
    for candidate in candidates:
        if all(
            _admits(candidate, uid, groups, SEARCH) == _admits_all(required, uid, groups)
            for uid, groups in kinds
        ):
            return candidate
    raise Untrusted(
        "the store cannot let through exactly the users who can reach the source: "
        + ", ".join(o.describe() for o in path if o.mode & 0o111 != 0o111)
    )


def through(owner: Owner, path: Sequence[Owner]) -> Owner:
    """A file or directory reached through a symlink whose target lies below directories the
    copy does not have: each class keeps a bit only if every user of that class can also
    search all of those directories. This may take away more than the source does; it never
    gives more."""
    owner = owner.read_only()
    if not path:
        return owner
    required = [(o, SEARCH) for o in path]
    kinds = list(_user_kinds([owner, *path]))
    mode = owner.mode
    for shift in (6, 3, 0):
        members = [(uid, groups) for uid, groups in kinds if _class_of(owner, uid, groups) == shift]
        if not all(_admits_all(required, uid, groups) for uid, groups in members):
            mode &= ~(0o7 << shift)
    return Owner(owner.uid, owner.gid, mode)


def _class_of(owner: Owner, uid: int, groups: frozenset[int]) -> int:
    """Which class of an inode's permission bits applies to a user (not root), as the shift of
    its bits: owner 6, group 3, other 0."""
    if uid == owner.uid:
        return 6
    return 3 if owner.gid in groups else 0


def _admits(owner: Owner, uid: int, groups: frozenset[int], bit: int) -> bool:
    """Whether a user (not root) gets `bit` on an inode, by the owner-group-other rule."""
    return bool(owner.mode & (bit << _class_of(owner, uid, groups)))


def _admits_all(required: Iterable[tuple[Owner, int]], uid: int, groups: frozenset[int]) -> bool:
    return all(_admits(owner, uid, groups, bit) for owner, bit in required)


def _user_kinds(owners: Sequence[Owner]) -> Iterator[tuple[int, frozenset[int]]]:
    """Every kind of user the permission bits can tell apart: each owner named (with the
    groups it really has, among those named) and anyone else (in any mix of them). Root is
    left out: it reads regardless."""
    gids = sorted({o.gid for o in owners})
    if len(gids) > _MAX_GROUPS:
        raise Untrusted(f"the path to the source names more than {_MAX_GROUPS} groups")
    for uid in sorted({o.uid for o in owners} - {0}):
        known = _groups_of(uid)
        if known is not None:
            yield uid, known & frozenset(gids)
            continue
        for groups in _subsets(gids):
            yield uid, groups
    for groups in _subsets(gids):
        yield _NOBODY_KNOWN, groups


def _subsets(gids: list[int]) -> Iterator[frozenset[int]]:
    for size in range(len(gids) + 1):
        for combination in itertools.combinations(gids, size):
            yield frozenset(combination)


def _groups_of(uid: int) -> frozenset[int] | None:
    """The groups of a user with a passwd entry; None for a bare uid, whose groups are
    unknown."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return None
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))


def _members(gid: int) -> set[int]:
    """The users in a group: those it is the primary group of, and those listed in it."""
    members = {entry.pw_uid for entry in pwd.getpwall() if entry.pw_gid == gid}
    try:
        names = grp.getgrgid(gid).gr_mem
    except KeyError:
        return members
    for name in names:
        try:
            members.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return members


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"
