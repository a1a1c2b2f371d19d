"""The copy engine on real files: xxh3, several files of a model at once, cancellation, and
the page cache the source leaves behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import xxhash
from conftest import sha256_file, wait_for, write_random

from ramstage.config import Config
from ramstage.copier import stage_source
from ramstage.digest import available_algorithms, hash_file, new_hasher
from ramstage.errors import Cancelled


def test_xxh3_digests_are_xxhashs_own(tmp_path):
    # The 128-bit XXH3 of nothing, as xxHash's reference implementation gives it.
    empty = new_hasher("xxh3")
    assert empty.hexdigest() == "99aa06d3014798d86001c324468d497f"
    data = write_random(tmp_path / "f.bin", (3 << 20) + 17)
    assert hash_file(data, "xxh3") == "xxh3:" + xxhash.xxh3_128(data.read_bytes()).hexdigest()
    assert Config().checksum == "xxh3"  # a dependency of ramstage, so the default


@pytest.mark.parametrize("algorithm", available_algorithms())
@pytest.mark.parametrize("size", [0, 17, 1 << 20, (1 << 20) + 1, (5 << 20) + 17])
def test_a_file_copied_on_two_streams_is_whole_and_hashed_in_order(tmp_path, algorithm, size):
    """Each stream of a file copies every other 1 MiB chunk; the digest is still the hash of
    the file from its first byte to its last, as the algorithm's own library gives it."""
    source = write_random(tmp_path / "ssd" / "f.bin", size)
    (tmp_path / "gen").mkdir(mode=0o700)
    manifest = stage_source("f", source, tmp_path / "gen", algorithm)
    want = new_hasher(algorithm)
    want.update(source.read_bytes())
    assert manifest.digest == f"{algorithm}:{want.hexdigest()}"
    assert (tmp_path / "gen" / "f.bin").read_bytes() == source.read_bytes()


def _reads_of(source: Path, monkeypatch, change):
    """preadv of `source` goes through change(real preadv, fd, buffers, offset); other files'
    reads (the store's read-back) are left alone. For what a real file system gives only on
    demand it cannot be asked for: short reads before the end, EIO at one offset."""
    real, inode = os.preadv, source.stat().st_ino

    def preadv(fd, buffers, offset):
        if os.fstat(fd).st_ino != inode:
            return real(fd, buffers, offset)
        return change(real, fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)


def test_short_reads_before_the_end_are_read_on_not_taken_for_a_change(tmp_path, monkeypatch):
    """A FUSE mount with direct_io may answer a read with fewer bytes than asked."""
    source = write_random(tmp_path / "ssd" / "f.bin", (3 << 20) + 17)
    _reads_of(source, monkeypatch, lambda real, fd, bufs, at: real(fd, [bufs[0][:12345]], at))
    (tmp_path / "gen").mkdir(mode=0o700)
    manifest = stage_source("f", source, tmp_path / "gen", "xxh3")
    assert manifest.digest == "xxh3:" + xxhash.xxh3_128(source.read_bytes()).hexdigest()
    assert (tmp_path / "gen" / "f.bin").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("failing_chunk", [0, 1])
def test_a_read_failing_in_one_stream_is_the_error_raised(tmp_path, monkeypatch, failing_chunk):
    """One stream fails (EIO at one chunk); the other stops at its next chunk, and the copy
    ends with that EIO, not an internal stop, and leaves no thread behind."""
    source = write_random(tmp_path / "ssd" / "f.bin", 8 << 20)

    def fail(real, fd, buffers, offset):
        if offset == failing_chunk << 20:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    _reads_of(source, monkeypatch, fail)
    (tmp_path / "gen").mkdir(mode=0o700)
    before = threading.active_count()
    with pytest.raises(OSError) as raised:
        stage_source("f", source, tmp_path / "gen", "xxh3")
    assert raised.value.errno == errno.EIO
    wait_for(lambda: threading.active_count() == before, timeout=5)  # copy threads end


def test_shards_copied_two_at_a_time_are_the_same_copy(tmp_path):
    source = tmp_path / "ssd" / "model"
    for index in range(16):
        write_random(source / f"model-{index:05d}-of-00016.safetensors", 1 << 20, seed=index)
    copies = {}
    for workers in (1, 2):
        generation = tmp_path / f"gen{workers}"
        generation.mkdir(mode=0o700)
        copies[workers] = stage_source("m", source, generation, "xxh3", workers=workers)
        for shard in source.iterdir():
            assert sha256_file(generation / "model" / shard.name) == sha256_file(shard)
    assert copies[1] == copies[2]  # the same digest, files, owners and generation


def test_a_copy_cancelled_on_two_workers_stops(tmp_path):
    source = tmp_path / "ssd" / "model"
    for index in range(4):
        write_random(source / f"shard-{index}.bin", 64 << 20, seed=index)
    generation = tmp_path / "gen"
    generation.mkdir(mode=0o700)
    cancel = threading.Event()
    progress: list[float] = []

    def on_progress(done_bytes: int, total_bytes: int) -> None:
        assert total_bytes == 4 * (64 << 20)
        progress.append(done_bytes / total_bytes)
        if done_bytes > total_bytes / 10:
            cancel.set()

    with pytest.raises(Cancelled):
        stage_source("m", source, generation, "sha256", workers=2, cancel=cancel,
                     on_progress=on_progress)  # fmt: skip
    assert 0.1 < max(progress) < 0.9
    assert not [t for t in threading.enumerate() if t.name.startswith("ramstage-")]


def _resident_bytes(path: Path) -> int:
    result = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    return int(result.stdout.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_the_source_leaves_no_second_copy_in_the_page_cache(tmp_path):
    source = write_random(tmp_path / "ssd" / "big.bin", 256 << 20)
    os.sync()  # dirty pages cannot be dropped; written back ones can
    with open(source, "rb") as f:
        while f.read(8 << 20):
            pass
    wait_for(lambda: _resident_bytes(source) > 200 << 20)  # hot in the cache before
    generation = tmp_path / "gen"
    generation.mkdir(mode=0o700)
    midway: list[int] = []

    def progress(done_bytes: int, total_bytes: int) -> None:
        if done_bytes >= 192 << 20 and not midway:
            midway.append(_resident_bytes(source))

    stage_source("m", source, generation, "xxh3", on_progress=progress)
    # Dropped as the copy went (every 64 MiB), not only at its end: at 192 MiB copied, at
    # least 128 MiB of the source had left the cache.
    assert midway and midway[0] <= 128 << 20, midway
    assert _resident_bytes(source) < (256 << 20) // 20  # at most 5% left behind
