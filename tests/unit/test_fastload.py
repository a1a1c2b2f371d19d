"""fastload gives what the plain loaders give, bit for bit, through its threaded ring pipeline.

Without a GPU the pipeline runs with the CPU as its target (no page-locking, no stream); with
one, every test runs on CUDA too. A tiny ring (48 KiB: six 8 KiB slots for three threads)
makes every checkpoint here span many chunks, split tensors across slots and wrap the ring
many times.
"""

from __future__ import annotations

import json
import logging
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ramstage import fastload
from ramstage.fastload import native, torchzip
from ramstage.fastload.pipeline import Segment, plan_chunks

pytestmark = pytest.mark.torch

THREADS, RING_BYTES = 3, 48 << 10
TARGETS = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
ST_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}


@pytest.fixture(params=[(device, loop) for device in TARGETS for loop in ("C", "Python")])
def target(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[fastload.Loader, Any]]:
    """A loader on each device, its ring copying with the C loop (where it was built) or the
    Python one."""
    device, loop = request.param
    if loop == "Python":
        monkeypatch.setattr(native, "LIBRARY", None)
    elif native.LIBRARY is None:
        pytest.skip("the C copy loop was not built (no C compiler at install)")
    else:
        made = native.copy_loop

        def copy_loop(*args: Any) -> Any:
            got = made(*args)
            assert got is not None, "the ring fell back to the Python loop"
            return got

        monkeypatch.setattr(native, "copy_loop", copy_loop)
    loader = fastload.Loader(pipeline_on_cpu=True)
    yield loader, torch.device(device)
    loader.release()


def load(target: tuple[fastload.Loader, Any], path: Path) -> Any:
    loader, device = target
    return loader.load(path, device, threads=THREADS, ring_bytes=RING_BYTES)


def sample(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


def bits(tensor: Any) -> Any:
    return tensor.detach().cpu().reshape(-1).view(torch.uint8)


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Same structure; tensors bit-identical with the same type, dtype, device and layout."""
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device), where
        if want.is_sparse:
            assert torch.equal(got.to_dense(), want.to_dense()), where
            return
        assert (got.stride(), got.storage_offset()) == (want.stride(), want.storage_offset()), where
        assert torch.equal(bits(got), bits(want)), where
        assert got.requires_grad == want.requires_grad, where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def storage_groups(state: dict[str, Any]) -> list[set[str]]:
    """Which names share one storage, as a comparable list of sets."""
    groups: dict[int, set[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(tensor.untyped_storage().data_ptr(), set()).add(name)
    return sorted(groups.values(), key=sorted)


def write_safetensors(path: Path, tensors: dict[str, Any]) -> Path:
    """The safetensors layout written by hand: u64 LE header length, JSON header, raw data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": ST_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def test_every_dtype_round_trips_from_a_torch_checkpoint(target: Any, tmp_path: Path) -> None:
    state = {str(dtype): sample(dtype, (37, 129), seed=i) for i, dtype in enumerate(DTYPES)}
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0, 4)
    torch.save(state, tmp_path / "all.pth")
    assert_same(
        load(target, tmp_path / "all.pth"), torch.load(tmp_path / "all.pth", map_location=target[1])
    )


def test_every_dtype_round_trips_from_safetensors(target: Any, tmp_path: Path) -> None:
    state = {str(dtype): sample(dtype, (41, 97), seed=i) for i, dtype in enumerate(DTYPES)}
    state["empty"] = torch.empty(0, dtype=torch.int32)
    got = load(target, write_safetensors(tmp_path / "all.safetensors", state))
    assert_same(got, {name: t.to(target[1]) for name, t in state.items()})


