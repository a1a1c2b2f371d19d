"""fastload's part of a model for one process of several (tensor parallelism): every slice is
bit for bit what the plain loader's tensor gives through `tensor_split(world, dim)[rank]`.

As in test_fastload.py the pipeline runs with the CPU as its target (and on CUDA where there is
a GPU), through a tiny ring (8 KiB reads), so slices span chunks and rows are gathered in
several reads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from test_fastload import (
    DTYPES,
    assert_same,
    computed_offsets,
    file_mapped,
    rewritten_by_zipfile,
    sample,
    write_safetensors,
)

from ramstage import fastload
from ramstage.fastload import Shard, native, torchzip
from ramstage.fastload import pipeline as fastload_pipeline
from ramstage.fastload.pipeline import (
    MAX_GAP_BYTES,
    Chunk,
    Segment,
    Strided,
    gather_rows,
    plan_chunks,
    read_rows,
    split_rows,
)
from ramstage.fastload.shard import plan_safetensors_slices

pytestmark = pytest.mark.torch

THREADS, RING_BYTES = 3, 48 << 10
TARGETS = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> Iterator[tuple[fastload.Loader, Any]]:
    loader = fastload.Loader(pipeline_on_cpu=True)
    yield loader, torch.device(request.param)
    loader.release()


def load(target: tuple[fastload.Loader, Any], path: Path, shard: Shard) -> Any:
    loader, device = target
    return loader.load(path, device, threads=THREADS, ring_bytes=RING_BYTES, shard=shard)


def expected(state: dict[str, Any], shard: Shard, device: Any) -> dict[str, Any]:
    """The plain loader's tensors cut as the shard says, each contiguous on device."""
    want = {}
    for name, tensor in state.items():
        dim = shard.dim_for(name, tensor.shape)
        part = tensor if dim is None else tensor.tensor_split(shard.world, dim)[shard.rank]
        want[name] = part.clone(memory_format=torch.contiguous_format).to(device)
    return want


