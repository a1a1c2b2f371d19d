"""docs/security.md, shown with real users and groups: a copy is never more readable than its
source, and nobody who can write a source's path can make the root daemon read for them."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, wait_for, write_random

pytestmark = pytest.mark.root
MARKER = b"RAMSTAGE-SECRET-" + secrets.token_hex(8).encode()


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class People:
    outsider: User
    insider: User  # a member of `group`
    group: int
    group_name: str


def _add_user(name: str) -> User:
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    entry = subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True)
    gid = subprocess.run(["id", "-g", name], capture_output=True, text=True, check=True)
    return User(name, int(entry.stdout), int(gid.stdout))


@pytest.fixture(scope="module")
def people() -> Iterator[People]:
    """Two real users made for these tests, and a group that only one of them is in."""
    tag = secrets.token_hex(3)
    group_name = f"rs-team-{tag}"
    subprocess.run(["groupadd", "--system", group_name], check=True)
    outsider, insider = _add_user(f"rs-out-{tag}"), _add_user(f"rs-in-{tag}")
    subprocess.run(["usermod", "-aG", group_name, insider.name], check=True)
    gid = int(subprocess.run(["getent", "group", group_name], capture_output=True, text=True,
                             check=True).stdout.split(":")[2])  # fmt: skip
    yield People(outsider, insider, gid, group_name)
    for user in (outsider, insider):
        subprocess.run(["userdel", user.name], check=False)
    subprocess.run(["groupdel", group_name], check=False)


def as_user(user: User, code: str, *args: str, timeout: float = 300) -> Any:
    """Runs Python code as `user` (with its groups); the code prints JSON, returned here."""
    # setpriv rather than subprocess's user=: the interpreter may sit below a directory only
    # root may search (/root/.pyenv), which setpriv's exec still reaches.
    command = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"]
    result = subprocess.run(
        [*command, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


READ = r"""
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            out[path] = sorted(os.listdir(path))
        else:
            with open(path, "rb") as f:
                out[path] = f.read().hex()
    except OSError as error:
        out[path] = error.errno
