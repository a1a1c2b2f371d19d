"""For applications: find a model's link, wait until it is in RAM, load it with torch.

torch is imported inside the functions that need it, so `resolve` and `wait_staged` work in
processes without torch, and importing ramstage never pulls torch in.

    from ramstage import client
    state_dict = client.load("lama")          # through /run/ramstage/models/lama, mmap=True
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ramstage.config import config_path, load_config
from ramstage.errors import NotFound, NotRunning, RamstageError
from ramstage.protocol import request

POLL_SECONDS = 0.2
STATUS_TIMEOUT_SECONDS = 10.0


class NotStaged(RamstageError):
    """The model is not in RAM and will not be without a change (its reason says which)."""


def resolve(name: str, *, config: str | os.PathLike[str] | None = None) -> Path:
    """The link path for `name`, from the config alone: no daemon needed, nothing is opened.
    `config` defaults to $RAMSTAGE_CONFIG, then /etc/ramstage/ramstage.yaml."""
    path = config_path(config)
    loaded = load_config(path)
    if loaded.model(name) is None:
        raise NotFound(f"no model named {name} in {path}")
    return loaded.links_dir / name


def _target(link: Path, file: str | None) -> str:
    """The file behind the link, resolved once. torch.load(mmap=True) opens the path twice
    (the zip reader, then the storage mapping); if the link flipped between the two opens they
    would read different generations. A generation never changes, so its real path is safe."""
    return os.path.realpath(link / file if file else link)


def load(
    name: str,
    *,
    map_location: Any = "cpu",
    mmap: bool = True,
    weights_only: bool = True,
    device: str | None = None,
    file: str | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Any:
    """torch.load through the link. With mmap=True (the default) the tensors map the tmpfs
    pages, so every process loading the model shares one copy instead of holding its own.
    `device="cuda:N"` goes to ramstage.fastload, which streams the file into GPU memory.
    `file` picks a file inside a directory model (`unet/diffusion_pytorch_model.bin`)."""
    link = resolve(name, config=config)
    if device is not None and device != "cpu":
        from ramstage.fastload import load as fast_load

        return fast_load(Path(_target(link, file)), device)
    import torch

    def load_target() -> Any:
        return torch.load(
            _target(link, file), map_location=map_location, mmap=mmap, weights_only=weights_only
        )

    try:
        return load_target()
    except FileNotFoundError:
        # The generation was replaced and deleted between resolving and opening: once more.
        return load_target()


def release() -> None:
    """Frees what ramstage.fastload keeps between GPU loads (its pinned staging buffers)."""
    from ramstage.fastload import release as fast_release

    fast_release()


def wait_staged(
    name: str, timeout: float, *, config: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Waits until the daemon reports `name` staged and returns its status entry. Raises
    NotStaged at once if it is in fallback or missing (with the daemon's reason), or
    RamstageError after `timeout` seconds; a daemon not started yet is waited for too."""
    socket = load_config(config_path(config)).socket
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            status = request(socket, "status", name=name, timeout=STATUS_TIMEOUT_SECONDS)
        except NotRunning as error:
            last = error.message
        else:
            model = status["models"][0]
            if model["state"] == "staged":
                return model  # type: ignore[no-any-return]
            if model["state"] in ("fallback", "missing"):
                raise NotStaged(f"{name} is not staged ({model['state']}): {model['reason']}")
            last = f"{model['state']} {model['progress']:.0%}"
        if time.monotonic() >= deadline:
            raise RamstageError(f"{name} was not staged within {timeout:g}s (last: {last})")
        time.sleep(POLL_SECONDS)
