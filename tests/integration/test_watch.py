"""Source updates: writers in place or by rename, bursts, directories, deletions, a replaced
parent, an inotify overflow, and a source rewritten during its copy."""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import sha256_file, wait_for, write_random

from ramstage import links


def staged_generations(daemon) -> list[str]:  # type: ignore[no-untyped-def]
    """Every generation the daemon published, in order, from its log."""
    return re.findall(r"staged generation (\w+)", daemon.log())


def replace(path: Path, data: bytes) -> None:
    """A rename-into-place writer: write a temporary file, then os.replace."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def test_in_place_writer_is_staged_once_after_close_and_settle(tmp_path, make_daemon):
    source = write_random(tmp_path / "src" / "m.ckpt", 16 << 20, seed=1)
    daemon = make_daemon([{"name": "m", "source": str(source)}], watch={"settle": "500ms"}).start()
    first = daemon.wait_state("m", "staged")
    # torch.save-style writer: opens the final path and writes 256 MiB over about 3 s.
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import os, time
        block = os.urandom(1 << 20)
        with open({str(source)!r}, "wb") as f:
            for i in range(256):
                f.write(i.to_bytes(4, "little") + block[4:])
                f.flush()
                if i % 16 == 15:
                    time.sleep(0.18)
    """),
        ]
    )
    targets = set()
    while writer.poll() is None:
        targets.add(links.read(daemon.links / "m"))
        assert daemon.model("m")["generation"] == first["generation"]
        time.sleep(0.05)
    assert writer.returncode == 0
    assert targets == {first["target"]}, "the link moved while the source was being written"
    final = sha256_file(source)
    model = wait_for(
        lambda: (m := daemon.model("m"))["digest"] == f"sha256:{final}" and m, timeout=30
    )
    assert model["state"] == "staged" and model["reason"] is None
    assert sha256_file(daemon.links / "m") == final
    assert len(staged_generations(daemon)) == 2, daemon.log()


def test_rename_into_place_makes_exactly_one_new_generation(tmp_path, make_daemon):
    source = write_random(tmp_path / "src" / "m.bin", 4 << 20, seed=2)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    replace(source, os.urandom(3 << 20))
    wait_for(lambda: daemon.model("m")["digest"] == f"sha256:{sha256_file(source)}")
    time.sleep(1.0)  # time for a second, unwanted generation to appear
    assert len(staged_generations(daemon)) == 2, daemon.log()
    # The old generation is deleted once its grace period for late readers has passed.
    current = daemon.model("m")["generation"]
    wait_for(
        lambda: [p.name for p in (daemon.store / "m").iterdir() if p.is_dir()] == [current],
        timeout=20,
    )


def test_a_burst_of_100_modifications_makes_one_generation(tmp_path, make_daemon):
    source = write_random(tmp_path / "src" / "m.pth", 1 << 20, seed=3)
    daemon = make_daemon([{"name": "m", "source": str(source)}], watch={"settle": "500ms"}).start()
    daemon.wait_state("m", "staged")
    with open(source, "r+b") as f:
        for i in range(100):
            f.seek(i * 4096)
            f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
    wait_for(lambda: daemon.model("m")["digest"] == f"sha256:{sha256_file(source)}")
    time.sleep(1.0)
    assert len(staged_generations(daemon)) == 2, daemon.log()


READER = textwrap.dedent("""
    import hashlib, os, sys, time
    link, deadline, out = sys.argv[1], time.monotonic() + float(sys.argv[2]), sys.argv[3]
    seen, errors = [], []
    while time.monotonic() < deadline:
        try:
            target = os.path.realpath(link)  # resolve once, as documented for readers
            if os.path.isdir(target):
                names = sorted(os.listdir(target))
                tags = {open(os.path.join(target, n), "rb").read(8) for n in names}
                seen.append("dir:" + ",".join(sorted(t.hex() for t in tags)))
            else:
                with open(target, "rb") as f:
                    seen.append(hashlib.sha256(f.read()).hexdigest())
        except OSError as error:
            errors.append(repr(error))
    with open(out, "w") as f:
        f.write("\\n".join(["ERRORS"] + errors + ["SEEN"] + seen))
""")