def test_safetensors_written_by_the_library_match_its_loader(target: Any, tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    state = {f"w{i}": sample(dtype, (64, 33 + i), seed=i) for i, dtype in enumerate(DTYPES)}
    st.save_file(state, tmp_path / "lib.safetensors")
    want = st.load_file(tmp_path / "lib.safetensors", device=str(target[1]))
    got = load(target, tmp_path / "lib.safetensors")
    assert_same(dict(sorted(got.items())), dict(sorted(want.items())))


def test_tied_weights_views_and_strides_keep_their_storage_layout(
    target: Any, tmp_path: Path
) -> None:
    weight = torch.randn(300, 200)
    ints = torch.arange(50_000, dtype=torch.int64)
    state = OrderedDict(
        weight=weight,
        tied=weight,
        transposed=weight.t(),
        rows=weight[10:20],
        strided=weight[5:250:7, 3::11],
        ints=ints[1000:],
        ints_2d=ints[7 : 7 + 600].view(20, 30),
        bias=torch.randn(200),
    )
    torch.save(state, tmp_path / "tied.pt")
    got = load(target, tmp_path / "tied.pt")
    want = torch.load(tmp_path / "tied.pt", map_location=target[1])
    assert_same(got, want)
    assert storage_groups(got) == storage_groups(want)
    assert {"weight", "tied", "transposed", "rows", "strided"} in storage_groups(got)


def rewritten_by_zipfile(path: Path, compression: int = zipfile.ZIP_STORED) -> Path:
    """The same records rewritten by Python's zipfile: no alignment padding and no data
    descriptors, so each record lies elsewhere than torch's own writer would put it."""
    out = path.with_name(f"rewritten-{path.name}")
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(out, "w", compression) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    return out


def rewritten_by_torch(path: Path, order: Any = None, pickled: Any = None) -> Path:
    """The records rewritten by torch's own zip writer (its padding and data descriptors), in
    the order `order` gives the names, with the pickle changed by `pickled`."""
    out = path.with_name(f"torch-{path.name}")
    with zipfile.ZipFile(path) as old:
        prefix = old.namelist()[0].split("/")[0] + "/"
        writer = torch._C.PyTorchFileWriter(str(out))
        infos = [i for i in old.infolist() if not i.filename.endswith(("/version", "_id"))]
        for info in sorted(infos, key=order) if order else infos:
            data = old.read(info)
            if info.filename.endswith("/data.pkl") and pickled:
                data = pickled(data)
            writer.write_record(info.filename[len(prefix) :], data, len(data))
        writer.write_end_of_file()
    return out


@pytest.fixture
def any_block_size(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """fastload has torch compute record offsets where files have a large block size (a
    huge-page tmpfs): here on any file system. Gives, for each storage torch hands over,
    whether its offset was computed."""
    monkeypatch.setattr(torchzip, "SMALL_BUFFER_BYTES", 0)
    return computed_offsets(monkeypatch)


def computed_offsets(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    computed: list[bool] = []
    locate = torchzip._Locator.__call__

    def spy(self: Any, storage: Any, location: str) -> Any:
        config = torchzip.computed_offsets_config
        computed.append(bool(config and config.load.calculate_storage_offsets))
        return locate(self, storage, location)

    monkeypatch.setattr(torchzip._Locator, "__call__", spy)
    return computed


needs_computed_offsets = pytest.mark.skipif(
    torchzip.computed_offsets_config is None, reason="this torch reads every record's header"
)
EQUAL_SIZES = {f"layer.{i}": torch.full((64,), float(i)) for i in range(12)}


@needs_computed_offsets
def test_torchs_own_layout_is_planned_from_computed_offsets(
    target: Any, tmp_path: Path, any_block_size: list[bool]
) -> None:
    torch.save(EQUAL_SIZES, tmp_path / "a.pt")
    assert_same(
        load(target, tmp_path / "a.pt"), torch.load(tmp_path / "a.pt", map_location=target[1])
    )
    assert len(any_block_size) == 12 and all(any_block_size)


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_writers_layout_is_read_off_the_zip_and_the_pickle(
    tmp_path: Path, protocol: int
) -> None:
    torch.save(EQUAL_SIZES, tmp_path / "a.pt", pickle_protocol=protocol)
    with zipfile.ZipFile(tmp_path / "a.pt") as archive:
        layout = torchzip.writers_layout(tmp_path / "a.pt", archive)
    assert layout is not None and len(layout) == 12
    data = (tmp_path / "a.pt").read_bytes()
    for (start, size), tensor in zip(layout, EQUAL_SIZES.values()):
        assert data[start : start + size] == tensor.numpy().tobytes()


@pytest.mark.root
@needs_computed_offsets
def test_a_huge_page_store_has_offsets_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64M,huge=within_size", "t", str(store)], check=True
    )
    try:
        torch.save(EQUAL_SIZES, store / "a.pt")
        assert (store / "a.pt").stat().st_blksize > torchzip.SMALL_BUFFER_BYTES
        computed = computed_offsets(monkeypatch)
        got = fastload.load(store / "a.pt", "cpu")
        assert_same(got, torch.load(store / "a.pt"))
        assert len(computed) == 12 and all(computed)
        del got
    finally:
        subprocess.run(["umount", "-l", str(store)], check=True)


@needs_computed_offsets
def test_a_checkpoint_rewritten_by_another_zip_tool_loads_from_its_real_offsets(
    target: Any, tmp_path: Path, any_block_size: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    """Computed offsets that miss the records (no padding here) are caught against the zip's
    directory, and the load is planned again from the real headers, still on the fast path."""
    weight = sample(torch.bfloat16, (37, 11))
    state = {
        "w": weight,
        "tied": weight,
        **{f"b{i}": sample(torch.float32, (5,)) for i in range(4)},
    }
    torch.save(state, tmp_path / "a.pt")
    path = rewritten_by_zipfile(tmp_path / "a.pt")
    with caplog.at_level(logging.DEBUG, logger="ramstage.fastload"):
        got = load(target, path)
    assert_same(got, torch.load(path, map_location=target[1]))
    assert storage_groups(got) == storage_groups(state)
    assert "reading each record's header" in caplog.text and "plain loader" not in caplog.text
    assert True in any_block_size and any_block_size[-1] is False
    assert not torchzip.computed_offsets_config.load.calculate_storage_offsets


@needs_computed_offsets
def test_offsets_that_missed_once_are_not_computed_again_for_the_same_file(
    target: Any, tmp_path: Path, any_block_size: list[bool]
) -> None:
    """A sparse tensor makes the plan load the file three times (weights_only, the full
    unpickler, then again after the copy); only the first tries computed offsets."""
    state = {"w": sample(torch.float32, (9, 4)), "sparse": torch.randn(6, 5).relu().to_sparse()}
    torch.save(state, tmp_path / "a.pt")
    path = rewritten_by_zipfile(tmp_path / "a.pt")
    assert_same(load(target, path), torch.load(path, map_location=target[1]))
    first_read = any_block_size.index(False)
    assert first_read > 0 and not any(any_block_size[first_read:])
    assert len(any_block_size) > 2 * len(state)  # more than one load


def by_name(info: zipfile.ZipInfo) -> str:
    return info.filename


def swap_keys_1_and_2(pickled: bytes) -> bytes:
    one, two = b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x002"  # BINUNICODE '1', '2'
    assert pickled.count(one) == pickled.count(two) == 1
    swapped = bytearray(pickled)
    swapped[pickled.index(one) + 5] = ord("2")
    swapped[pickled.index(two) + 5] = ord("1")
    return bytes(swapped)


@pytest.mark.parametrize(
    "rewrite",
    [
        pytest.param(lambda p: rewritten_by_torch(p, order=by_name), id="records-by-name"),
        pytest.param(lambda p: rewritten_by_torch(p, pickled=swap_keys_1_and_2), id="keys-swapped"),
    ],
)
def test_a_layout_torch_cannot_compute_has_each_header_read(
    target: Any, tmp_path: Path, any_block_size: list[bool], rewrite: Any
) -> None:
    """torch's writer's padding, but records in name order (data/0, data/1, data/10, ...) or a
    pickle that uses keys 2 and 1 the other way round: offsets computed from the order would
    give equal-sized tensors each other's bytes, and pass a check of size alone."""
    torch.save(EQUAL_SIZES, tmp_path / "a.pt")
    path = rewrite(tmp_path / "a.pt")
    want = torch.load(path, map_location=target[1])
    assert_same(load(target, path), want)
    assert len(any_block_size) == 12 and not any(any_block_size)


def test_compressed_records_go_to_the_plain_loader(
    target: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save(EQUAL_SIZES, tmp_path / "a.pt")
    path = rewritten_by_zipfile(tmp_path / "a.pt", zipfile.ZIP_DEFLATED)
    with caplog.at_level(logging.INFO, logger="ramstage.fastload"):
        got = load(target, path)
    assert_same(got, torch.load(path, map_location=target[1]))
    assert "compressed records" in caplog.text


def test_lightning_style_checkpoint_round_trips_with_every_tensor_on_the_device(
    target: Any, tmp_path: Path
) -> None:
    params = OrderedDict((f"layer{i}.weight", torch.randn(64, 48)) for i in range(4))
    params["head.weight"] = params["layer0.weight"]
    checkpoint = {
        "epoch": 7,
        "global_step": 1234,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": params,
        "optimizer_states": [
            {
                "state": {
                    i: {
                        "step": torch.tensor(12.0),
                        "exp_avg": torch.randn(64, 48),
                        "exp_avg_sq": torch.rand(64, 48),
                    }
                    for i in range(4)
                },
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1, 2, 3]}],
            }
        ],
        "lr_schedulers": [{"last_epoch": 7, "_last_lr": [1e-3]}],
        "hyper_parameters": {"hidden": 48, "name": "demo", "dropout": None},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.25)}},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 8}}}},
        "sparse": torch.randn(20, 30).relu().to_sparse(),
        "parameter": torch.nn.Parameter(torch.randn(5)),
    }
    torch.save(checkpoint, tmp_path / "lightning.ckpt")
    got = load(target, tmp_path / "lightning.ckpt")
    assert_same(got, torch.load(tmp_path / "lightning.ckpt", map_location=target[1]))
    assert storage_groups(got["state_dict"])[0] == {"layer0.weight", "head.weight"}