def slice_state(dtype: Any, seed: int) -> dict[str, Any]:
    """Shapes whose dims 0, 1 and 2 divide unevenly by 2, 3 and 4; one whose outer dim is 1."""
    return {
        "cube": sample(dtype, (5, 37, 11), seed=seed),
        "flat_outer": sample(dtype, (1, 23, 9), seed=seed + 1),
        "vector": sample(dtype, (7,), seed=seed + 2),
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_every_dtype_slices_like_the_plain_loader_and_tensor_split(
    target: Any, tmp_path: Path, world: int, dim: int
) -> None:
    state = {}
    for i, dtype in enumerate(DTYPES):
        state.update({f"{name}.{i}": t for name, t in slice_state(dtype, seed=3 * i).items()})
    path = write_safetensors(tmp_path / "all.safetensors", state)
    for rank in range(world):
        shard = Shard(rank, world, dims=dim)
        assert_same(load(target, path, shard), expected(state, shard, target[1]), f"rank {rank}")


def test_uneven_sizes_give_the_first_ranks_one_more_and_can_be_empty(
    target: Any, tmp_path: Path
) -> None:
    state = {"five": sample(torch.float32, (5, 3)), "three": sample(torch.int64, (3, 2), seed=1)}
    path = write_safetensors(tmp_path / "uneven.safetensors", state)
    rows = [
        [tuple(t.shape) for t in load(target, path, Shard(rank, 4, dims=0)).values()]
        for rank in range(4)
    ]
    assert rows == [[(2, 3), (1, 2)], [(1, 3), (1, 2)], [(1, 3), (1, 2)], [(1, 3), (0, 2)]]
    for rank in range(4):
        shard = Shard(rank, 4, dims=0)
        assert_same(load(target, path, shard), expected(state, shard, target[1]))


@pytest.mark.parametrize(
    ("size", "world", "parts"),
    [
        (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
        (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
        (2, 3, [(0, 1), (1, 2), (2, 2)]),
        (0, 2, [(0, 0), (0, 0)]),
        (7, 1, [(0, 7)]),
    ],
)
def test_bounds_are_tensor_splits(size: int, world: int, parts: list[tuple[int, int]]) -> None:
    assert [Shard(rank, world).bounds(size) for rank in range(world)] == parts
    pieces = torch.arange(size).tensor_split(world)
    assert [(int(p[0]), int(p[-1]) + 1) for p in pieces if p.numel()] == [
        p for p in parts if p[0] != p[1]
    ]


def test_library_written_safetensors_match_load_file_then_narrow(
    target: Any, tmp_path: Path
) -> None:
    st = pytest.importorskip("safetensors.torch")
    state = {f"w{i}": sample(dtype, (64, 33 + i), seed=i) for i, dtype in enumerate(DTYPES)}
    st.save_file(state, tmp_path / "lib.safetensors")
    plain = st.load_file(tmp_path / "lib.safetensors")
    for dims in (0, 1):
        for rank in range(3):
            shard = Shard(rank, 3, dims=dims)
            got = load(target, tmp_path / "lib.safetensors", shard)
            assert_same(
                dict(sorted(got.items())), expected(dict(sorted(plain.items())), shard, target[1])
            )


def test_dim_rules_by_pattern_callable_and_int() -> None:
    by_name = Shard(0, 2, dims={"*.down.weight": 1, "*.weight": 0, "*.bias": None})
    assert by_name.dim_for("l0.down.weight", (4, 6)) == 1  # first match wins
    assert by_name.dim_for("l0.up.weight", (4, 6)) == 0
    assert by_name.dim_for("l0.up.bias", (4,)) is None
    assert by_name.dim_for("norm", (4,)) is None  # no pattern: the whole tensor
    assert Shard(0, 2, dims=lambda name, shape: len(shape) - 1).dim_for("x", (2, 3)) == 1
    assert Shard(0, 2, dims=1).dim_for("bias", (4,)) is None  # an int skips smaller tensors
    assert Shard(0, 2, dims=-1).dim_for("w", (4, 5, 6)) == 2
    with pytest.raises(ValueError, match="no dim 2"):
        Shard(0, 2, dims={"w": 2}).dim_for("w", (4, 5))
    with pytest.raises(ValueError, match="rank 2"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="not both"):
        Shard(0, 2, dims=0, files="balanced")


@pytest.mark.parametrize(
    ("env", "rank_world"),
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, (3, 8)),
        ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, (1, 4)),
        ({}, (0, 1)),
    ],
)
def test_rank_and_world_come_from_torchruns_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank_world: tuple[int, int]
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shard = Shard.from_env(dims=0)
    assert (shard.rank, shard.world, shard.dims) == (*rank_world, 0)


def test_a_contiguous_slice_is_read_alone_and_an_inner_one_by_its_rows(tmp_path: Path) -> None:
    state = {"rows": sample(torch.float16, (8, 6)), "cols": sample(torch.float16, (8, 6), seed=1)}
    path = write_safetensors(tmp_path / "m.safetensors", state)
    header = len(path.read_bytes()) - 2 * 8 * 6 * 2
    shard = Shard(1, 2, dims={"rows": 0, "cols": 1})
    reads = plan_safetensors_slices(path, torch.device("cpu"), shard).segments
    rows, cols = reads
    assert isinstance(rows, Segment) and (rows.file_offset, rows.nbytes) == (header + 48, 48)
    assert isinstance(cols, Strided)
    assert (cols.file_offset, cols.row_bytes, cols.rows, cols.row_stride) == (
        header + 96 + 6,
        6,
        8,
        12,
    )


def test_rows_are_gathered_a_slot_at_a_time_and_long_ones_read_alone() -> None:
    out = torch.empty(0, dtype=torch.uint8)
    segments, gathered = split_rows(
        [
            Strided("f", 100, 3000, 5, 12000, out, 0),  # two rows per 8 KiB slot
            Strided("g", 0, 10, 2, 10 + MAX_GAP_BYTES + 1, out, 0),  # gap too long to read
            Strided("h", 0, 9000, 2, 18000, out, 0),  # rows longer than a slot
        ],
        chunk_bytes=8192,
    )
    chunks = plan_chunks(segments, 8192) + gathered
    got = [(c.source, c.file_offset, c.nbytes, c.row_bytes, c.row_stride) for c in chunks]
    assert got == [
        ("g", 0, 10, 0, 0),
        ("g", 10 + MAX_GAP_BYTES + 1, 10, 0, 0),
        ("h", 0, 8192, 0, 0),
        ("h", 8192, 808, 0, 0),
        ("h", 18000, 8192, 0, 0),
        ("h", 26192, 808, 0, 0),
        ("f", 100, 6000, 3000, 12000),
        ("f", 24100, 6000, 3000, 12000),
        ("f", 48100, 3000, 3000, 12000),
    ]
    assert [p.target_offset for c in chunks[-3:] for p in c.pieces] == [0, 6000, 12000]