def _run_readers(
    link: Path, seconds: float, out_dir: Path, count: int = 4
) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(link), str(seconds), str(out_dir / f"r{i}")]
        )
        for i in range(count)
    ]


def _reader_results(out_dir: Path, count: int = 4) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    seen: list[str] = []
    for i in range(count):
        text = (out_dir / f"r{i}").read_text().split("\n")
        split = text.index("SEEN")
        errors += text[1:split]
        seen += text[split + 1 :]
    return errors, seen


def test_readers_never_see_a_missing_or_partial_file_across_50_swaps(tmp_path, make_daemon):
    source = tmp_path / "src" / "m.ckpt"
    source.parent.mkdir()
    versions = [os.urandom(512 << 10) for _ in range(51)]
    source.write_bytes(versions[0])
    daemon = make_daemon([{"name": "m", "source": str(source)}], watch={"settle": "100ms"}).start()
    daemon.wait_state("m", "staged")
    link = daemon.links / "m"
    # A reader holding an mmap of the first generation across every swap.
    mapped_file = open(link, "rb")  # noqa: SIM115 - held open across the swaps on purpose
    mapped = mmap.mmap(mapped_file.fileno(), 0, prot=mmap.PROT_READ)
    readers = _run_readers(link, 12.0, tmp_path)
    for version in versions[1:]:
        replace(source, version)
        time.sleep(0.2)
    wait_for(
        lambda: daemon.model("m")["digest"] == "sha256:" + hashlib.sha256(versions[-1]).hexdigest()
    )
    for reader in readers:
        assert reader.wait(60) == 0, "a reader died (SIGBUS?)"
    errors, seen = _reader_results(tmp_path)
    assert errors == []
    assert len(seen) > 100
    assert set(seen) <= {hashlib.sha256(v).hexdigest() for v in versions}
    assert mapped[:] == versions[0]  # still the first generation's bytes, long since unlinked
    mapped.close()
    mapped_file.close()


def test_a_directory_source_flips_as_a_whole(tmp_path, make_daemon):
    source = tmp_path / "src" / "sharded"
    source.mkdir(parents=True)

    def write_version(n: int) -> None:
        staging = tmp_path / "src" / f".next-{n}"
        staging.mkdir()
        for shard in range(3):
            (staging / f"shard-{shard}.bin").write_bytes(
                n.to_bytes(8, "little") + os.urandom(64 << 10)
            )
        # Replace the whole directory: move the old one away, the new one in.
        old = tmp_path / "src" / f".old-{n}"
        source.rename(old)
        staging.rename(source)
        subprocess.run(["rm", "-rf", str(old)], check=True)

    for shard in range(3):
        (source / f"shard-{shard}.bin").write_bytes(
            (0).to_bytes(8, "little") + os.urandom(64 << 10)
        )
    daemon = make_daemon([{"name": "m", "source": str(source)}], watch={"settle": "100ms"}).start()
    daemon.wait_state("m", "staged")
    readers = _run_readers(daemon.links / "m", 8.0, tmp_path)
    for n in range(1, 16):
        write_version(n)
        time.sleep(0.3)
    for reader in readers:
        assert reader.wait(60) == 0
    errors, seen = _reader_results(tmp_path)
    assert errors == []
    assert seen and all("," not in s for s in seen), "a reader saw shards of two versions"
    final_tag = (15).to_bytes(8, "little").hex()
    wait_for(lambda: (daemon.links / "m" / "shard-0.bin").read_bytes()[:8].hex() == final_tag)