print(json.dumps(out))
"""


def can_read(user: User, *paths: Path | str) -> dict[str, bool]:
    """For each path, whether `user` could read it (a file) or list it (a directory)."""
    result = as_user(user, READ, *map(str, paths))
    return {path: not isinstance(value, int) for path, value in result.items()}


def secret(path: Path, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MARKER + os.urandom(16 << 10))
    path.chmod(mode)
    return path


def store_holds_marker(store: Path) -> list[str]:
    """The files in the store that hold the secret's marker. The daemon may delete a generation
    (its grace period over) while this walks: os.walk skips what vanished."""
    found = []
    for directory, _, names in os.walk(store):
        for name in names:
            path = Path(directory, name)
            try:
                if not path.is_symlink() and MARKER in path.read_bytes():
                    found.append(str(path))
            except FileNotFoundError:
                continue
    return found


def own(path: Path, user: User, *, group: int | None = None) -> Path:
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.lchown(entry, user.uid, user.gid if group is None else group)
    return path


def start(make_daemon: Any, root: Path, models: list[dict[str, Any]], **config: Any) -> Daemon:
    daemon = make_daemon(models, mount=True, root=root, watch={"settle": "50ms"}, **config)
    daemon.root.chmod(0o755)
    return daemon.start()  # type: ignore[no-any-return]


# ---- a copy is never more readable than its source ------------------------------------------


def test_copies_keep_their_sources_owners_and_modes(public_dir, make_daemon, people):
    ssd = public_dir / "ssd"
    private_file = write_random(ssd / "private.ckpt", 90112)
    private_file.chmod(0o600)
    private_dir = ssd / "private-shards"
    for index in range(3):
        write_random(private_dir / f"shard-{index}.bin", 8192, seed=index).chmod(0o600)
    private_dir.chmod(0o700)
    team_file = write_random(ssd / "team.ckpt", 4096)
    team_file.chmod(0o640)
    os.chown(team_file, 0, people.group)
    behind_team_dir = write_random(ssd / "team-only" / "open.ckpt", 4096)  # 0644 in a 0750 dir
    (ssd / "team-only").chmod(0o750)
    os.chown(ssd / "team-only", 0, people.group)
    home = ssd / "home-insider"
    home.mkdir()
    own(home, people.insider)
    in_home = own(write_random(home / "mine.ckpt", 4096), people.insider)
    home.chmod(0o700)
    everyone = write_random(ssd / "public.ckpt", 4096)
    models = {
        "private-file": private_file,
        "private-dir": private_dir,
        "team-file": team_file,
        "team-dir": behind_team_dir,
        "home": in_home,
        "public": everyone,
    }
    daemon = start(
        make_daemon, public_dir, [{"name": n, "source": str(p)} for n, p in models.items()]
    )
    staged = {name: daemon.wait_state(name, "staged") for name in models}

    # Each copy: the source's owner, group and mode, minus write bits.
    assert os.stat(staged["private-file"]["target"]).st_mode & 0o7777 == 0o400
    team = os.stat(staged["team-file"]["target"])
    assert (team.st_uid, team.st_gid, stat.S_IMODE(team.st_mode)) == (0, people.group, 0o440)
    copy_of_dir = Path(staged["private-dir"]["target"])
    assert stat.S_IMODE(copy_of_dir.stat().st_mode) == 0o500
    assert {stat.S_IMODE(p.stat().st_mode) for p in copy_of_dir.iterdir()} == {0o400}
    assert os.stat(staged["home"]["target"]).st_uid == people.insider.uid

    def reads(user: User, name: str) -> tuple[bool, bool]:
        link, target = daemon.links / name, staged[name]["target"]
        result = can_read(user, link, target)
        return result[str(link)], result[target]

    expected = {  # name: (outsider reads, insider reads), through the link and in the store
        "private-file": (False, False),
        "private-dir": (False, False),
        "team-file": (False, True),
        "team-dir": (False, True),
        "home": (False, True),
        "public": (True, True),
    }
    for name, (outsider, insider) in expected.items():
        assert reads(people.outsider, name) == (outsider, outsider), name
        assert reads(people.insider, name) == (insider, insider), name
        # The same users, and only they, read the source itself.
        assert can_read(people.outsider, models[name])[str(models[name])] == outsider, name
    for shard in copy_of_dir.iterdir():
        assert can_read(people.outsider, shard) == {str(shard): False}


def test_the_store_reveals_no_manifest_listing_or_copy_in_progress(public_dir, make_daemon, people):
    source = write_random(public_dir / "ssd" / "m.ckpt", 4096)
    daemon = start(make_daemon, public_dir, [{"name": "m", "source": str(source)}])
    target = Path(daemon.wait_state("m", "staged")["target"])
    generation = target.parent
    manifest = generation.parent / f"{generation.name}.json"
    assert manifest.is_file() and stat.S_IMODE(manifest.stat().st_mode) == 0o600
    result = can_read(people.outsider, target, manifest, generation, generation.parent)
    assert result == {str(target): True, str(manifest): False, str(generation): False,
                      str(generation.parent): False}  # fmt: skip


def test_a_chmod_of_the_source_takes_the_copy_away_from_others(public_dir, make_daemon, people):
    source = write_random(public_dir / "ssd" / "m.ckpt", 1 << 20)
    daemon = start(make_daemon, public_dir, [{"name": "m", "source": str(source)}])
    before = daemon.wait_state("m", "staged")
    assert can_read(people.outsider, daemon.links / "m")[str(daemon.links / "m")]
    source.chmod(0o600)
    after = wait_for(
        lambda: (
            (m := daemon.model("m"))["state"] == "staged"
            and m["generation"] != before["generation"]
            and m
        )
    )
    assert after["digest"] == before["digest"]  # the same bytes, a new generation
    assert can_read(people.outsider, daemon.links / "m", after["target"]) == {
        str(daemon.links / "m"): False,
        after["target"]: False,
    }


# ---- the trust rule ---------------------------------------------------------------------------

ATTACK = r"""
import json, os, shutil, sys, time
from ramstage.protocol import request

args = json.loads(sys.argv[1])
marker = args["marker"].encode()
source, tmp = args["source"], args["source"] + ".tmp"
seen, rounds, mid_copy = [], args["rounds"], 0


def peek():
    paths = [args["link"]]
    try:
        paths += [m["target"] for m in request(args["socket"], "status")["models"] if m["target"]]
    except Exception:
        pass
    for path in paths:
        for directory, _, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
            for name in files:
                try:
                    with open(os.path.join(directory, name), "rb") as f:
                        if marker in f.read():
                            seen.append(path)
                except OSError:
                    pass


