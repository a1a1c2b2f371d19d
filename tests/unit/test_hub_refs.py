"""Hub repos resolved through refs/, on caches laid out by hand as huggingface_hub does."""

from __future__ import annotations

from pathlib import Path

import pytest

from ramstage.access import Trust
from ramstage.hub import DamagedBlob, HubRepo, check_blob, lfs_sha256

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def ref_file(refs: Path) -> None:
    (refs / "main").write_text(COMMIT + "\n")


def ref_directory(refs: Path) -> None:
    (refs / "main").mkdir()


def ref_escaping(refs: Path) -> None:
    (refs / "main").write_text("../../../etc")


@pytest.mark.parametrize(
    ("revision", "make_ref", "snapshot", "problem"),
    [
        ("main", ref_file, COMMIT, None),
        (COMMIT, None, COMMIT, None),
        ("main", ref_directory, "main", "refs/main does not name a commit"),
        ("main", ref_escaping, "main", "refs/main does not name a commit"),
        ("v2", ref_file, "v2", "revision v2 is unknown in"),
        ("v2", None, "v2", "(refs: none)"),
    ],
    ids=["ref", "commit", "ref-is-a-directory", "ref-escapes", "unknown", "no-refs"],
)
def test_a_revision_resolves_to_its_snapshot_or_says_why_not(
    tmp_path, revision, make_ref, snapshot, problem
):
    repo = HubRepo("org/name", revision, tmp_path)
    (repo.path / "snapshots" / COMMIT).mkdir(parents=True)
    repo.refs.mkdir()
    if make_ref:
        make_ref(repo.refs)
    assert repo.snapshot(Trust()) == repo.path / "snapshots" / snapshot
    found = repo.problem(Trust())
    assert (found is None) if problem is None else (problem in found)


def test_a_repo_not_in_the_cache_says_so(tmp_path):
    problem = HubRepo("org/missing", "main", tmp_path).problem(Trust())
    assert problem == f"org/missing is not in the cache {tmp_path} (huggingface-cli download)"


def test_only_lfs_blobs_of_a_hub_repo_promise_a_sha256(tmp_path):
    sha = "ab" * 32
    assert lfs_sha256(tmp_path / "models--o--n" / "blobs" / sha) == sha
    assert lfs_sha256(tmp_path / "models--o--n" / "blobs" / ("ab" * 20)) is None  # git's sha1
    assert lfs_sha256(tmp_path / "elsewhere" / "blobs" / sha) is None
    blob = tmp_path / "models--o--n" / "blobs" / sha
    check_blob(blob, f"xxh3:{'0' * 32}")  # another algorithm cannot tell: not checked
    check_blob(blob, f"sha256:{sha}")
    with pytest.raises(DamagedBlob, match="do not have the sha256 its name says"):
        check_blob(blob, f"sha256:{'cd' * 32}")
