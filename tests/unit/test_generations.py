"""The one owner of generations, in-process on a plain directory store with a fake clock:
references, grace periods, copies in flight and reuse of the same content."""

from __future__ import annotations

import os
from pathlib import Path

from ramstage.config import StoreConfig
from ramstage.digest import hash_file
from ramstage.generations import SWAP_GRACE_SECONDS, Generations
from ramstage.manifest import Manifest, StagedFile
from ramstage.store import Generation, Store
from ramstage.system import System


class Clock(System):
    def __init__(self) -> None:
        super().__init__(environ={})
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def make(tmp_path: Path) -> tuple[Generations, Clock]:
    clock = Clock()
    store = Store(StoreConfig(path=tmp_path / "store", mount=False), clock)
    store.open()
    return Generations(store, clock), clock


def copy(generations: Generations, name: str, content_seed: int) -> Generation:
    """What the copy worker hands the loop: a filled partial and its manifest, published."""
    partial = generations.new_partial(name)
    data = bytes([content_seed]) * 4096
    (partial / "m.ckpt").write_bytes(data)
    digest = hash_file(partial / "m.ckpt", "sha256")
    identity = (0, content_seed, len(data), 0, 0)
    files = (StagedFile("m.ckpt", len(data), digest, identity, (0, 0, 0o444)),)
    manifest = Manifest(name, "/ssd/m.ckpt", "file", digest, files)
    return generations.publish(name, partial, manifest)


def test_a_swapped_out_generation_is_deleted_when_its_grace_period_ends(tmp_path):
    generations, clock = make(tmp_path)
    first = copy(generations, "m", 1)
    generations.serve("m", generations.find("m", first.id))
    second = copy(generations, "m", 2)
    generations.serve("m", generations.find("m", second.id))
    assert generations.current("m") == second
    assert generations.outgoing("m") == [first]
    assert generations.next_expiry() == 100.0 + SWAP_GRACE_SECONDS
    clock.now += SWAP_GRACE_SECONDS
    generations.expire(clock.now)
    assert not first.path.exists() and second.path.exists()
    assert generations.outgoing("m") == [] and generations.next_expiry() is None


def test_swapping_back_within_the_grace_period_keeps_the_generation(tmp_path):
    generations, clock = make(tmp_path)
    first = copy(generations, "m", 1)
    generations.serve("m", first)
    second = copy(generations, "m", 2)
    generations.serve("m", second)
    again = copy(generations, "m", 1)  # the first content once more
    assert again.path == first.path
    generations.serve("m", generations.find("m", again.id))
    assert generations.outgoing("m") == [second]
    clock.now += SWAP_GRACE_SECONDS
    generations.expire(clock.now)
    assert first.path.exists() and not second.path.exists()


def test_release_deletes_current_and_outgoing_at_once(tmp_path):
    generations, _ = make(tmp_path)
    first = copy(generations, "m", 1)
    generations.serve("m", first)
    second = copy(generations, "m", 2)
    generations.serve("m", second)
    generations.release("m")
    assert not first.path.exists() and not second.path.exists()
    assert generations.current("m") is None
    assert set(generations.retired["m"]) == set()  # nobody held them: nothing pinned


def test_a_forgotten_model_goes_once_its_copy_in_flight_reports_back(tmp_path):
    generations, _ = make(tmp_path)
    generations.serve("m", copy(generations, "m", 1))
    partial = generations.new_partial("m")
    generations.forget("m")
    model_dir = tmp_path / "store" / "m"
    assert model_dir.exists() and [p.name for p in model_dir.iterdir()] == [partial.name]
    generations.discard("m", partial)
    assert not model_dir.exists()


def test_a_file_two_models_share_stays_until_the_last_of_them_goes(tmp_path):
    """A copy shared by a hard link (Generations.copies) is offered by its source identity,
    access and algorithm; deleting one model's generation neither frees it nor counts it as
    that model's pinned bytes while the other still serves it."""
    generations, _ = make(tmp_path)
    a = copy(generations, "a", 1)
    generations.serve("a", a)
    (file,) = a.manifest.files
    path, digest = generations.copies()[(file.identity, file.access, "sha256")]
    assert path == a.target and digest == file.digest
    partial = generations.new_partial("b")
    os.link(path, partial / "m.ckpt")
    manifest = Manifest("b", "/ssd/m.ckpt", "file", digest, a.manifest.files)
    b = generations.publish("b", partial, manifest)
    generations.serve("b", b)
    with open(b.target, "rb"):  # a reader of b holds it
        generations.release("a")
        assert not a.path.exists() and b.target.read_bytes() == bytes([1]) * 4096
        assert generations.retired.get("a") == {}  # b's, not pinned by a
        generations.release("b")
        assert list(generations.retired["b"].values()) == [4096]  # now pinned, by b's reader
