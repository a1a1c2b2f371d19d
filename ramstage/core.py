"""The models and the loop's operations on them: place them at start, start the next copy,
take a finished one in, add and remove models, put back links, release everything at a stop.

Each operation gathers the facts, asks lifecycle.py, and hands the actions to the actuator;
all of it runs in the loop's thread, which is the only one that touches a record or the store.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ramstage import lifecycle, links
from ramstage.actuator import Actuator
from ramstage.config import Config, ModelConfig
from ramstage.errors import RamstageError
from ramstage.eviction import Relief
from ramstage.generations import Generations
from ramstage.manifest import Manifest
from ramstage.model import Action, DropCopy, Job, Model
from ramstage.sources import list_source
from ramstage.store import Generation, Store
from ramstage.system import System
from ramstage.updates import SourceUpdates, look

log = logging.getLogger("ramstage")


@dataclass
class Core:
    config_path: Path
    config: Config
    system: System
    store: Store
    generations: Generations
    actuator: Actuator
    relief: Relief
    updates: SourceUpdates
    models: dict[str, Model] = field(default_factory=dict)

    def apply(self, model: Model, actions: list[Action]) -> None:
        self.actuator.apply(model, actions)

    def add(self, config: ModelConfig) -> Model:
        model = Model(config, self.config.links_dir / config.name)
        self.models[config.name] = model
        return model

    def place_all(self) -> None:
        """At start: every link in place at once, on an adoptable generation or the source."""
        configs = self.config.models
        found = self.generations.scan({m.name for m in configs})
        for config in configs:
            model = self.add(config)
            generations = found.get(config.name, [])
            adopted = self._adoptable(config, generations)
            self.generations.drop(g for g in generations if g is not adopted)
            if adopted:
                self.generations.adopt(config.name, adopted)
                self.apply(model, lifecycle.adopted(adopted.id, adopted.manifest.identities()))
                log.info("%s: adopted generation %s without copying", config.name, adopted.id)
            else:
                self.apply(model, lifecycle.placed(model, source_exists=config.source.exists()))

    def _adoptable(self, config: ModelConfig, generations: list[Generation]) -> Generation | None:
        for generation in generations:
            manifest = generation.manifest
            if manifest.source != str(config.source) or (
                config.digest and manifest.digest != config.digest
            ):
                continue
            try:
                listing = list_source(config.source, config.trust)
                same_source = listing.identities() == manifest.identities()
                complete = all(
                    os.stat(path).st_size == f.size_bytes
                    for f, path in zip(manifest.files, generation.file_paths())
                )
            except (OSError, RamstageError):
                continue
            if same_source and complete:
                return generation
        return None

    def remove(self, name: str) -> None:
        """Forgets a model: its link goes, then its generations (a partial once its copy stops)."""
        model = self.models.pop(name)
        self.apply(model, lifecycle.released(model, "removed from the config", source_exists=False))
        self.generations.forget(name)

    def schedule(self, stopping: bool) -> None:
        name = None if stopping else lifecycle.next_copy(self.models.values())
        if name is None:
            return
        model = self.models[name]
        budget = lifecycle.Budget(
            store_free_bytes=self.store.fs.free_bytes(),
            available_bytes=self.system.available_bytes(),
            floor_bytes=self.config.memory.min_available_bytes,
            paused=self.relief.paused(),
            now=self.system.monotonic(),
            cooldown_seconds=self.config.memory.effective_cooldown_seconds,
        )
        self.apply(model, lifecycle.admit(model, self._unshared(look(model.settings)), budget))

    def _unshared(self, listing: lifecycle.Listing) -> lifecycle.Listing:
        """A copy needs room only for the files that it cannot share with a copy already in
        RAM (Generations.copies: the same source file, unchanged). The owner and mode are
        left out here: a file that differs there is copied after all, and the store's own
        bound (ENOSPC at posix_fallocate) still refuses what does not fit."""
        in_ram = {key[0] for key in self.generations.copies()}
        shared = sum(i[2] for i in {i for _, i in listing.identities if i in in_ram})
        return replace(listing, size_bytes=max(listing.size_bytes - shared, 0))

    def job_done(self, name: str, job: Job) -> None:
        """Only the loop publishes: a copy still wanted becomes a generation and is served; any
        other partial copy is deleted."""
        assert job.future is not None
        model = self.models.get(name)
        wanted = model is not None and model.job is job
        error = job.future.exception()
        generation = None
        if wanted and error is None:
            manifest: Manifest = job.future.result()
            try:
                generation = self.generations.publish(name, job.partial, manifest)
            except OSError as failed:
                error = failed
        if generation is None:
            self.generations.discard(name, job.partial)
        if model is None or not wanted:
            return  # evicted, removed or replaced while it was copied
        self.apply(model, [DropCopy()])
        if generation is not None:
            self.actuator.count_copy(model, job, manifest.size_bytes)
            self.apply(model, lifecycle.copied(model, generation.id, manifest.identities()))
            return
        assert error is not None
        why = lifecycle.copy_failure(error)
        if why is not None and isinstance(error, (RamstageError, OSError)):
            log.error("%s: staging failed: %s", name, error)
        elif why is not None:
            log.error("%s: staging failed", name, exc_info=error)
        exists = model.settings.source.exists()
        self.apply(model, lifecycle.copy_failed(model, why, job.identities, source_exists=exists))

    def heal_links(self) -> None:
        """Puts back links that someone removed or changed, or that an error left behind."""
        for model in self.models.values():
            generation = self.generations.current(model.name)
            expected = lifecycle.expected_link(
                model,
                generation.target if generation else None,
                source_exists=model.settings.source.exists(),
            )
            current = links.read(model.link)
            if current == (str(expected) if expected else None):
                continue
            if expected and current and _another_snapshot(Path(current), expected):
                log.info("%s: the revision moved; the link follows it to %s", model.name, expected)
            else:
                log.warning(
                    "%s: link %s was not where it belongs; put back", model.name, model.link
                )
            if expected:
                in_ram = generation is not None and expected == generation.target
                links.point(model.link, expected, relative=in_ram)
            else:
                links.remove(model.link)

    def release_all(self) -> None:
        """At a clean stop: every link back on its source, every generation deleted."""
        for model in self.models.values():
            exists = model.settings.source.exists()
            self.apply(
                model, lifecycle.released(model, "ramstage is stopping", source_exists=exists)
            )


def _another_snapshot(current: Path, expected: Path) -> bool:
    """A link on one snapshot of a hub repo whose source is now another (its ref moved)."""
    return current.parent == expected.parent and expected.parent.name == "snapshots"
