"""The model bench_gpu_tp.py loads: written as safetensors shards, staged by the daemon's copier."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

GiB = 1 << 30


def write_model(directory: Path, nbytes: int, files: int) -> None:
    """Layers of random bf16 bits (any bit pattern: the checks compare bytes) until nbytes;
    a model already written there is kept, so runs for other process counts reuse it."""
    from safetensors.torch import save_file

    if (directory / "model.safetensors.index.json").exists():
        return

    hidden, inner, vocab = (4096, 14336, 32768) if nbytes >= GiB else (256, 768, 1024)

    def bits(*shape: int) -> torch.Tensor:
        count = 2 * shape[0] * shape[1]
        return torch.randint(0, 256, (count,), dtype=torch.uint8).view(torch.bfloat16).view(shape)

    layer_bytes = 2 * (4 * hidden * hidden + 3 * hidden * inner) + 8 * hidden
    layers = max(files, (nbytes - 4 * vocab * hidden) // layer_bytes)
    per_file: list[list[int]] = [[] for _ in range(files)]
    for layer in range(layers):
        per_file[layer * files // layers].append(layer)
    weight_map = {}
    directory.mkdir(parents=True)
    for index, shard_layers in enumerate(per_file):
        state = {"embed.weight": bits(vocab, hidden)} if index == 0 else {}
        for layer in shard_layers:
            p = f"layers.{layer}."
            for name in ("q", "k", "v", "o"):
                state[p + f"attn.{name}.weight"] = bits(hidden, hidden)
            state[p + "mlp.up.weight"] = bits(inner, hidden)
            state[p + "mlp.gate.weight"] = bits(inner, hidden)
            state[p + "mlp.down.weight"] = bits(hidden, inner)
            state[p + "norm1.weight"] = torch.randn(hidden)
            state[p + "norm2.weight"] = torch.randn(hidden)
        if index == files - 1:
            state.update(
                {"norm.weight": torch.randn(hidden), "lm_head.weight": bits(vocab, hidden)}
            )
        file = f"model-{index + 1:05d}-of-{files:05d}.safetensors"
        save_file(state, directory / file)
        weight_map.update(dict.fromkeys(state, file))
    index_text = json.dumps({"metadata": {}, "weight_map": weight_map})
    (directory / "model.safetensors.index.json").write_text(index_text)


def stage(source: Path, work: Path, mount: bool) -> Path:
    """The model staged by the daemon's copier, into a tmpfs of its own when mount is set."""
    from ramstage.copier import stage_source

    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    if mount:
        size = int(sum(f.stat().st_size for f in source.iterdir()) * 1.1) + GiB
        options = f"size={size},huge=within_size"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "ramstage", store], check=True)
    generation = store / "model.gen"
    generation.mkdir()
    stage_source("model", source, generation, "xxh3")
    return generation / source.name  # a directory is staged under its own name
