"""The loaders bench_gpu_peers.py compares, each a factory of `load(path) -> {name: tensor}`.

Importing a loader's library happens in the factory, outside the timed load. Kept in its own
module so that the benchmark's fresh processes find these functions by import.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

DEVICE = "cuda:0"
Load = Callable[[str], Any]


def sync() -> None:
    torch.cuda.synchronize(DEVICE)


def fastload() -> Load:
    from ramstage import fastload

    return lambda path: fastload.load(path, DEVICE)


def _fsst_load(loader: Any, path: str) -> dict[str, Any]:
    loader.add_filenames({0: [path]})
    buffer = loader.copy_files_to_device()
    tensors = {name: buffer.get_tensor(name) for name in buffer.key_to_rank_lidx}
    buffer.close()  # owning tensors stay valid (fastsafetensors' file_buffer.py)
    return tensors


def fsst_new() -> Load:
    """fastsafetensors 0.5.0 without GDS, a new loader (default 16 MiB bounce buffer) per load."""
    from fastsafetensors import SafeTensorsFileLoader

    def load(path: str) -> dict[str, Any]:
        loader = SafeTensorsFileLoader(None, DEVICE, nogds=True)
        try:
            return _fsst_load(loader, path)
        finally:
            loader.close()

    return load


def fsst_kept() -> Load:
    """fastsafetensors with one loader kept across loads, bounce buffer from the environment.
    The loader is built by the first load, so that a fresh process's first call pays for it
    (its pinned bounce buffer above all), as fastload's first call pays for its ring."""
    from fastsafetensors import SafeTensorsFileLoader

    buffer_kib = int(os.environ["BENCH_FSST_BBUF_MIB"]) * 1024
    kept: list[Any] = []

    def load(path: str) -> dict[str, Any]:
        if not kept:
            kept.append(SafeTensorsFileLoader(None, DEVICE, nogds=True, bbuf_size_kb=buffer_kib))
        try:
            return _fsst_load(kept[0], path)
        finally:
            kept[0].reset()

    return load


def runai() -> Load:
    """runai-model-streamer 0.17.0 to host memory, each tensor then moved as vLLM does."""
    from runai_model_streamer import SafetensorsStreamer

    def load(path: str) -> dict[str, Any]:
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(path)
            return {name: t.to(DEVICE) for name, t in streamer.get_tensors()}

    return load


def load_file() -> Load:
    from safetensors.torch import load_file

    return lambda path: load_file(path, device=DEVICE)


def torch_load() -> Load:
    return lambda path: torch.load(path, map_location=DEVICE, weights_only=True)


LOADERS: dict[str, Callable[[], Load]] = {
    "fastload": fastload,
    "fsst-new": fsst_new,
    "fsst-kept": fsst_kept,
    "runai": runai,
    "load_file": load_file,
    "torch.load": torch_load,
}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-identical tensors with the same layout, and the same storage sharing, key by key."""
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if (x.dtype, x.shape, x.stride(), x.storage_offset(), x.device) != (
            y.dtype,
            y.shape,
            y.stride(),
            y.storage_offset(),
            y.device,
        ):
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    owner_a = {k: a[k].untyped_storage().data_ptr() for k in a}
    owner_b = {k: b[k].untyped_storage().data_ptr() for k in b}
    return all((owner_a[j] == owner_a[k]) == (owner_b[j] == owner_b[k]) for j in a for k in a)