@pytest.mark.parametrize("kind", ["safetensors", "safetensors-index", "bin-index", "pt"])
def test_sharded_directory_loads_as_one_dict(target: Any, tmp_path: Path, kind: str) -> None:
    shards = [
        {
            f"block{s}.{i}": sample(DTYPES[(s + i) % len(DTYPES)], (30, 17 + i), seed=s * 9 + i)
            for i in range(5)
        }
        for s in range(3)
    ]
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    names = []
    for s, shard in enumerate(shards):
        if kind.startswith("safetensors"):
            names.append(write_safetensors(directory / f"model-{s}.safetensors", shard).name)
        else:
            suffix = ".bin" if kind == "bin-index" else ".pt"
            torch.save(shard, directory / f"pytorch_model-{s}{suffix}")
            names.append(f"pytorch_model-{s}{suffix}")
    if kind.endswith("index"):
        index = (
            "model.safetensors.index.json"
            if kind.startswith("safe")
            else "pytorch_model.bin.index.json"
        )
        weight_map = {name: names[s] for s, shard in enumerate(shards) for name in shard}
        (directory / index).write_text(json.dumps({"weight_map": weight_map}))
    got = load(target, directory)
    want = {name: t.to(target[1]) for shard in shards for name, t in shard.items()}
    assert_same(dict(sorted(got.items())), dict(sorted(want.items())))


