"""The models and what stands for them outside: their links and their generations in the store.

Every change here keeps the invariants: a link moves (atomically) before the generation it
leaves is deleted, and a deleted generation's files are tracked until no reader holds them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ramstage import links
from ramstage.config import ModelConfig
from ramstage.errors import RamstageError
from ramstage.sources import list_source
from ramstage.state import Model
from ramstage.store import Generation, Store
from ramstage.system import System
from ramstage.users import holders

log = logging.getLogger("ramstage")
# A generation swapped out for a newer one stays this long, so that a reader that resolved the
# link just before the swap (a sharded loader opening shard after shard) can still open it.
SWAP_GRACE_SECONDS = 10.0


class Catalog:
    def __init__(self, store: Store, links_dir: Path, system: System) -> None:
        self.store, self.links_dir, self.system = store, links_dir, system
        self.models: dict[str, Model] = {}

    def add(self, config: ModelConfig) -> Model:
        model = Model(config, self.links_dir / config.name)
        self.models[config.name] = model
        return model

    def remove(self, name: str) -> Model:
        """Forgets a model: its link goes, then its generations."""
        model = self.models.pop(name)
        links.remove(model.link)
        if model.job:
            # The copy thread is still writing under STORE/NAME: deleting that tree now
            # races it (and an error there ends the loop). The copy removes its own partial
            # and the daemon, when the job reports back, the rest.
            model.job.cancel.set()
            if model.generation:
                self.store.remove(model.generation)
        else:
            self.store.remove_model(name)
        return model

    def heal_links(self) -> None:
        """Puts back links that someone removed or changed, or that an error left behind."""
        for model in self.models.values():
            if model.generation:
                expected: Path | None = model.generation.target
            else:
                expected = model.config.source if model.config.source.exists() else None
            if links.read(model.link) != (str(expected) if expected else None):
                log.warning(
                    "%s: link %s was not where it belongs; put back", model.config.name, model.link
                )
                if expected:
                    links.point(model.link, expected)
                else:
                    links.remove(model.link)

    def expire_outgoing(self, now: float) -> None:
        for model in self.models.values():
            while model.outgoing and model.outgoing[0][0] <= now:
                self._retire(model, model.outgoing.pop(0)[1])

    def release_all(self) -> None:
        """At a clean stop: every link back on its source, every generation deleted."""
        for model in self.models.values():
            self.point_at_source(model)
            for generation in [*(g for _, g in model.outgoing), model.generation]:
                if generation:
                    self.store.remove(generation)
            model.settle("ramstage is stopping")

    def publish(self, model: Model, generation: Generation) -> None:
        if not generation.target.exists():
            # The copy found this content already in the store and reused it, while this thread
            # deleted it (an outgoing generation expiring): copy again rather than link to nothing.
            log.info(
                "%s: generation %s went away while it was reused; copying again",
                model.config.name,
                generation.id,
            )
            model.state = "pending"
            return
        model.outgoing = [(t, g) for t, g in model.outgoing if g.path != generation.path]
        links.point(model.link, generation.target)
        old, model.generation = model.generation, generation
        model.seen = generation.manifest.identities()
        model.state, model.reason = "staged", None
        if old and old.path != generation.path:
            model.outgoing.append((self.system.monotonic() + SWAP_GRACE_SECONDS, old))
        log.info(
            "%s: staged generation %s (%d bytes, %s)",
            model.config.name,
            generation.id,
            generation.manifest.size_bytes,
            generation.manifest.digest,
        )
        for skipped in generation.manifest.skipped:
            log.warning("%s: skipped %s", model.config.name, skipped)
        model.settle(None)

    def point_at_source(self, model: Model) -> None:
        if model.config.source.exists():
            links.point(model.link, model.config.source)
        else:
            links.remove(model.link)

    def fall_back(self, model: Model, reason: str) -> None:
        """The link goes back to the source first; only then is the RAM copy deleted."""
        if model.job:
            model.job.cancel.set()
            model.job = None
        self.point_at_source(model)
        outgoing = [g for _, g in model.outgoing]
        if model.generation:
            outgoing.append(model.generation)
        model.generation, model.outgoing = None, []
        for generation in outgoing:
            self._retire(model, generation)
        model.state, model.reason = "fallback", reason
        if not model.config.source.exists():
            model.state = "missing"
        model.settle(reason)

    def set_missing(self, model: Model) -> None:
        """A deleted source keeps being served from its verified copy; with no copy, the model
        has no link at all (a link to nothing would only move the error into the app)."""
        if model.reason != "source_missing":
            log.warning(
                "%s: source %s is missing; %s",
                model.config.name,
                model.config.source,
                "serving the verified copy in RAM"
                if model.generation
                else "no link until it is back",
            )
        if model.job:
            model.job.cancel.set()
            model.job = None
        model.seen = None
        model.reason = "source_missing"
        if model.generation:
            model.state = "staged"
            model.settle(None)
        else:
            links.remove(model.link)
            model.state = "missing"
            model.settle(model.reason)

    def _retire(self, model: Model, generation: Generation) -> None:
        """Deletes a generation no link points at; readers that still hold its files keep
        them, and their bytes are reported as pinned until they let go (invariant 3)."""
        if model.generation and model.generation.path == generation.path:
            return  # the same content was staged again and is linked once more
        model.retired.update(generation.file_keys)
        self.store.remove(generation)
        self.prune_retired()

    def prune_retired(self) -> None:
        retired = {key for m in self.models.values() for key in m.retired}
        if not retired:
            return
        held = holders(self.system.proc, retired)
        for model in self.models.values():
            model.retired = {k: v for k, v in model.retired.items() if k in held}

    def adopt(self, configs: tuple[ModelConfig, ...]) -> None:
        """At start: every link in place at once, on an adoptable generation or the source."""
        found = self.store.scan({m.name for m in configs})
        for config in configs:
            model = self.add(config)
            adopted = self._adoptable(config, found.get(config.name, []))
            for generation in found.get(config.name, []):
                if generation is not adopted:
                    self.store.remove(generation)
            if adopted:
                links.point(model.link, adopted.target)
                model.generation, model.state = adopted, "staged"
                model.seen = adopted.manifest.identities()
                log.info("%s: adopted generation %s without copying", config.name, adopted.id)
            elif config.source.exists():
                self.point_at_source(model)
            else:
                self.set_missing(model)

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
