"""`status --json`: a snapshot the loop takes of its models, and the answer built from it.

The loop publishes a fresh snapshot after every event; the control thread answers from the
latest one, adding what is cheap to read fresh (store usage, memory, who holds which file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ramstage import __version__, links
from ramstage.errors import NotFound
from ramstage.relief import MemoryGuard
from ramstage.state import Model
from ramstage.store import Store
from ramstage.system import System
from ramstage.users import holders


def model_entry(model: Model, guard: MemoryGuard) -> dict[str, Any]:
    """One model as the loop sees it; keys starting with "_" are for render() only."""
    generation = model.generation
    return {
        "name": model.config.name,
        "state": model.state,
        "link": str(model.link),
        "target": links.read(model.link),
        "source": str(model.config.source),
        "size_bytes": generation.manifest.size_bytes if generation else None,
        "digest": generation.manifest.digest if generation else None,
        "generation": generation.id if generation else None,
        "reason": model.reason,
        "progress": 1.0 if model.state == "staged" else (model.job.progress if model.job else 0.0),
        "priority": model.config.priority,
        **guard.fields(model),
        "skipped": list(generation.manifest.skipped) if generation else [],
        "_current": generation.file_keys if generation else {},
        # Swapped-out generations still in their grace period count like unlinked ones:
        # the link no longer points at them, so whoever holds them pins their bytes.
        "_retired": {
            **model.retired,
            **{k: v for _, g in model.outgoing for k, v in g.file_keys.items()},
        },
    }


def render(
    models: list[dict[str, Any]],
    name: str | None,
    *,
    store: Store,
    system: System,
    memory: Callable[[int], dict[str, Any]],
    config_path: Path,
) -> dict[str, Any]:
    """Runs in the control thread: the snapshot's models plus fresh readings."""
    if name is not None:
        models = [m for m in models if m["name"] == name]
        if not models:
            raise NotFound(f"no model named {name} in {config_path}")
    wanted = {k for m in models for k in [*m["_current"], *m["_retired"]]}
    held = holders(system.proc, wanted)
    size, used = store.usage()
    result = []
    for m in models:
        public = {k: v for k, v in m.items() if not k.startswith("_")}
        pinned = {k: v for k, v in m["_retired"].items() if k in held}
        users = set().union(*(held[k] for k in [*m["_current"], *pinned] if k in held))
        public["pinned_bytes"] = sum(pinned.values())
        public["users"] = sorted(users)
        result.append(public)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "store": {
            "path": str(store.path),
            "mounted": store.mounted,
            "size_bytes": size,
            "used_bytes": used,
            "swappable": store.swappable,
        },
        "memory": memory(sum(m["pinned_bytes"] for m in result)),
        "models": result,
    }
