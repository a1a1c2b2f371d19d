"""One process's part of a model in a job of several (tensor parallelism: one process per GPU).

    Shard(rank, world, dims={"*.o_proj.weight": 1, "*.q_proj.weight": 0})  # slices of tensors
    Shard(rank, world, files="balanced")                                   # whole shard files
    Shard.from_env(dims=0)                                 # rank and world from torchrun's env

A tensor split on dim d gives rank r what `tensor.tensor_split(world, d)[r]` holds, as a
contiguous tensor of its own: parts differ by at most one index, the first `size % world` ranks
having the longer ones (for sizes divisible by world: `narrow(d, r * size // world, size //
world)`). The slice is planned straight from the tensor's bytes in the file: where it is one
run of bytes (d == 0, or every dim before d of size 1) a rank reads only its part, else its rows
(see pipeline.Strided).
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ramstage.fastload.formats import Plan, Unmappable, flat_bytes, read_safetensors_header
from ramstage.fastload.pipeline import Segment, Strided
from ramstage.fastload.torchzip import FileMappings, TorchZip

# Which dim each tensor is split on, None: the whole tensor (norms, biases of row-parallel
# layers). An int applies to every tensor that has that dim; a mapping is {fnmatch pattern of
# the name: dim}, first match wins; a callable is given (name, shape).
DimRule = Union[
    int,
    Mapping[str, Optional[int]],
    Callable[[str, tuple[int, ...]], Optional[int]],
]
Parts = list[Union[Segment, Strided]]


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` processes: with `dims`, its slice of each tensor; with `files`,
    only some of a model directory's files, whole: "balanced" deals them out by size (every
    rank computes the same deal), any other string is a glob on the file names, formatted with
    {rank} and {world} first ("model-rank-{rank}-part-*.safetensors")."""

    rank: int
    world: int
    dims: DimRule | None = None
    files: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"Shard rank {self.rank}: must be in 0..{self.world - 1}")
        if self.dims is not None and self.files is not None:
            raise ValueError("Shard: give dims (slices of tensors) or files, not both")

    @classmethod
    def from_env(cls, dims: DimRule | None = None, files: str | None = None) -> Shard:
        """RANK and WORLD_SIZE, else LOCAL_RANK and LOCAL_WORLD_SIZE (torchrun sets all four);
        rank 0 of 1 where neither pair is set."""
        for rank_name, world_name in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
            rank, world = os.environ.get(rank_name, ""), os.environ.get(world_name, "")
            if rank.isdigit() and world.isdigit():
                return cls(int(rank), int(world), dims, files)
        return cls(0, 1, dims, files)

    def dim_for(self, name: str, shape: Sequence[int]) -> int | None:
        """The dim `name` is split on, in 0..len(shape)-1, or None for the whole tensor."""
        rule = self.dims
        if rule is None:
            return None
        if isinstance(rule, int):
            return rule % len(shape) if -len(shape) <= rule < len(shape) else None
        if callable(rule):
            dim = rule(name, tuple(shape))
        else:
            dim = next((d for p, d in rule.items() if fnmatch.fnmatchcase(name, p)), None)
        if dim is None:
            return None
        if not -len(shape) <= dim < len(shape):
            raise ValueError(f"Shard: tensor {name!r} of shape {list(shape)} has no dim {dim}")
        return dim % len(shape)

    def bounds(self, size: int) -> tuple[int, int]:
        """This rank's [start, stop) of `size`, as torch.tensor_split cuts it."""
        base, extra = divmod(size, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def pick_files(self, files: list[Path]) -> list[Path]:
        assert self.files is not None
        if self.files == "balanced":
            loads = [0] * self.world
            mine = []
            for file in sorted(files, key=lambda f: (-f.stat().st_size, f.name)):
                rank = min(range(self.world), key=lambda r: (loads[r], r))
                loads[rank] += file.stat().st_size
                if rank == self.rank:
                    mine.append(file)
            return sorted(mine)
        pattern = self.files.format(rank=self.rank, world=self.world)
        mine = [file for file in files if fnmatch.fnmatchcase(file.name, pattern)]
        if not mine:
            raise FileNotFoundError(f"no weight file matches {pattern!r} for rank {self.rank}")
        return mine


def plan_slice(
    source: Path,
    file_offset: int,
    dtype: torch.dtype,
    shape: Sequence[int],
    dim: int | None,
    shard: Shard,
    device: torch.device,
) -> tuple[torch.Tensor, Parts]:
    """An empty tensor for this rank's slice (dim None: all) of the contiguous tensor at
    file_offset, and the reads that fill it."""
    if dim is None:
        shape, dim, shard = [1, *shape], 0, Shard(0, 1)  # the whole tensor as one slice
        whole = plan_slice(source, file_offset, dtype, shape, dim, shard, device)
        return whole[0][0], whole[1]
    start, stop = shard.bounds(shape[dim])
    tensor = torch.empty(
        [*shape[:dim], stop - start, *shape[dim + 1 :]], dtype=dtype, device=device
    )
    if not tensor.numel():
        return tensor, []
    unit = math.prod(shape[dim + 1 :]) * dtype.itemsize  # bytes per index of dim
    rows, row_bytes, row_stride = math.prod(shape[:dim]), (stop - start) * unit, shape[dim] * unit
    target, offset = flat_bytes(tensor.untyped_storage()), file_offset + start * unit
    if rows == 1 or row_bytes == row_stride:
        return tensor, [Segment(str(source), offset, rows * row_bytes, target, 0)]
    return tensor, [Strided(str(source), offset, row_bytes, rows, row_stride, target, 0)]


def plan_safetensors_slices(path: Path, device: torch.device, shard: Shard) -> Plan:
    tensors: dict[str, torch.Tensor] = {}
    parts: Parts = []
    for entry in read_safetensors_header(path):
        dim = shard.dim_for(entry.name, entry.shape)
        tensors[entry.name], reads = plan_slice(
            path, entry.file_offset, entry.dtype, entry.shape, dim, shard, device
        )
        parts.extend(reads)
    return Plan(parts, lambda: tensors)


def plan_torch_zip_slices(path: Path, device: torch.device, shard: Shard) -> Plan:
    """A torch.save'd state dict, each tensor located in the file through torch's own mmap
    load (as plan_torch_zip does). Names that share one tensor (tied weights) share one slice."""
    checkpoint = TorchZip(path, copied=True)
    try:
        state = checkpoint.load(None, weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise Unmappable(f"torch.load(mmap=True) failed: {type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or not all(type(t) is torch.Tensor for t in state.values()):
        raise Unmappable("tensor slices are planned for state dicts (name -> tensor) only")
    mappings = FileMappings(path)
    tensors: dict[str, torch.Tensor] = {}
    parts: Parts = []
    planned: dict[tuple[Any, ...], torch.Tensor] = {}
    for name, value in state.items():
        if not value.is_contiguous():
            raise Unmappable(f"tensor {name!r} is a strided view; slices need contiguous tensors")
        dim = shard.dim_for(name, value.shape)
        offset = value.storage_offset() * value.element_size()
        if value.numel():
            offset += mappings.offset(value.untyped_storage())
        key = (offset, value.dtype, tuple(value.shape), dim)
        if key not in planned:
            planned[key], reads = plan_slice(
                path, offset, value.dtype, value.shape, dim, shard, device
            )
            parts.extend(reads)
        tensors[name] = planned[key]
    return Plan(parts, lambda: tensors)


def slice_loaded(result: Any, shard: Shard, *, copy: bool) -> Any:
    """The slices of a whole loaded state dict. copy=False keeps contiguous slices as views
    (of a CPU mapping: the file's pages), copy=True gives each its own storage."""
    if not isinstance(result, dict):
        kind = type(result).__name__
        raise TypeError(f"tensor slices need a state dict (name -> tensor), not a {kind}")
    sliced: dict[str, Any] = {}
    done: dict[tuple[Any, ...], torch.Tensor] = {}  # tied names keep sharing one slice
    for name, tensor in result.items():
        dim = shard.dim_for(name, tensor.shape)
        if dim is None:
            sliced[name] = tensor
            continue
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), dim)
        if key not in done:
            start, stop = shard.bounds(tensor.shape[dim])
            part = tensor.narrow(dim, start, stop - start)
            done[key] = (
                part.clone(memory_format=torch.contiguous_format) if copy else part.contiguous()
            )
        sliced[name] = done[key]
    return sliced
