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
from ramstage.config import Config, ModelConfig, source_problems
from ramstage.errors import RamstageError
from ramstage.eviction import Relief
from ramstage.generations import Generations
from ramstage.manifest import Manifest
from ramstage.model import Action, DropCopy, Job, Model, Reason, Serving, Want, Why
from ramstage.reach import Reach
from ramstage.sources import list_source
from ramstage.store import Generation, Store
from ramstage.system import System
from ramstage.updates import SourceUpdates

log = logging.getLogger("ramstage")

LOOK_AGAIN_SECONDS = 5.0  # a model that waits to be copied has its source listed this often


@dataclass
class Core:
    config_path: Path
    config: Config
    system: System
    reach: Reach
    store: Store
    generations: Generations
    actuator: Actuator
    relief: Relief
    updates: SourceUpdates
    models: dict[str, Model] = field(default_factory=dict)
    store_lost: bool = False  # the store's tmpfs was unmounted under us and is not back yet
    # name -> (when, Model.actions then, the listing): what _look saw last
    looked: dict[str, tuple[float, int, lifecycle.Listing]] = field(default_factory=dict)

    def apply(self, model: Model, actions: list[Action]) -> None:
        self.actuator.apply(model, actions)

    def add(self, config: ModelConfig) -> Model:
        """A new record, its source not yet resolved: place() or place_all() resolves it."""
        model = Model(config, self.config.links_dir / config.name, config.resolve(read_refs=False))
        self.models[config.name] = model
        return model

    def reach_source(self, model: Model) -> OSError | None:
        """The source resolved anew and looked at, each with a deadline: None if it is there."""
        return self.updates.locate(model) or self.reach.problem(model.source)

    def place_all(self, held: set[str]) -> None:
        """At start: every link in place at once, on an adoptable generation or the source;
        then what no link points at any more goes (invariant 1 across a crash). Models in
        `held` were evicted by the operator and stay on their sources."""
        configs = self.config.models
        names = {m.name for m in configs}
        links.prepare(self.config.links_dir, names, step=self.system.step)
        found = self.generations.scan(names)
        unadopted: list[Generation] = []
        for config in configs:
            model = self.add(config)
            problem = self.reach_source(model)
            generations = found.get(config.name, [])
            adoptable = config.name not in held and problem is None
            adopted = self._adoptable(model, generations) if adoptable else None
            unadopted += [g for g in generations if g is not adopted]
            if adopted:
                self.generations.adopt(config.name, adopted)
                self.apply(model, lifecycle.adopted(adopted.id, adopted.manifest.identities()))
                log.info("%s: adopted generation %s without copying", config.name, adopted.id)
            elif config.name in held:
                exists = problem is None
                self.apply(model, lifecycle.evict_requested(model, source_exists=exists))
                log.info("%s: stays on its source, evicted by the operator", config.name)
            else:
                self.place(model, problem)
        self.generations.drop(unadopted)

    def source_problems(self, config: Config) -> list[str]:
        """config.source_problems, with a deadline for all of them: a source may hang."""
        try:
            return self.reach.call(self.config_path, lambda: source_problems(config))
        except OSError as error:
            return [f"sources not checked: {error}"]

    def place(self, model: Model, problem: OSError | None) -> None:
        """A model with nothing in RAM: its link on the source, or none; a source that cannot be
        reached (a disconnected or hung mount, a hung hub ref) is said to be so. `problem`:
        reach_source()."""
        self.apply(model, lifecycle.placed(model, source_exists=problem is None))
        if problem is not None and not isinstance(problem, FileNotFoundError):
            self.apply(model, lifecycle.unreachable(model, problem))

    def _adoptable(self, model: Model, generations: list[Generation]) -> Generation | None:
        config, source = model.settings, model.source
        for generation in generations:
            manifest = generation.manifest
            if manifest.source != str(source) or (
                config.digest and manifest.digest != config.digest
            ):
                continue
            try:
                listing = self.reach.call(source, lambda: list_source(source, config.trust))
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
        self.looked.pop(name, None)
        self.apply(model, lifecycle.released(model, "removed from the config", source_exists=False))
        self.generations.forget(name)

    def check_store(self) -> None:
        """The store's tmpfs unmounted under the daemon (umount -l): its links would dangle,
        and a copy would land on the file system below the store path. Every model goes back
        to its source at once, wanting a copy, and the tmpfs is mounted again (or adopted)."""
        if not self.config.store.mount or self.store.fs.mounted:
            if self.store_lost:
                log.info("the store is mounted again at %s", self.store.path)
            self.store_lost = False
            return
        if not self.store_lost:
            why = Why(Reason.ERROR, f"the store at {self.store.path} was unmounted")
            log.error("%s; every model is served from its source", why.detail)
            for model in self.models.values():
                if model.serving is Serving.RAM or model.job:
                    exists = self.reach.exists(model.source)
                    actions = lifecycle.fall_back(model, why, source_exists=exists)
                    self.apply(model, [*actions, Want(exists)])
        self.store_lost = True
        try:
            self.store.open()
        except (OSError, RamstageError) as error:
            log.error("cannot mount the store again (tried again in a moment): %s", error)

    def schedule(self, stopping: bool) -> None:
        self.actuator.give_up_stalled(self.models.values())
        if stopping or self.store_lost:
            return  # a copy would land on the file system below the store path
        if self.config.store.mount and not self.store.fs.mounted:
            return  # check_store takes an unmounted store from here
        for name in lifecycle.next_copies(self.models.values(), self.actuator.crew.workers):
            model = self.models[name]
            listing = self._unshared(self._look(model))
            if lifecycle.shares_a_copy_in_flight(listing, self.models.values()):
                return  # and those after it wait for it, as below
            actions = lifecycle.admit(model, listing, self._budget())
            if not actions:
                return  # it waits for the copies in flight, and those after it wait for it
            self.apply(model, actions)

    def _look(self, model: Model) -> lifecycle.Listing:
        """The model's source as it is now (updates.look). A model that waits, for room or for
        a copy in flight of a file it shares, is listed again once an action changed its record
        (a source event among them) or LOOK_AGAIN_SECONDS passed: not at every turn of the loop
        while copies run, which for a large tree or a network mount is real work."""
        now = self.system.monotonic()
        seen = self.looked.get(model.name)
        if seen and seen[1] == model.actions and now - seen[0] < LOOK_AGAIN_SECONDS:
            return seen[2]
        listing = self.updates.look(model)
        self.looked[model.name] = (now, model.actions, listing)
        return listing

    def _budget(self) -> lifecycle.Budget:
        """The readings, with what each copy in flight took of the store so far and what it
        has yet to take of what it was admitted for."""
        jobs = [m.job for m in self.models.values() if m.job]
        taken = [self.store.partial_bytes(job.partial) for job in jobs]
        return lifecycle.Budget(
            store_free_bytes=self.store.fs.free_bytes(),
            store_others_bytes=self.store.others_bytes(self.models),
            available_bytes=self.system.available_bytes(),
            floor_bytes=self.config.memory.min_available_bytes,
            paused=self.relief.paused(),
            now=self.system.monotonic(),
            cooldown_seconds=self.config.memory.effective_cooldown_seconds,
            in_flight_bytes=sum(taken),
            reserved_bytes=sum(max(j.need_bytes - t, 0) for j, t in zip(jobs, taken)),
        )

    def _unshared(self, listing: lifecycle.Listing) -> lifecycle.Listing:
        """A copy needs room only for the files that it cannot share with a copy already in
        RAM (Generations.copies: the same source file, unchanged). The owner and mode are
        left out here: a file that differs there is copied after all, and the store's own
        bound (ENOSPC at posix_fallocate) still refuses what does not fit."""
        in_ram = {key[0] for key in self.generations.copies()}
        shared = sum(i[2] for i in {i for _, i in listing.identities if i in in_ram})
        return replace(listing, size_bytes=max(listing.size_bytes - shared, 0))

    def retry_when_room(self) -> None:
        """Models refused for a store that others filled go back to pending once they fit."""
        for model in self.models.values():
            if model.want or model.held or model.why != Why(Reason.STORE_FULL):
                continue
            listing = self._unshared(self._look(model))
            if not listing.error and listing.size_bytes <= self.store.fs.free_bytes():
                log.info("%s: the store has room again; staging", model.name)
                self.apply(model, lifecycle.resume())

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
            try:
                self.apply(model, lifecycle.copied(model, generation.id, manifest.identities()))
                return
            except links.LinkError as failed:
                # Not remembered as a failed version: the next rescan tries it again.
                log.error("%s: staged, but %s", name, failed)
                self.generations.unpublish(name, generation)
                self.apply(
                    model,
                    lifecycle.refuse(model, Why(Reason.ERROR, str(failed)), source_exists=True),
                )
                return
        assert error is not None
        why = lifecycle.copy_failure(error)
        if why is not None and isinstance(error, (RamstageError, OSError)):
            log.error("%s: staging failed: %s", name, error)
        elif why is not None:
            log.error("%s: staging failed", name, exc_info=error)
        exists = self.reach.exists(model.source)
        now, cooldown = self.system.monotonic(), self.config.memory.effective_cooldown_seconds
        self.apply(
            model,
            lifecycle.copy_failed(model, why, job.identities, now, cooldown, source_exists=exists),
        )

    def heal_links(self) -> None:
        """Puts back links that someone removed or changed, or that an error left behind."""
        for model in self.models.values():
            generation = self.generations.current(model.name)
            expected = lifecycle.expected_link(
                model,
                generation.target if generation else None,
                source_exists=self.reach.exists(model.source),
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
                links.point(model.link, expected, relative=in_ram, step=self.system.step)
            else:
                links.remove(model.link, step=self.system.step)


def _another_snapshot(current: Path, expected: Path) -> bool:
    """A link on one snapshot of a hub repo whose source is now another (its ref moved)."""
    return current.parent == expected.parent and expected.parent.name == "snapshots"