def test_the_ring_is_reused_across_loads_and_released(tmp_path: Path) -> None:
    loader = fastload.Loader(pipeline_on_cpu=True)
    torch.save({"a": torch.randn(100, 100)}, tmp_path / "a.pt")
    first = loader.load(tmp_path / "a.pt", "cpu", threads=2, ring_bytes=RING_BYTES)
    ring = loader._ring
    second = loader.load(tmp_path / "a.pt", "cpu", threads=2, ring_bytes=RING_BYTES)
    assert loader._ring is ring and ring is not None
    assert_same(first, second)
    loader.release()
    assert loader._ring is None
    assert_same(loader.load(tmp_path / "a.pt", "cpu", threads=2, ring_bytes=RING_BYTES), first)
    loader.release()


def test_a_load_left_to_the_plain_loader_keeps_no_ring(tmp_path: Path) -> None:
    """A file the fast path cannot plan (torch's legacy, non-zip format) pins no host memory
    for a ring it never uses; a ring kept from an earlier load with the same settings stays."""
    loader = fastload.Loader(pipeline_on_cpu=True)
    want = {"a": torch.randn(100, 100)}
    torch.save(want, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(want, tmp_path / "zip.pt")
    assert_same(loader.load(tmp_path / "legacy.pt", "cpu", threads=2, ring_bytes=RING_BYTES), want)
    assert loader._ring is None
    assert_same(loader.load(tmp_path / "zip.pt", "cpu", threads=2, ring_bytes=RING_BYTES), want)
    kept = loader._ring
    assert kept is not None
    assert_same(loader.load(tmp_path / "legacy.pt", "cpu", threads=2, ring_bytes=RING_BYTES), want)
    assert loader._ring is kept
    loader.release()


@pytest.mark.parametrize(
    "option",
    [{"threads": 0}, {"threads": 65}, {"ring_bytes": 1024}],
)
def test_thread_count_and_ring_size_are_bounded(tmp_path: Path, option: dict[str, Any]) -> None:
    torch.save({"a": torch.ones(3)}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="must be between"):
        fastload.load(tmp_path / "a.pt", "cpu", **option)


def file_mapped(tensor: Any, path: Path) -> bool:
    """Whether tensor's bytes lie in a mapping of path: the file's pages, not a private copy."""
    start = tensor.untyped_storage().data_ptr()
    inode = path.stat().st_ino
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and int(fields[4]) == inode:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= start < high:
                    return True
    return False


def test_cpu_device_maps_a_torch_checkpoint(tmp_path: Path) -> None:
    torch.save({"a": torch.randn(1000)}, tmp_path / "a.pt")
    got = fastload.load(tmp_path / "a.pt", "cpu")
    assert_same(got, torch.load(tmp_path / "a.pt"))
    assert file_mapped(got["a"], tmp_path / "a.pt")


def test_cpu_device_maps_a_checkpoint_rewritten_by_another_zip_tool(
    tmp_path: Path, any_block_size: list[bool]
) -> None:
    torch.save({"a": torch.randn(1000), "b": torch.arange(77)}, tmp_path / "a.pt")
    path = rewritten_by_zipfile(tmp_path / "a.pt")
    got = fastload.load(path, "cpu")
    assert_same(got, torch.load(path))
    assert file_mapped(got["b"], path)
    assert any_block_size[:1] == ([True] if torchzip.computed_offsets_config else [])  # tried


def test_cpu_device_maps_safetensors_without_copying(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    state = {f"w{i}": sample(dtype, (64, 33 + i), seed=i) for i, dtype in enumerate(DTYPES)}
    state["empty"] = torch.empty(0, 3)
    st.save_file(state, tmp_path / "m.safetensors")
    got = fastload.load(tmp_path / "m.safetensors", "cpu")
    assert_same(
        dict(sorted(got.items())), dict(sorted(st.load_file(tmp_path / "m.safetensors").items()))
    )
    assert all(file_mapped(t, tmp_path / "m.safetensors") for t in got.values() if t.numel())
    # Private (copy-on-write) pages: a write stays in this process, the staged file keeps its bytes.
    got["w0"].zero_()
    assert_same(st.load_file(tmp_path / "m.safetensors")["w0"], state["w0"])


def test_cpu_device_maps_a_misaligned_safetensors_tensor_by_copying_it(tmp_path: Path) -> None:
    state = {"odd": torch.arange(3, dtype=torch.uint8), "f": sample(torch.float32, (5,))}
    got = fastload.load(write_safetensors(tmp_path / "odd.safetensors", state), "cpu")
    assert_same(got, state)
    assert got["f"].data_ptr() % 4 == 0 and not file_mapped(got["f"], tmp_path / "odd.safetensors")


def test_cpu_device_maps_every_shard_of_a_directory(tmp_path: Path) -> None:
    one = {"a": sample(torch.float16, (8, 8))}
    two = {"b": sample(torch.int32, (3,), seed=1)}
    write_safetensors(tmp_path / "model-1.safetensors", one)
    write_safetensors(tmp_path / "model-2.safetensors", two)
    got = fastload.load(tmp_path, "cpu")
    assert_same(got, {**one, **two})
    assert file_mapped(got["b"], tmp_path / "model-2.safetensors")


def test_meta_device_falls_back_to_torch_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save({"a": torch.randn(10, 3)}, tmp_path / "a.pt")
    with caplog.at_level(logging.INFO, logger="ramstage.fastload"):
        got = fastload.load(tmp_path / "a.pt", "meta")
    assert got["a"].device.type == "meta" and got["a"].shape == (10, 3)
    assert "device meta" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
def test_cuda_without_a_gpu_falls_back_and_gives_torch_loads_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save({"a": torch.randn(10)}, tmp_path / "a.pt")
    with (
        caplog.at_level(logging.INFO, logger="ramstage.fastload"),
        pytest.raises(RuntimeError, match="CUDA"),
    ):
        fastload.load(tmp_path / "a.pt", "cuda")
    assert "no usable CUDA" in caplog.text


def test_legacy_format_falls_back_with_the_right_result(
    target: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = {"a": torch.randn(70, 70), "b": torch.arange(9)}
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with caplog.at_level(logging.INFO, logger="ramstage.fastload"):
        got = load(target, tmp_path / "legacy.pt")
    assert_same(got, torch.load(tmp_path / "legacy.pt", map_location=target[1]))
    assert "legacy.pt" in caplog.text and "not a torch zip checkpoint" in caplog.text


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


def test_a_pickle_weights_only_refuses_gives_torch_loads_error(
    target: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save({"a": torch.randn(4), "obj": Opaque(3)}, tmp_path / "opaque.pt")
    with (
        caplog.at_level(logging.INFO, logger="ramstage.fastload"),
        pytest.raises(pickle.UnpicklingError),
    ):
        load(target, tmp_path / "opaque.pt")
    assert "opaque.pt" in caplog.text and "failed" in caplog.text


def test_chunks_pack_neighbours_split_large_segments_and_skip_large_gaps() -> None:
    out = torch.empty(0, dtype=torch.uint8)
    chunks = plan_chunks(
        [
            Segment("f", 0, 100, out, 0),
            Segment("f", 164, 250, out, 0),  # 64-byte gap: read along, same chunk
            Segment("f", 5 << 20, 10, out, 0),  # beyond the gap limit: a new read
            Segment("g", 0, 10, out, 0),  # another file: a new read
        ],
        chunk_bytes=256,
    )
    assert [(c.source, c.file_offset, c.nbytes) for c in chunks] == [
        ("f", 0, 256),
        ("f", 256, 158),
        ("f", 5 << 20, 10),
        ("g", 0, 10),
    ]
    assert [(p.chunk_offset, p.target_offset, p.nbytes) for p in chunks[0].pieces] == [
        (0, 0, 100),
        (164, 0, 92),
    ]
    assert [(p.chunk_offset, p.target_offset, p.nbytes) for p in chunks[1].pieces] == [(0, 92, 158)]