def put(make):
    if os.path.lexists(tmp):
        shutil.rmtree(tmp) if os.path.isdir(tmp) and not os.path.islink(tmp) else os.unlink(tmp)
    make(tmp)
    # rename(2) puts a file or symlink over a file or symlink at once; a directory on either
    # side has to go first.
    if os.path.isdir(source) and not os.path.islink(source):
        shutil.rmtree(source)
    elif os.path.islink(source) and os.path.isdir(tmp) and not os.path.islink(tmp):
        os.unlink(source)
    os.rename(tmp, source)


def genuine(path):
    if args["dir"]:
        os.mkdir(path)
        with open(os.path.join(path, "shard.bin"), "wb") as f:
            f.write(os.urandom(32 << 20))
    else:
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20))


for index in range(rounds):
    if args["plant"]:
        if os.path.lexists(source):
            os.unlink(source)
    else:
        put(genuine)
    time.sleep(args["spread"] * index / rounds)
    try:
        model = request(args["socket"], "status")["models"][0]
        # A copy in flight: the first one, or a new version's while the previous one is served.
        mid_copy += model["state"] == "staging" or (
            model["reason"] == "source_changed" and model["progress"] < 1
        )
    except Exception:
        pass
    put(lambda path: os.symlink(args["secret"], path))
    end = time.monotonic() + args["watch"]
    while time.monotonic() < end:
        peek()
        time.sleep(0.01)