def test_directory_source_files_added_removed_and_renamed(tmp_path, make_daemon):
    source = tmp_path / "src" / "model"
    write_random(source / "a.bin", 1 << 20, seed=1)
    write_random(source / "sub" / "b.bin", 1 << 20, seed=2)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    link = daemon.links / "m"

    def files() -> list[str]:
        generation = link.resolve()  # once: the link may move on meanwhile
        return sorted(str(p.relative_to(generation)) for p in generation.rglob("*") if p.is_file())

    write_random(source / "sub" / "c.bin", 1 << 20, seed=3)
    wait_for(lambda: files() == ["a.bin", "sub/b.bin", "sub/c.bin"])
    (source / "a.bin").unlink()
    wait_for(lambda: files() == ["sub/b.bin", "sub/c.bin"])
    (source / "sub" / "b.bin").rename(source / "b-renamed.bin")
    wait_for(lambda: files() == ["b-renamed.bin", "sub/c.bin"])
    assert sha256_file(link / "sub" / "c.bin") == sha256_file(source / "sub" / "c.bin")


def test_the_source_parent_directory_being_replaced(tmp_path, make_daemon):
    parent = tmp_path / "src" / "lama"
    source = write_random(parent / "big-lama.ckpt", 1 << 20, seed=1)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    new_parent = tmp_path / "src" / "lama.new"
    write_random(new_parent / "big-lama.ckpt", 2 << 20, seed=2)
    parent.rename(tmp_path / "src" / "lama.old")
    new_parent.rename(parent)
    wait_for(lambda: daemon.model("m")["digest"] == f"sha256:{sha256_file(source)}")
    # Still watched after the swap: a later change inside the new directory is seen too.
    replace(source, os.urandom(1 << 20))
    wait_for(lambda: daemon.model("m")["digest"] == f"sha256:{sha256_file(source)}")


def test_a_deleted_source_is_served_from_ram_and_staged_again_when_back(tmp_path, make_daemon):
    source = write_random(tmp_path / "src" / "m.ckpt", 1 << 20, seed=1)
    content = source.read_bytes()
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    source.unlink()
    model = wait_for(lambda: (m := daemon.model("m"))["reason"] == "source_missing" and m)
    assert model["state"] == "staged"
    assert (daemon.links / "m").read_bytes() == content
    time.sleep(1.0)
    assert daemon.log().count("is missing") == 1, "logged once"
    source.write_bytes(b"back again")
    wait_for(lambda: (daemon.links / "m").read_bytes() == b"back again")
    assert daemon.model("m")["reason"] is None


def test_a_missing_source_with_no_copy_has_no_link(tmp_path, make_daemon):
    source = tmp_path / "src" / "later.ckpt"
    source.parent.mkdir()
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    model = daemon.wait_state("m", "missing")
    assert model["reason"] == "source_missing"
    assert not os.path.lexists(daemon.links / "m")
    source.write_bytes(b"now it exists")
    daemon.wait_state("m", "staged")
    assert (daemon.links / "m").read_bytes() == b"now it exists"


