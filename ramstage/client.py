"""For applications: find a model's link, wait until it is in RAM, load it with torch.

torch is imported inside the functions that need it, so `resolve` and `wait_staged` work in
processes without torch, and importing ramstage never pulls torch in.

    from ramstage import client
    state_dict = client.load("lama")          # through /run/ramstage/models/lama, mmap=True
    state_dict = client.load("/run/ramstage/models/sd15/unet.safetensors", device="cuda:0")
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ramstage import units
from ramstage.checkpoint import Kind, kind_of
from ramstage.config import config_path, load_config
from ramstage.errors import ConfigError, NotFound, NotRunning, RamstageError
from ramstage.protocol import request

if TYPE_CHECKING:
    from ramstage.fastload.shard import Shard

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


def load(
    model: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    mmap: bool = True,
    weights_only: bool = True,
    device: str | None = None,
    file: str | None = None,
    config: str | os.PathLike[str] | None = None,
    shard: Shard | None = None,
) -> Any:
    """Loads a model by name (through its link) or by path: a torch checkpoint, a .safetensors
    file or a model directory (one dict of every shard's tensors).

    On the CPU (no `device`, or "cpu") the tensors map the file's pages instead of copying
    them (mmap=True, the default), so every process loading the model shares one copy; this
    holds for .safetensors and directories too. `map_location` and `weights_only` are
    torch.load's, for torch files. `device="cuda:N"` goes to ramstage.fastload, which streams
    the file into GPU memory. `file` picks a file inside a directory model
    (`unet/diffusion_pytorch_model.bin`). `shard` (ramstage.fastload.Shard) loads one
    process's part of the model: its slice of each tensor, or its share of the files."""

    def load_target() -> Any:
        target = _target(model, file, config)
        if device is not None and device != "cpu":
            from ramstage.fastload import load as fast_load

            return fast_load(target, device, shard=shard)
        if _maps_on_cpu(target) or shard is not None:
            from ramstage.fastload import load as fast_load

            if map_location != "cpu":
                raise ValueError(f"{target}: map_location is torch.load's; use device= for GPUs")
            mapped = fast_load(target, "cpu", shard=shard)
            return mapped if mmap else {name: t.clone() for name, t in mapped.items()}
        import torch

        return torch.load(target, map_location=map_location, mmap=mmap, weights_only=weights_only)

    try:
        return load_target()
    except FileNotFoundError:
        # The generation was replaced and deleted between resolving and opening: once more.
        return load_target()


def _target(
    model: str | os.PathLike[str], file: str | None, config: str | os.PathLike[str] | None
) -> Path:
    """The file behind a model name's link or a path, resolved once. torch.load(mmap=True)
    opens the path twice (the zip reader, then the storage mapping); if the link flipped
    between the two opens they would read different generations. A generation never changes,
    so its real path is safe.

    A str without a slash is a model name when the config has one by that name, else a path
    if one exists there; anything with a slash, and any os.PathLike, is a path."""
    base: Path
    if isinstance(model, str) and os.sep not in model:
        try:
            base = resolve(model, config=config)
        except (NotFound, ConfigError) as error:
            if not os.path.exists(model):
                raise NotFound(f"{error.message}, and there is no file {model!r} either") from None
            base = Path(model)
    else:
        base = Path(model)
    return Path(os.path.realpath(base / file if file else base))


def _maps_on_cpu(target: Path) -> bool:
    """Safetensors files and model directories, which torch.load cannot read, are mapped by
    ramstage.fastload on the CPU."""
    return target.is_dir() or kind_of(target) is Kind.SAFETENSORS


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
            if staged(model):
                return model  # type: ignore[no-any-return]
            last = f"{model['state']} {model['progress']:.0%}"
        if time.monotonic() >= deadline:
            raise RamstageError(f"{name} was not staged within {timeout:g}s (last: {last})")
        time.sleep(POLL_SECONDS)


def staged(model: dict[str, Any]) -> bool:
    """True once a status entry says staged; raises NotStaged when it will not be without a
    change (fallback or missing), with the reason and its figures."""
    if model["state"] == "staged":
        return True
    if model["state"] in ("fallback", "missing"):
        reason = units.reason(model["reason"], model.get("reason_figures"))
        raise NotStaged(f"{model['name']} is not staged ({model['state']}): {reason}")
    return False