def test_rows_land_side_by_side_whether_read_or_gathered(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    data = bytes(range(256)) * 40
    (tmp_path / "f").write_bytes(data)
    rows, chunk = 1000, Chunk("f", 5, 3000, (), 3, 10)  # 1000 rows: several preadv calls
    want = b"".join(data[5 + 10 * i : 8 + 10 * i] for i in range(rows))
    read, gathered = memoryview(bytearray(3000)), memoryview(bytearray(3000))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        read_rows(fd, read, chunk, memoryview(bytearray(64)))
    finally:
        os.close(fd)
    gather_rows(np.frombuffer(data, np.uint8), gathered, chunk)
    assert bytes(read) == want and bytes(gathered) == want


@pytest.mark.parametrize("numpy_there", [True, False])
def test_rows_are_gathered_from_the_mapping_or_read_by_their_covering_range(
    target: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, numpy_there: bool
) -> None:
    pytest.importorskip("numpy")
    state = {"w": sample(torch.bfloat16, (64, 40)), "b": sample(torch.int32, (3, 50, 7), seed=1)}
    path = write_safetensors(tmp_path / "m.safetensors", state)

    def refuse(*args: Any) -> None:
        raise AssertionError("read_rows used although numpy is there")

    if numpy_there:
        monkeypatch.setattr(fastload_pipeline, "read_rows", refuse)
    else:
        monkeypatch.setattr(fastload_pipeline, "numpy", None)
    for rank in range(3):
        shard = Shard(rank, 3, dims=1)
        assert_same(load(target, path, shard), expected(state, shard, target[1]))


def test_long_rows_are_read_row_by_row_through_the_loader(target: Any, tmp_path: Path) -> None:
    state = {"wide": sample(torch.uint8, (3, 4, 5000)), "tall": sample(torch.int32, (2, 9, 700))}
    path = write_safetensors(tmp_path / "wide.safetensors", state)
    for rank in range(2):
        shard = Shard(rank, 2, dims=1)
        assert_same(load(target, path, shard), expected(state, shard, target[1]))


def test_tied_weights_in_a_torch_checkpoint_stay_tied_in_their_slices(
    target: Any, tmp_path: Path
) -> None:
    weight = sample(torch.bfloat16, (30, 20))
    state = {"embed": weight, "lm_head": weight, "bias": sample(torch.float32, (20,), seed=1)}
    torch.save(state, tmp_path / "tied.pt")
    plain = torch.load(tmp_path / "tied.pt")
    for dims in (0, 1):
        for rank in range(3):
            shard = Shard(rank, 3, dims={"embed": dims, "lm_head": dims})
            got = load(target, tmp_path / "tied.pt", shard)
            assert_same(got, expected(plain, shard, target[1]))
            assert got["embed"].data_ptr() == got["lm_head"].data_ptr()


def test_a_checkpoint_rewritten_by_another_zip_tool_slices_from_its_real_offsets(
    target: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torchzip, "SMALL_BUFFER_BYTES", 0)  # offsets computed, as on huge pages
    computed = computed_offsets(monkeypatch)
    state = {"a": sample(torch.bfloat16, (9, 7)), "b": sample(torch.float32, (3, 5), seed=1)}
    torch.save(state, tmp_path / "a.pt")
    path = rewritten_by_zipfile(tmp_path / "a.pt")
    for rank in range(2):
        shard = Shard(rank, 2, dims=0)
        with caplog.at_level(logging.DEBUG, logger="ramstage.fastload"):
            assert_same(load(target, path, shard), expected(state, shard, target[1]))
    assert "plain loader" not in caplog.text and True in computed
    assert "reading each record's header" in caplog.text


def test_a_strided_view_in_a_checkpoint_falls_back_and_still_slices(
    target: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weight = sample(torch.float32, (12, 10))
    torch.save({"w": weight, "wt": weight.t()}, tmp_path / "view.pt")
    shard = Shard(1, 2, dims=0)
    with caplog.at_level(logging.INFO, logger="ramstage.fastload"):
        got = load(target, tmp_path / "view.pt", shard)
    plain = torch.load(tmp_path / "view.pt")
    assert_same(got, expected(plain, shard, target[1]))
    assert "strided view" in caplog.text


def test_the_legacy_format_falls_back_with_sliced_results(target: Any, tmp_path: Path) -> None:
    state = {"a": sample(torch.float64, (9, 4)), "b": sample(torch.int8, (4, 9), seed=2)}
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for rank in range(2):
        shard = Shard(rank, 2, dims=1)
        assert_same(load(target, tmp_path / "old.pt", shard), expected(state, shard, target[1]))


def test_slices_need_a_state_dict(target: Any, tmp_path: Path) -> None:
    torch.save([torch.ones(4)], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="state dict"):
        load(target, tmp_path / "list.pt", Shard(0, 2, dims=0))


def test_on_the_cpu_slices_map_the_files_pages(tmp_path: Path) -> None:
    state = {"w": sample(torch.float32, (16, 64)), "v": sample(torch.int16, (16, 64), seed=1)}
    path = write_safetensors(tmp_path / "m.safetensors", state)
    shard = Shard(1, 4, dims={"w": 0, "v": 1})
    got = fastload.load(path, "cpu", shard=shard)
    for name, want in expected(state, shard, "cpu").items():
        assert got[name].is_contiguous() and torch.equal(got[name], want), name
    assert file_mapped(got["w"], path)  # a dim 0 slice is the staged pages, not a copy


def write_shards(directory: Path, sizes: list[int]) -> dict[str, dict[str, Any]]:
    directory.mkdir()
    shards = {}
    for s, size in enumerate(sizes):
        name = f"model-{s:05d}.safetensors"
        shards[name] = {f"s{s}.t{i}": sample(DTYPES[i], (size, 3), seed=s + i) for i in range(2)}
        write_safetensors(directory / name, shards[name])
    return shards


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_balanced_files_give_every_rank_whole_files_once(
    target: Any, tmp_path: Path, world: int
) -> None:
    shards = write_shards(tmp_path / "model", [50, 10, 40, 20, 30])
    seen: list[str] = []
    for rank in range(world):
        got = load(target, tmp_path / "model", Shard(rank, world, files="balanced"))
        mine = {name for name, shard in shards.items() if next(iter(shard)) in got}
        want = {k: t.to(target[1]) for name in sorted(mine) for k, t in shards[name].items()}
        assert_same(got, want)
        seen.extend(mine)
    assert sorted(seen) == sorted(shards)
    if world == 2:  # sizes 50+20+... dealt largest first to the lighter rank
        first = load(target, tmp_path / "model", Shard(0, 2, files="balanced"))
        assert {k.split(".")[0] for k in first} == {"s0", "s3", "s1"}


def test_files_by_pattern_pick_a_ranks_own_files(target: Any, tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    directory.mkdir()
    parts = {}
    for rank in range(2):
        for part in range(2):
            name = f"model-rank-{rank}-part-{part}.safetensors"
            parts[name] = {f"r{rank}p{part}": sample(torch.float16, (4, 4), seed=rank * 2 + part)}
            write_safetensors(directory / name, parts[name])
    got = load(target, directory, Shard(1, 2, files="model-rank-{rank}-part-*.safetensors"))
    assert_same(
        got,
        {k: t.to(target[1]) for n in sorted(parts) if "rank-1" in n for k, t in parts[n].items()},
    )
    with pytest.raises(FileNotFoundError, match="rank-5"):
        load(target, directory, Shard(0, 1, files="model-rank-5-*.safetensors"))
    with pytest.raises(ValueError, match="model directory"):
        load(target, directory / "model-rank-0-part-0.safetensors", Shard(0, 2, files="balanced"))


def test_the_ring_follows_the_threads_shared_by_the_processes_of_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert fastload.default_threads() == 4
    loader = fastload.Loader(pipeline_on_cpu=True)
    torch.save({"a": torch.ones(10)}, tmp_path / "a.pt")
    loader.load(tmp_path / "a.pt", "cpu")
    assert loader._ring is not None
    assert (loader._ring.threads, loader._ring.ring_bytes) == (4, fastload.default_ring_bytes(4))
    loader.release()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(native, "available", lambda: True)  # the C loop: 4 MiB reads
    assert fastload.default_ring_bytes(4) == 32 << 20
    assert fastload.default_ring_bytes(fastload.default_threads()) == 128 << 20
    assert fastload.default_ring_bytes(64) == 128 << 20  # more threads share the measured ring
    monkeypatch.setattr(native, "available", lambda: False)  # the Python loop: 8 MiB reads
    assert fastload.default_ring_bytes(16) == fastload.default_ring_bytes(64) == 256 << 20


RANK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from ramstage import fastload
    loader = fastload.Loader(pipeline_on_cpu=True)
    shard = fastload.Shard.from_env(dims={"*.col": 1, "*.row": 0})
    got = loader.load(sys.argv[1], "cpu", shard=shard)
    torch.save({"threads": loader._ring.threads, "state": got}, sys.argv[2])
    """
)


def test_four_processes_load_their_slices_of_one_file_at_once(tmp_path: Path) -> None:
    state = {}
    for i, dtype in enumerate(DTYPES):
        state[f"l{i}.col"] = sample(dtype, (40, 53), seed=i)
        state[f"l{i}.row"] = sample(dtype, (53, 40), seed=i + 50)
        state[f"l{i}.norm"] = sample(dtype, (40,), seed=i + 100)
    path = write_safetensors(tmp_path / "model.safetensors", state)
    procs = []
    for rank in range(4):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
        out = tmp_path / f"rank{rank}.pt"
        command = [sys.executable, "-c", RANK_SCRIPT, str(path), str(out)]
        procs.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(4)]
    for rank, result in enumerate(results):
        shard = Shard(rank, 4, dims={"*.col": 1, "*.row": 0})
        assert_same(result["state"], expected(state, shard, "cpu"), f"rank {rank}")
        assert result["threads"] == max(1, len(os.sched_getaffinity(0)) // 4)
    for name, tensor in state.items():
        dim = {"col": 1, "row": 0}.get(name.split(".")[1])
        parts = [r["state"][name] for r in results]
        whole = parts[0] if dim is None else torch.cat(parts, dim)
        assert torch.equal(whole.view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8))


def test_meta_device_falls_back_with_sliced_shapes(tmp_path: Path) -> None:
    torch.save({"a": torch.randn(10, 3)}, tmp_path / "a.pt")
    got = fastload.load(tmp_path / "a.pt", "meta", shard=Shard(3, 4, dims=0))
    assert got["a"].device.type == "meta" and got["a"].shape == (2, 3)


def test_an_index_json_directory_slices_every_shard(target: Any, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "model", [9, 7])
    weight_map = {k: name for name, shard in shards.items() for k in shard}
    (tmp_path / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    merged = {k: t for shard in shards.values() for k, t in shard.items()}
    for rank in range(3):
        shard = Shard(rank, 3, dims=0)
        got = load(target, tmp_path / "model", shard)
        assert_same(
            dict(sorted(got.items())), dict(sorted(expected(merged, shard, target[1]).items()))
        )


def test_client_load_by_path_takes_a_shard(tmp_path: Path) -> None:
    from ramstage import client

    state = {"w": sample(torch.bfloat16, (6, 10)), "b": sample(torch.float32, (10,), seed=1)}
    write_safetensors(tmp_path / "m.safetensors", state)
    torch.save(state, tmp_path / "m.pt")
    shard = Shard(1, 2, dims={"w": 1})
    for name in ("m.safetensors", "m.pt"):
        got = client.load(str(tmp_path / name), shard=shard, mmap=False)
        for key, want in expected(state, shard, "cpu").items():
            assert torch.equal(got[key], want), (name, key)