def test_an_old_generation_held_by_a_reader_is_pinned_until_it_exits(tmp_path, make_daemon):
    source = write_random(tmp_path / "src" / "m.ckpt", 2 << 20, seed=1)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; f = open(sys.argv[1], 'rb'); print('open', flush=True);"
            " time.sleep(600)",
            str(daemon.links / "m"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout and holder.stdout.readline() == b"open\n"
        assert holder.pid in daemon.model("m")["users"]
        replace(source, os.urandom(1 << 20))
        model = wait_for(lambda: (m := daemon.model("m"))["pinned_bytes"] == 2 << 20 and m)
        assert holder.pid in model["users"]
    finally:
        holder.kill()
        holder.wait()
    model = wait_for(lambda: (m := daemon.model("m"))["pinned_bytes"] == 0 and m)
    assert holder.pid not in model["users"]


@pytest.mark.root
def test_an_inotify_queue_overflow_still_converges(tmp_path, make_daemon):
    limit = Path("/proc/sys/fs/inotify/max_queued_events")
    original = limit.read_text()
    source_dir = tmp_path / "src"
    sources = [write_random(source_dir / f"m{i}.ckpt", 64 << 10, seed=i) for i in range(3)]
    limit.write_text("16\n")  # applies to inotify instances created from now on
    try:
        daemon = make_daemon(
            [{"name": f"m{i}", "source": str(s)} for i, s in enumerate(sources)],
            watch={"settle": "200ms"},
        ).start()
        for i in range(3):
            daemon.wait_state(f"m{i}", "staged")
        # Far more events than the queue holds, made while the daemon is stopped so that none
        # is read before the queue overflows, then the changes that matter, last.
        noise = [str(source_dir / f"noise-{n}") for n in range(200)]
        daemon.process.send_signal(signal.SIGSTOP)
        try:
            subprocess.run(["touch", *noise], check=True)
            for source in sources:
                replace(source, os.urandom(64 << 10))
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        expected = {f"m{i}": f"sha256:{sha256_file(source)}" for i, source in enumerate(sources)}
        wait_for(
            lambda: {m["name"]: m["digest"] for m in daemon.status()["models"]} == expected,
            timeout=30,
            context=daemon.log,
        )
    finally:
        limit.write_text(original)
    assert "rescanning every source (inotify queue overflow)" in daemon.log()


WRITER = textwrap.dedent(
    """
    import os, sys, time
    path, mode = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_WRONLY)
    deadline = time.monotonic() + 0.3  # shorter than the copier's first back-off (0.4 s)
    offset = 0
    while time.monotonic() < deadline:
        if mode == "rewrite":
            os.pwrite(fd, os.urandom(4096), offset % os.fstat(fd).st_size)
            offset += 1 << 20
        else:
            os.ftruncate(fd, os.fstat(fd).st_size - (1 << 20))
        time.sleep(0.005)
    os.close(fd)
    """
)


@pytest.mark.root
@pytest.mark.parametrize("mode", ["rewrite", "truncate"])
def test_a_source_changed_during_the_copy_is_copied_again(tmp_path, make_daemon, mode):
    """A writer process changes the file while the daemon copies it (in place, or by cutting it
    shorter: with an mmap'd source that would be SIGBUS). The copy is retried and what ends up
    linked is the final source, byte for byte."""
    source = write_random(tmp_path / "ssd" / "m.ckpt", 512 << 20)
    original = sha256_file(source)
    daemon = make_daemon([{"name": "m", "source": str(source)}], mount=True)
    daemon.start(wait=False)
    wait_for(lambda: any(daemon.store.glob("m/.partial-*")), interval=0.001)
    subprocess.run([sys.executable, "-c", WRITER, str(source), mode], check=True)
    model = daemon.wait_state("m", "staged", timeout=60)
    final = sha256_file(source)
    assert final != original
    assert model["digest"] == "sha256:" + final
    assert sha256_file(daemon.links / "m") == final
    assert model["size_bytes"] == source.stat().st_size
    assert daemon.process.poll() is None
    assert list(daemon.store.glob("m/.partial-*")) == []


def test_500_models_in_500_directories_share_one_inotify_instance(tmp_path, make_daemon):
    """fs.inotify.max_user_instances is 128: a watcher with an instance per directory (Debian's
    python3-watchdog 2.2.1) died at start with 150 models. One instance, one reader thread."""
    sources = [
        write_random(tmp_path / "ssd" / f"d{i}" / "m.ckpt", 4096, seed=i) for i in range(500)
    ]
    daemon = make_daemon([{"name": f"m{i}", "source": str(s)} for i, s in enumerate(sources)])
    daemon.start()
    wait_for(
        lambda: all(m["state"] == "staged" for m in daemon.request("status")["models"]),
        timeout=120,
        context=daemon.log,
    )
    pid = daemon.process.pid
    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert fds.count("anon_inode:inotify") == 1
    assert len(os.listdir(f"/proc/{pid}/task")) <= 12  # loop, socket, memory, inotify, copies
    replace(sources[321], b"new version")
    wait_for(lambda: daemon.model("m321")["size_bytes"] == len(b"new version"), context=daemon.log)
