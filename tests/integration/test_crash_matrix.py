"""The crash matrix (docs/reliability.md): the daemon SIGKILLs itself at its k-th step (a file
written, a rename, an unlink, a link flip; RAMSTAGE_CRASH_AT=k) while it stages a file and a
200-file directory, takes an update, evicts, reloads and starts on a store left by another
daemon. A reader reads every file through every link the whole time, across the kill and the
restart. After each restart: no read failed or returned bytes that were never a version of
the file, the store holds nothing but the generations the links serve, and a verified
generation found at the restart is adopted, not copied again.

CI runs a sample of the points of each scenario; RAMSTAGE_CRASH_MATRIX=full runs every one
(docs/reliability.md says how long that takes).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, LinkReader, wait_for, write_random

from ramstage import links
from ramstage.errors import RamstageError

FULL = os.environ.get("RAMSTAGE_CRASH_MATRIX") == "full"
SHARDS = 200
STEP = re.compile(r"ramstage crash hook: step (\d+): (\S+)")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Bench:
    """One scenario's world under `work`: the sources, and a daemon's config, store and links.
    The daemon's part is kept in `template` as it was before the scenario and put back before
    every crash point. The sources are not: a copy would have other inodes and ctimes, and so
    would not be the source its generations were made from."""

    work: Path
    template: Path
    daemon: Daemon
    versions: dict[str, bytes] = field(default_factory=dict)

    @property
    def ssd(self) -> Path:
        return self.work / "ssd"

    def save(self) -> None:
        self.daemon.log_path.write_text("")
        subprocess.run(["cp", "-a", str(self.daemon.root), str(self.template)], check=True)

    def restore(self, scenario: str) -> None:
        """Puts the daemon's part back; an update goes on from where the last one ended (the
        restarted daemon settled on the new version), with the other version next."""
        if scenario == "update":
            return
        shutil.rmtree(self.daemon.root)
        subprocess.run(["cp", "-a", str(self.template), str(self.daemon.root)], check=True)

    def reader_paths(self) -> dict[Path, set[str | None]]:
        links = self.daemon.links
        m = {digest(self.ssd / "v1.bin"), digest(self.ssd / "v2.bin")}
        paths: dict[Path, set[str | None]] = {links / "m": set(m), links / "x": {None}}
        paths[links / "x"].add(digest(self.ssd / "x.ckpt"))
        for shard in sorted((self.ssd / "shards").iterdir()):
            paths[links / "s" / shard.name] = {digest(shard)}
        return paths

    def models(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.daemon.request("status")["models"]}

    def settled(self) -> dict[str, dict[str, Any]] | None:
        """Every model staged, or on its source because the operator evicted it."""
        models = self.models()
        for model in models.values():
            done = (model["state"], model["reason"]) in (("staged", None), ("fallback", "evicted"))
            if not done:
                return None
        return models


def build(tmp_path: Path, make_daemon: Callable[..., Daemon], scenario: str) -> Bench:
    work = tmp_path / "work"
    ssd = work / "ssd"
    write_random(ssd / "v1.bin", 1 << 20, seed=1)
    write_random(ssd / "v2.bin", 1 << 20, seed=2)
    shutil.copy(ssd / "v1.bin", ssd / "m.ckpt")
    write_random(ssd / "x.ckpt", 64 << 10, seed=3)
    for i in range(SHARDS):
        write_random(ssd / "shards" / f"{i:03}.bin", 4096, seed=100 + i)
    models = [
        {"name": "m", "source": str(ssd / "m.ckpt")},
        {"name": "s", "source": str(ssd / "shards")},
        {"name": "x", "source": str(ssd / "x.ckpt")},
    ]
    # A plain-directory store: what happens at a crash is the same as on a tmpfs, and the
    # template can be put back with cp -a.
    daemon = make_daemon(models, root=work, watch={"settle": "100ms"})
    bench = Bench(work, tmp_path / "template", daemon)
    daemon.start()
    wait_for(bench.settled, timeout=120)
    daemon.stop(signal.SIGTERM)  # keeps the store and the links
    if scenario == "stage":
        daemon.cli("unmount", check=True)  # every link on its source, the store empty
    if scenario == "start":
        # Left by another daemon: m's source changed while none ran (its generation can no
        # longer be adopted), x removed from the config, and a copy cut short.
        replace_source(bench, "v2.bin")
        daemon.config["models"] = models[:2]
        daemon.write_config()
        partial = daemon.store / "s" / ".partial-0123456789ab"
        partial.mkdir(mode=0o700)
        (partial / "000.bin").write_bytes(b"cut short")
    bench.save()
    return bench


def replace_source(bench: Bench, version: str) -> None:
    """A new version of m's source, put in place with rename(2) as a trainer's save would."""
    temporary = bench.ssd / ".m.ckpt.new"
    shutil.copy(bench.ssd / version, temporary)
    os.replace(temporary, bench.ssd / "m.ckpt")


def act(bench: Bench, scenario: str) -> None:
    """What the scenario does once the daemon answers; a daemon that died on the way is fine."""
    daemon = bench.daemon
    if scenario == "update":
        now = digest(bench.ssd / "m.ckpt") == digest(bench.ssd / "v2.bin")
        replace_source(bench, "v1.bin" if now else "v2.bin")
    elif scenario == "evict":
        daemon.cli("evict", "m", "s")
    elif scenario == "reload":
        daemon.config["models"] = [
            {"name": "m", "source": str(bench.ssd / "v2.bin")},
            daemon.config["models"][1],
        ]
        daemon.write_config()
        daemon.cli("reload")


def done(bench: Bench, scenario: str) -> bool:
    models = bench.settled()
    if models is None:
        return False
    if scenario == "evict":
        return models["m"]["state"] == models["s"]["state"] == "fallback"
    if scenario in ("update", "reload", "start"):
        # On the new version, and the old one deleted after its grace period.
        new = "m.ckpt" if scenario == "update" else "v2.bin"
        generation = models["m"]["generation"]
        found = {p.name for p in (bench.daemon.store / "m").iterdir()}
        alone = found == {generation, f"{generation}.json"}
        return alone and digest(Path(models["m"]["target"])) == digest(bench.ssd / new)
    return True


def run_to(bench: Bench, scenario: str, point: int) -> bool:
    """Runs the scenario with a crash at `point`; whether the daemon died there."""
    daemon = bench.daemon
    daemon.start(env={"RAMSTAGE_CRASH_AT": str(point)}, wait=False)
    process = daemon.process
    assert process is not None

    def finished(condition: Callable[[], bool]) -> bool:
        try:
            return condition()
        except RamstageError:  # not answering yet, or killed mid-answer
            return False

    wait_for(lambda: process.poll() is not None or finished(daemon.answers), context=daemon.log)
    if process.poll() is None:
        act(bench, scenario)
    wait_for(
        lambda: process.poll() is not None or finished(lambda: done(bench, scenario)),
        timeout=120,
        context=daemon.log,
    )
    return process.poll() is not None


def published(store: Path) -> dict[str, set[str]]:
    """The generations in the store with their manifests: verified, adoptable if they match."""
    return {
        model.name: {g.name for g in model.iterdir() if (model / f"{g.name}.json").is_file()}
        for model in store.iterdir()
        if model.is_dir()
    }


def check_after_restart(bench: Bench, before: dict[str, set[str]], point: int) -> None:
    daemon = bench.daemon
    killed = len(daemon.log())  # the killed daemon is gone: what follows is the restarted one's
    daemon.start()
    models = wait_for(bench.settled, timeout=120, context=daemon.log)
    log = daemon.log()[killed:]
    owned = {}
    for name, model in models.items():
        link = daemon.links / name
        if model["state"] == "staged":
            assert links.read(link) == model["target"], (point, name)
            owned[name] = {model["generation"], f"{model['generation']}.json"}
            if model["generation"] in before.get(name, set()):
                assert f"{name}: adopted generation {model['generation']}" in log, (point, log)
                assert f"{name}: staging" not in log, (point, log)
        else:
            assert links.read(link) == model["source"], (point, name)
            owned[name] = set()
    # Nothing in the store that no generation owns: no partial, no stray generation.
    assert {p.name for p in daemon.store.iterdir()} <= {".ramstage-store", *owned}, point
    for name, wanted in owned.items():
        model_dir = daemon.store / name
        found = {p.name for p in model_dir.iterdir()} if model_dir.exists() else set()
        assert found == wanted, (point, name, found)
    assert not (daemon.links / "x").is_symlink() or "x" in models
    daemon.stop(signal.SIGKILL)


def points(total: int) -> list[int]:
    if FULL:
        return list(range(1, total + 1))
    # A sample: the first and last steps and three in between (start, copies, publishing).
    return sorted({1, max(1, total // 4), total // 2, 3 * total // 4, total})


@pytest.mark.root
@pytest.mark.parametrize("scenario", ["stage", "update", "evict", "reload", "start"])
def test_a_crash_at_any_step_leaves_every_link_whole(tmp_path, make_daemon, scenario):
    bench = build(tmp_path, make_daemon, scenario)
    # A first run with no crash counts the scenario's steps (the hook logs each one).
    assert not run_to(bench, scenario, 10**9)
    steps = [(int(n), what) for n, what in STEP.findall(bench.daemon.log())]
    bench.daemon.stop(signal.SIGKILL)
    total = len(steps)
    assert total > (SHARDS if scenario == "stage" else 3), steps
    kinds = sorted({what for _, what in steps})
    print(f"{scenario}: {total} steps ({', '.join(kinds)})")

    for point in points(total):
        bench.restore(scenario)
        reader = LinkReader(bench.reader_paths())
        reader.start()
        try:
            assert run_to(bench, scenario, point), f"no crash at step {point} of {total}"
            assert f"step {point}: " in bench.daemon.log()
            before = published(bench.daemon.store)
            check_after_restart(bench, before, point)
        finally:
            reader.stop()
        assert reader.failures == [], (point, steps[point - 1], reader.failures[:5])
        assert reader.reads > 0
