"""The one owner of generations, used only by the loop: the one each model serves, the ones
swapped out and still in their grace period, the partial copies in flight, and those adopted
at start. It counts references and deletes a generation when the count drops to zero, in one
place (_unref), after the link has left it; a deleted generation's files are then tracked as
pinned until no process holds them (invariant 3).

Generations are named by their content, so publishing a copy whose content is already here
(an update reverted, a model staged again within the grace period) returns that generation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from ramstage.holders import FileKey, holders
from ramstage.manifest import CopyKey, Manifest
from ramstage.store import Generation, Store, remove_tree
from ramstage.system import System

log = logging.getLogger("ramstage")
# A generation swapped out for a newer one stays this long, so that a reader that resolved the
# link just before the swap (a sharded loader opening shard after shard) can still open it.
SWAP_GRACE_SECONDS = 10.0


class Generations:
    def __init__(self, store: Store, system: System) -> None:
        self.store, self.system = store, system
        self._current: dict[str, Generation] = {}
        self._outgoing: dict[str, list[tuple[float, Generation]]] = {}  # (delete at, gen)
        self._refs: dict[Path, int] = {}
        self._fresh: dict[str, Generation] = {}  # published or adopted, not yet served
        self._in_flight: dict[str, set[Path]] = {}
        self._forgotten: set[str] = set()  # removed models whose partial is still being written
        self.retired: dict[str, dict[FileKey, int]] = {}  # deleted files by size, while held

    # ---- what is there -----------------------------------------------------------------

    def current(self, name: str) -> Generation | None:
        return self._current.get(name)

    def outgoing(self, name: str) -> list[Generation]:
        return [generation for _, generation in self._outgoing.get(name, [])]

    def next_expiry(self) -> float | None:
        due = [when for entries in self._outgoing.values() for when, _ in entries]
        return min(due) if due else None

    def _live(self) -> list[Generation]:
        outgoing = [g for entries in self._outgoing.values() for _, g in entries]
        return [*self._fresh.values(), *self._current.values(), *outgoing]

    def copies(self) -> dict[CopyKey, tuple[Path, str]]:
        """Every file in RAM that a new copy may share instead of reading its source again,
        with its digest: by the source file's identity, the copy's owner, group and mode,
        and the digest's algorithm. Revisions and models that have a file in common (one
        Hugging Face blob, a hard link) so hold it once; a shared inode's bytes stay until
        its last generation is deleted, whatever deletes the others."""
        found = {}
        for generation in self._live():
            for file, path in zip(generation.manifest.files, generation.file_paths()):
                found[(file.identity, file.access, file.digest.partition(":")[0])] = (
                    path,
                    file.digest,
                )
        return found

    def scan(self, names: set[str]) -> dict[str, list[Generation]]:
        """At start: the published generations of these models, debris removed."""
        return self.store.scan(names)

    # ---- copies in flight --------------------------------------------------------------

    def new_partial(self, name: str) -> Path:
        self._forgotten.discard(name)
        partial = self.store.new_partial(name)
        self._in_flight.setdefault(name, set()).add(partial)
        return partial

    def publish(self, name: str, partial: Path, manifest: Manifest) -> Generation:
        """Makes a verified partial a generation; the same content already here is reused."""
        self._in_flight.get(name, set()).discard(partial)
        generation = self.store.publish(partial, manifest)
        self._fresh[name] = generation
        return generation

    def unpublish(self, name: str, generation: Generation) -> None:
        """A generation published but never linked (the links directory is read-only): it goes
        again, unless a link serves the same content."""
        self._fresh.pop(name, None)
        if generation.path not in self._refs:
            self.store.remove(generation)

    def adopt(self, name: str, generation: Generation) -> None:
        """At start: a verified generation found in the store, about to be served again."""
        self._fresh[name] = generation

    def discard(self, name: str, partial: Path) -> None:
        """A copy that failed, or that is no longer wanted: its partial goes."""
        self._in_flight.get(name, set()).discard(partial)
        remove_tree(partial)
        if name in self._forgotten and not self._in_flight.get(name):
            self._forgotten.discard(name)
            self.store.remove_model(name)

    # ---- what links point at -----------------------------------------------------------

    def find(self, name: str, generation_id: str) -> Generation:
        """A generation of the model by id: published or adopted and not served yet, current,
        or still in its grace period."""
        known = [self._fresh.get(name), self._current.get(name), *self.outgoing(name)]
        return next(g for g in known if g is not None and g.id == generation_id)

    def serve(self, name: str, generation: Generation) -> None:
        """The link now points at this generation; the one it left stays for the grace period."""
        self._fresh.pop(name, None)
        old = self._current.get(name)
        if old is not None and old.path == generation.path:
            return
        entries = self._outgoing.setdefault(name, [])
        kept = [(t, g) for t, g in entries if g.path != generation.path]
        if len(kept) == len(entries):
            self._refs[generation.path] = self._refs.get(generation.path, 0) + 1
        else:
            self._outgoing[name] = kept  # swapped back to a version still in its grace period
        self._current[name] = generation
        if old is not None:
            self._outgoing[name].append((self.system.monotonic() + SWAP_GRACE_SECONDS, old))

    def release(self, name: str) -> None:
        """The link no longer points into RAM: every generation of the model goes now."""
        current = self._current.pop(name, None)
        for generation in [*self.outgoing(name), *([current] if current else [])]:
            self._unref(name, generation)
        self._outgoing.pop(name, None)

    def expire(self, now: float) -> None:
        for name, entries in self._outgoing.items():
            for when, generation in [e for e in entries if e[0] <= now]:
                entries.remove((when, generation))
                self._unref(name, generation)

    def forget(self, name: str) -> None:
        """A model removed from the config: all of it goes once no copy is writing there."""
        self.release(name)
        self.retired.pop(name, None)
        if self._in_flight.get(name):
            self._forgotten.add(name)
        else:
            self.store.remove_model(name)

    def drop(self, generations: Iterable[Generation]) -> None:
        """Generations found at start that no model adopts."""
        for generation in generations:
            self.store.remove(generation)

    def _unref(self, name: str, generation: Generation) -> None:
        count = self._refs.get(generation.path, 1) - 1
        if count > 0:
            self._refs[generation.path] = count
            return
        self._refs.pop(generation.path, None)
        # file_keys reads the files' inodes, so it is taken before they are unlinked; an inode
        # that another generation still holds is not this model's to report as pinned.
        live = {key for g in self._live() if g.path != generation.path for key in g.file_keys}
        retired = {k: v for k, v in generation.file_keys.items() if k not in live}
        self.retired.setdefault(name, {}).update(retired)
        self.store.remove(generation)
        self.prune()

    def prune(self) -> None:
        """Forgets deleted files that no process holds any more."""
        wanted = {key for keys in self.retired.values() for key in keys}
        if not wanted:
            return
        held = holders(self.system.proc, wanted)
        for name, keys in self.retired.items():
            self.retired[name] = {k: v for k, v in keys.items() if k in held}

    def pinned_candidates(self, name: str) -> dict[FileKey, int]:
        """Files no link points at that a reader may still hold: deleted ones and those of
        generations in their grace period."""
        outgoing = {k: v for g in self.outgoing(name) for k, v in g.file_keys.items()}
        return {**self.retired.get(name, {}), **outgoing}
