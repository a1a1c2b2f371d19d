"""Ring files (ramstage/rings.py): one process's claim, reuse by the next, names that are not
ours passed over, and the daemon's pruning of the idle ones. Real files, real flock(2)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ramstage import rings

MiB = 1 << 20


@pytest.fixture
def ring_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "rings"
    directory.mkdir()
    directory.chmod(0o1777)  # as the daemon mounts it: sticky, everyone may write
    monkeypatch.setenv("RAMSTAGE_RINGS", str(directory))
    return directory


@pytest.fixture
def claimed() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def claim(nbytes: int, fds: list[int]) -> int:
    fd = rings.claim(nbytes)
    assert fd is not None
    fds.append(fd)
    return fd


def name_of(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def held_elsewhere(fd: int) -> bool:
    """Whether another open file description could not lock the file now (flock is per
    description, so this is what another process would see)."""
    other = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(other)


def test_a_claim_is_a_locked_private_file_with_every_byte_allocated(ring_dir, claimed):
    fd = claim(8 * MiB, claimed)
    st = os.fstat(fd)
    assert name_of(fd) == f"{os.getuid()}.0"
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
    assert st.st_size == 8 * MiB and st.st_blocks * 512 >= 8 * MiB
    assert held_elsewhere(fd)


def test_a_second_process_gets_the_next_name_and_a_later_one_the_first_again(ring_dir, claimed):
    first = claim(4 * MiB, claimed)
    second = claim(4 * MiB, claimed)
    assert (name_of(first), name_of(second)) == (f"{os.getuid()}.0", f"{os.getuid()}.1")
    inode = os.fstat(first).st_ino
    os.close(claimed.pop(0))  # the first process ends: its lock goes with its descriptor
    again = claim(4 * MiB, claimed)
    assert os.fstat(again).st_ino == inode  # the same file, its pages already there


def test_a_ring_file_of_another_size_is_made_that_size(ring_dir, claimed):
    os.close(claim(8 * MiB, claimed))
    claimed.clear()
    assert os.fstat(claim(2 * MiB, claimed)).st_size == 2 * MiB
    os.close(claimed.pop())
    fd = claim(6 * MiB, claimed)
    assert os.fstat(fd).st_size == 6 * MiB and os.fstat(fd).st_blocks * 512 >= 6 * MiB


def test_names_that_are_not_this_users_own_ring_files_are_passed_over(ring_dir, claimed, tmp_path):
    uid = os.getuid()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    victim.chmod(0o600)  # a file that would pass for a ring, were the link followed
    (ring_dir / f"{uid}.0").symlink_to(victim)  # a planted link: never followed
    (ring_dir / f"{uid}.1").write_bytes(b"shared")
    os.chmod(ring_dir / f"{uid}.1", 0o644)  # readable by others: not a private ring
    (ring_dir / f"{uid}.2").mkdir()
    fd = claim(2 * MiB, claimed)
    assert name_of(fd) == f"{uid}.3"
    assert victim.read_bytes() == b"keep me"
    assert (ring_dir / f"{uid}.1").read_bytes() == b"shared"


def test_no_ring_directory_or_every_name_taken_means_no_claim(ring_dir, claimed, monkeypatch):
    for _ in range(rings.FILES_PER_USER):
        claim(MiB, claimed)
    assert rings.claim(MiB) is None
    monkeypatch.setenv("RAMSTAGE_RINGS", str(ring_dir / "absent"))
    assert rings.claim(MiB) is None


def test_only_a_sticky_directory_everyone_may_write_holds_ring_files(ring_dir, tmp_path):
    """Not the bare mountpoint an unmount leaves behind (0755), nor a link to a directory."""
    ring_dir.chmod(0o755)
    assert rings.claim(MiB) is None
    ring_dir.chmod(0o1777)
    (tmp_path / "link").symlink_to(ring_dir)
    os.environ["RAMSTAGE_RINGS"] = str(tmp_path / "link")  # monkeypatch restores it
    assert rings.claim(MiB) is None
    assert list(ring_dir.iterdir()) == []


def test_pruning_deletes_the_idle_ring_files_and_keeps_the_held_ones(ring_dir, claimed, tmp_path):
    held = claim(2 * MiB, claimed)
    os.close(claim(4 * MiB, claimed))  # idle: its process ended
    claimed.pop()
    outside = tmp_path / "outside"
    outside.write_bytes(b"x")
    (ring_dir / "link").symlink_to(outside)

    freed = rings.prune(ring_dir)

    assert freed >= 4 * MiB and freed < 6 * MiB
    assert sorted(p.name for p in ring_dir.iterdir()) == sorted(["link", name_of(held)])
    assert outside.read_bytes() == b"x"
    assert os.fstat(held).st_nlink == 1


def test_a_file_pruned_between_its_open_and_its_lock_is_passed_over(ring_dir, claimed, monkeypatch):
    """The daemon may delete an idle file just after a process opened it: the process must
    not take a ring that no longer has a name (the next process could not find its pages)."""
    os.close(claim(MiB, claimed))
    claimed.clear()
    flock = fcntl.flock

    first = ring_dir / f"{os.getuid()}.0"

    def pruned_first(fd: int, operation: int) -> None:
        if first.exists():
            first.unlink()  # by the daemon, as this process opened it
        flock(fd, operation)

    monkeypatch.setattr(rings.fcntl, "flock", pruned_first)
    fd = claim(MiB, claimed)
    assert name_of(fd) == f"{os.getuid()}.1"
