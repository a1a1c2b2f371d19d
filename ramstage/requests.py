"""Requests from the control socket and SIGHUP. stage, evict, verify and reload are decided and
applied in the loop's thread; the control thread waits for their outcome, and re-hashes the
generations `verify` names, which needs no lock since a generation is immutable.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any, Callable

from ramstage import lifecycle, policy
from ramstage.config import Config, load_config, trust_warnings
from ramstage.core import Core
from ramstage.digest import hash_file
from ramstage.errors import ConfigError, NotFound, RamstageError
from ramstage.model import (
    Await,
    Configure,
    Event,
    Model,
    Reload,
    Request,
    Sync,
    VerifyFailed,
    Work,
)
from ramstage.service import Notifier
from ramstage.store import Generation

log = logging.getLogger("ramstage")
REQUEST_TIMEOUT_SECONDS = 3600.0


class Requests:
    def __init__(
        self,
        core: Core,
        notifier: Notifier,
        post: Callable[[Event], None],
        status: Callable[[str | None], dict[str, Any]],
    ) -> None:
        self.core, self.notifier, self.post, self.status = core, notifier, post, status
        self.verifying: dict[str, Work] = {}  # written by control threads, read by status

    # ---- in the loop's thread ------------------------------------------------------------

    def handle(self, event: Request) -> None:
        try:
            event.future.set_result(self._request(event.cmd, event.args))
        except RamstageError as error:
            event.future.set_exception(error)
        except Exception as error:
            event.future.set_exception(RamstageError(f"internal error: {error}"))
            raise

    def _request(self, cmd: str, args: dict[str, Any]) -> Any:
        models = self.core.models
        names = args.get("names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RamstageError("names must be a list of model names")
        if cmd == "stage" and args.get("all"):
            names = list(models)
        unknown = [n for n in names if n not in models]
        if unknown:
            raise NotFound(f"no model named {', '.join(unknown)} in {self.core.config_path}")
        if cmd == "stage":
            return {name: self._stage(models[name]) for name in names}
        if cmd == "evict":
            for name in names:
                model = models[name]
                exists = self.core.reach.exists(model.source)
                self.core.apply(model, lifecycle.evict_requested(model, source_exists=exists))
                log.info("%s: evicted on request", name)
            return None
        if cmd == "verify":
            current = {n: self.core.generations.current(n) for n in names or list(models)}
            return {n: g for n, g in current.items() if g}
        raise RamstageError(f"unknown command {cmd}")

    def _stage(self, model: Model) -> Future[str | None]:
        waiter: Future[str | None] = Future()
        staged, actions = lifecycle.stage_requested(model)
        self.core.apply(model, actions)
        if staged:
            waiter.set_result(None)
        else:
            self.core.apply(model, [Await(waiter)])
        return waiter

    def reload(self, event: Reload) -> None:
        """All or nothing: an invalid config, or one that moves what cannot move while running,
        keeps the running one."""
        self.notifier.reloading()
        try:
            new = self._load()
        except ConfigError as error:
            log.error("reload refused, keeping the running config:\n%s", error)
            self.notifier.send("READY=1")
            if event.future:
                event.future.set_exception(error)
            return
        for problem in [*self.core.source_problems(new), *trust_warnings(new)]:
            log.warning("%s", problem)
        self._reconfigure(new)
        log.info("reloaded %s: %d models", self.core.config_path, len(self.core.models))
        self.notifier.send("READY=1")
        if event.future:
            event.future.set_result({"models": len(self.core.models)})

    def _load(self) -> Config:
        old, new = self.core.config, load_config(self.core.config_path)
        fixed = [
            key
            for key, old_value, new_value in (
                ("store", old.store, new.store),
                ("links_dir", old.links_dir, new.links_dir),
                ("socket", old.socket, new.socket),
            )
            if old_value != new_value
        ]
        if fixed:
            raise ConfigError(
                [f"{key}: cannot change while running; restart ramstage" for key in fixed]
            )
        return new

    def _reconfigure(self, new: Config) -> None:
        core = self.core
        configs = {m.name: m for m in new.models}
        plan = policy.reload_plan(
            {m.name: (m.origin, m.digest, m.validate) for m in core.config.models},
            {m.name: (m.origin, m.digest, m.validate) for m in new.models},
        )
        for name in plan.removed:
            core.remove(name)
            log.info("%s: removed from the config; link and RAM copy gone", name)
        for name in plan.added:
            model = core.add(configs[name])
            core.place(model, core.reach_source(model))
            log.info("%s: added", name)
        for name in plan.replaced:
            model = core.models[name]
            core.apply(model, [Configure(configs[name])])
            exists = core.reach_source(model) is None
            core.apply(model, lifecycle.source_replaced(model, source_exists=exists))
            log.info("%s: source changed to %s; staging again", name, model.source)
        for name in plan.kept:
            core.apply(core.models[name], [Configure(configs[name])])
        if new.memory != core.config.memory:
            core.relief.watch(new.memory)
        core.config = new
        core.actuator.configure(new.checksum, new.staging.workers)
        core.updates.configure(new.watch)

    # ---- in the control socket's threads -------------------------------------------------

    def answer(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "status":
            name = args.get("name")
            return self.status(name if isinstance(name, str) else None)
        future: Future[Any] = Future()
        self.post(Reload(future) if cmd == "reload" else Request(cmd, args, future))
        result = future.result(timeout=REQUEST_TIMEOUT_SECONDS)
        try:
            if cmd == "stage" and args.get("wait") is False:
                return {"staging": sorted(result)}
            if cmd == "stage":
                return self._staged(result)
            if cmd == "verify":
                return self._verify(result)
            return result
        finally:
            # The loop answers before it publishes what the request changed: wait for that,
            # so that whoever asks for status next sees the change.
            synced: Future[None] = Future()
            self.post(Sync(synced))
            synced.result(timeout=REQUEST_TIMEOUT_SECONDS)

    def _staged(self, waiters: dict[str, Future[str | None]]) -> dict[str, Any]:
        outcomes = {
            name: waiter.result(timeout=REQUEST_TIMEOUT_SECONDS) for name, waiter in waiters.items()
        }
        failed = {name: reason for name, reason in outcomes.items() if reason}
        if failed:
            raise RamstageError(
                "; ".join(f"{name}: not staged ({reason})" for name, reason in failed.items())
            )
        return {"staged": sorted(outcomes)}

    def _verify(self, generations: dict[str, Generation]) -> dict[str, Any]:
        """A generation deleted meanwhile is still readable through the descriptor opened here."""
        mismatched = [
            name
            for name, generation in generations.items()
            if not self._verify_one(name, generation)
        ]
        if mismatched:
            raise RamstageError(
                f"digest mismatch in RAM: {', '.join(mismatched)}; falling back and staging again"
            )
        return {"verified": sorted(generations)}

    def _verify_one(self, name: str, generation: Generation) -> bool:
        manifest = generation.manifest
        work = Work(self.core.system.monotonic(), 0, manifest.size_bytes)
        self.verifying[name] = work

        def done(nbytes: int) -> None:
            work.done_bytes += nbytes

        try:
            for staged_file, path in zip(manifest.files, generation.file_paths()):
                try:
                    actual = hash_file(path, manifest.algorithm, done)
                except FileNotFoundError:
                    continue  # replaced since: its successor was verified when it was made
                if actual != staged_file.digest:
                    self.post(VerifyFailed(name, generation.id))
                    return False
            return True
        finally:
            if self.verifying.get(name) is work:  # not a later verify of the same model
                del self.verifying[name]