print(json.dumps({"seen": seen, "mid_copy": mid_copy}))
"""


def attack(daemon: Daemon, user: User, source: Path, target: Path, *, rounds: int,
           plant: bool = False, directory: bool = False) -> dict[str, Any]:  # fmt: skip
    """`user` puts the genuine model in place, then swaps it for a symlink to `target`, `rounds`
    times at delays spread over the settle time and the copy, while reading everything the
    link and status lead to. Returns what of the secret it read ("seen") and in how many rounds
    the swap came while the daemon was copying ("mid_copy")."""
    args = {
        "marker": MARKER.decode(),
        "source": str(source),
        "secret": str(target),
        "link": str(daemon.links / "m"),
        "socket": str(daemon.socket),
        "rounds": rounds,
        "plant": plant,
        "dir": directory,
        "spread": 0.15,
        "watch": 0.12,
    }
    return as_user(user, ATTACK, json.dumps(args))  # type: ignore[no-any-return]


def refused(daemon: Daemon) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (m := daemon.model("m"))["reason"] and m["reason"].startswith("untrusted: ") and m,
        context=daemon.log,
    )


def test_c1_an_owner_swapping_their_model_for_a_symlink_reads_nothing(
    public_dir, make_daemon, people
):
    target = secret(public_dir / "root-only" / "secret.bin")
    home = public_dir / "outsider"
    home.mkdir()
    own(home, people.outsider)
    source = own(write_random(home / "model.ckpt", 1 << 20), people.outsider)
    daemon = start(make_daemon, public_dir, [{"name": "m", "source": str(source)}])
    daemon.wait_state("m", "staged")

    assert attack(daemon, people.outsider, source, target, rounds=50)["seen"] == []
    model = refused(daemon)
    assert "symlink owned by" in model["reason"] and model["target"] != str(target)
    assert store_holds_marker(daemon.store) == []
    assert daemon.log().count("staged generation") >= 2  # the genuine versions were staged


def test_c2_a_world_writable_source_directory_is_refused(public_dir, make_daemon, people):
    target = secret(public_dir / "root-only" / "secret.bin")
    shared = public_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    source = write_random(shared / "model.ckpt", 1 << 20)
    daemon = start(make_daemon, public_dir, [{"name": "m", "source": str(source)}])
    model = refused(daemon)
    assert "writable by every user" in model["reason"] and model["state"] == "fallback"

    assert attack(daemon, people.outsider, source, target, rounds=50)["seen"] == []
    refused(daemon)
    assert store_holds_marker(daemon.store) == []
    result = subprocess.run(
        [sys.executable, "-m", "ramstage", "status", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and "untrusted" in result.stdout  # 1: a model in trouble


def test_c3_a_symlink_planted_in_a_sticky_directory_is_refused(public_dir, make_daemon, people):
    target = secret(public_dir / "root-only" / "secret.bin")
    sticky = public_dir / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    source = sticky / "model.ckpt"
    daemon = start(make_daemon, public_dir, [{"name": "m", "source": str(source)}])
    daemon.wait_state("m", "missing")

    assert attack(daemon, people.outsider, source, target, rounds=50, plant=True)["seen"] == []
    model = refused(daemon)
    assert f"{source} is a symlink owned by {people.outsider.name}" in model["reason"]
    assert store_holds_marker(daemon.store) == []


def test_a_subdirectory_swapped_mid_copy_never_leads_the_copy_elsewhere(
    public_dir, make_daemon, people
):
    """The owner of a directory model swaps its subdirectory for a symlink to a directory
    that only root may enter, 200 times, at moments spread over the listing and the copy."""
    secret(public_dir / "root-only" / "sub" / "shard.bin", 0o644)
    (public_dir / "root-only").chmod(0o700)
    home = public_dir / "outsider"
    home.mkdir()
    model = home / "model"
    write_random(model / "sub" / "shard.bin", 32 << 20)
    write_random(model / "config.json", 100)
    own(home, people.outsider)
    daemon = start(make_daemon, public_dir, [{"name": "m", "source": str(model)}])
    daemon.wait_state("m", "staged")

    swapped = attack(daemon, people.outsider, model / "sub", public_dir / "root-only" / "sub",
                     rounds=200, directory=True)  # fmt: skip
    assert swapped["seen"] == []
    assert swapped["mid_copy"] > 0  # else this showed nothing about copies in flight
    print(f"{swapped['mid_copy']} of 200 swaps came while the daemon was copying")
    assert store_holds_marker(daemon.store) == []
    assert "untrusted" in daemon.log()


def test_symlinks_within_one_owners_cache_are_followed_and_others_refused(
    public_dir, make_daemon, people
):
    """A Hugging Face-style cache repo: snapshot files are symlinks into blobs/ of the same
    owner, and staged as the files they lead to."""
    repo = public_dir / "models--org--name"
    data = os.urandom(8192)
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()  # named as huggingface_hub names it
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(f"../../blobs/{blob.name}")
    own(repo, people.insider)
    daemon = start(
        make_daemon, public_dir, [{"name": "m", "source": str(repo), "validate": "none"}]
    )
    target = Path(
        wait_for(
            lambda: daemon.model("m")["state"] == "staged" and daemon.model("m"),
            context=lambda: json.dumps(daemon.model("m")) + daemon.log(),
        )["target"]
    )
    copied = target / "snapshots" / snapshot.name / "model.safetensors"
    assert not copied.is_symlink() and copied.read_bytes() == blob.read_bytes()
    assert copied.stat().st_uid == people.insider.uid

    os.lchown(snapshot / "model.safetensors", people.outsider.uid, people.outsider.gid)
    model = refused(daemon)
    assert f"symlink owned by {people.outsider.name}" in model["reason"]


def test_trust_widens_the_rule_for_a_team_directory_and_says_so(public_dir, make_daemon, people):
    team = public_dir / "team"
    team.mkdir()
    os.chown(team, 0, people.group)
    team.chmod(0o775)
    source = write_random(team / "model.ckpt", 4096)
    daemon = start(make_daemon, public_dir, [{"name": "m", "source": str(source)}])
    assert f"writable by group {people.group_name}" in refused(daemon)["reason"]
    daemon.stop()

    daemon.config["models"][0]["trust"] = {"groups": [people.group_name]}
    daemon.write_config()
    daemon.start()
    daemon.wait_state("m", "staged")
    assert f"trusting users - and groups {people.group_name}" in daemon.log()


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX access ACL as the kernel stores it in system.posix_acl_access: version 2, then
    (tag, permissions, id) for each entry (linux/posix_acl_xattr.h)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def test_a_source_with_an_acl_gives_its_group_nothing_more(public_dir, make_daemon, people):
    """With an ACL, a file's group bits are the ACL's mask: here r--, while the owning group
    itself may do nothing and a named user may read."""
    source = write_random(public_dir / "ssd" / "acl.ckpt", 4096)
    os.chown(source, 0, people.group)
    undefined, read_write, read = 0xFFFFFFFF, 6, 4
    os.setxattr(source, "system.posix_acl_access", _acl(
        (0x01, read_write, undefined),  # owner
        (0x02, read, people.outsider.uid),  # a named user
        (0x04, 0, undefined),  # the owning group: nothing
        (0x10, read, undefined),  # the mask
        (0x20, 0, undefined),  # others
    ))  # fmt: skip
    assert stat.S_IMODE(source.stat().st_mode) == 0o640
    assert can_read(people.insider, source) == {str(source): False}
    daemon = start(make_daemon, public_dir, [{"name": "m", "source": str(source)}])
    target = daemon.wait_state("m", "staged")["target"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o400
    assert can_read(people.insider, target) == {target: False}
