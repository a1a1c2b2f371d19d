"""Checkpoint checks: hand-made safetensors and zip fixtures, real torch.save output, and a real
daemon that refuses to stage a corrupt checkpoint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import torch_like_zip

from ramstage.checkpoint import InvalidCheckpoint, check_file, check_generation


def safetensors_bytes(
    tensors: dict[str, tuple[str, list[int], bytes]], **overrides: object
) -> bytes:
    """A safetensors file: 8-byte LE header length, JSON header, then the tensors' bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    header.update(overrides)
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


GOOD_TENSORS = {
    "a.weight": ("F32", [2, 3], bytes(24)),
    "b.bias": ("BF16", [4], bytes(8)),
    "mask": ("BOOL", [5], bytes(5)),
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def rejected(path: Path, mode: str = "format") -> str:
    with pytest.raises(InvalidCheckpoint) as caught:
        check_file(path, mode)
    assert caught.value.message.startswith("invalid checkpoint: " + path.name)
    return caught.value.message


def test_a_well_formed_safetensors_file_passes(tmp_path):
    check_file(write(tmp_path / "m.safetensors", safetensors_bytes(GOOD_TENSORS)), "format")


def test_safetensors_is_recognised_by_content_without_the_extension(tmp_path):
    data = safetensors_bytes(GOOD_TENSORS)
    assert "truncated" in rejected(write(tmp_path / "model.weights", data[:-3]))


@pytest.mark.parametrize("cut", [1, 8, 20])
def test_a_truncated_safetensors_file_is_rejected(tmp_path, cut):
    data = safetensors_bytes(GOOD_TENSORS)
    message = rejected(write(tmp_path / "m.safetensors", data[: len(data) - cut]))
    assert "truncated" in message


def test_a_safetensors_file_shorter_than_its_length_prefix_is_rejected(tmp_path):
    assert "8-byte header" in rejected(write(tmp_path / "m.safetensors", b"\x10\x00\x00"))


def test_a_header_length_beyond_the_file_is_rejected(tmp_path):
    data = struct.pack("<Q", 5000) + b'{"a": 1}'
    assert "does not fit" in rejected(write(tmp_path / "m.safetensors", data))


def test_a_header_over_100_mb_is_rejected_without_reading_it(tmp_path):
    data = struct.pack("<Q", 100_000_001) + b"{}"
    assert "100 MB" in rejected(write(tmp_path / "m.safetensors", data))


def test_a_header_that_is_not_json_is_rejected(tmp_path):
    data = struct.pack("<Q", 6) + b"{nope}"
    assert "not valid JSON" in rejected(write(tmp_path / "m.safetensors", data))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            {"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}},
            "needs 24 bytes",
        ),
        ({"a.weight": {"dtype": "Q7", "shape": [2, 3], "data_offsets": [0, 24]}}, "unknown dtype"),
        ({"a.weight": {"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 24]}}, "bad shape"),
        ({"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0]}}, "bad data_offsets"),
        (
            {"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]}},
            "overlap or leave a gap",
        ),
        ({"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [37, 61]}}, "expected 0"),
        ({"a.weight": [1, 2]}, "not a JSON object"),
    ],
)
def test_inconsistent_tensor_entries_are_rejected(tmp_path, override, expected):
    data = safetensors_bytes(GOOD_TENSORS, **override)
    assert expected in rejected(write(tmp_path / "m.safetensors", data))


def test_trailing_bytes_after_the_last_tensor_are_rejected(tmp_path):
    data = safetensors_bytes(GOOD_TENSORS) + b"junk"
    assert "trailing bytes" in rejected(write(tmp_path / "m.safetensors", data))


def test_sub_byte_dtypes_count_bits(tmp_path):
    check_file(
        write(tmp_path / "q.safetensors", safetensors_bytes({"q": ("F4", [6], bytes(3))})), "format"
    )


def test_a_complete_zip_checkpoint_passes(tmp_path):
    check_file(torch_like_zip(tmp_path / "m.ckpt"), "format")


@pytest.mark.parametrize("cut", [1, 22, 2000])
def test_a_truncated_zip_checkpoint_is_rejected(tmp_path, cut):
    data = torch_like_zip(tmp_path / "full.ckpt").read_bytes()
    path = write(tmp_path / "m.ckpt", data[: len(data) - cut])
    assert "not a readable zip checkpoint" in rejected(path)


def test_a_flipped_byte_inside_a_zip_entry_is_rejected(tmp_path):
    path = torch_like_zip(tmp_path / "m.pt")
    data = bytearray(path.read_bytes())
    data[data.index(b"archive/data/0") + 200] ^= 0xFF  # inside the payload, past its local header
    assert "archive/data/0 is corrupt" in rejected(write(path, bytes(data)))


def test_a_torch_suffix_that_is_neither_zip_nor_known_passes_format_checks(tmp_path):
    # torch's legacy (pre-1.6) pickle format has no structure to check without torch.
    check_file(write(tmp_path / "old.pt", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."), "format")


def test_other_files_are_not_checked_and_none_checks_nothing(tmp_path):
    check_file(write(tmp_path / "config.json", b"{not json"), "format")
    check_file(write(tmp_path / "m.safetensors", b"garbage"), "none")


def test_a_sharded_index_must_find_every_shard(tmp_path):
    write(tmp_path / "model-00001-of-00002.safetensors", safetensors_bytes(GOOD_TENSORS))
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    path = write(tmp_path / "model.safetensors.index.json", json.dumps(index).encode())
    assert "model-00002-of-00002.safetensors" in rejected(path)
    write(tmp_path / "model-00002-of-00002.safetensors", safetensors_bytes(GOOD_TENSORS))
    check_generation(tmp_path, ["model.safetensors.index.json"], "format")


def test_check_generation_names_the_bad_file(tmp_path):
    (tmp_path / "unet").mkdir()
    write(tmp_path / "unet" / "w.safetensors", safetensors_bytes(GOOD_TENSORS)[:-1])
    write(tmp_path / "ok.safetensors", safetensors_bytes(GOOD_TENSORS))
    with pytest.raises(InvalidCheckpoint, match="w.safetensors: truncated"):
        check_generation(tmp_path, ["ok.safetensors", "unet/w.safetensors"], "format")


# ---- real torch checkpoints --------------------------------------------------------------


class Custom:
    """Not in torch's weights_only allow-list: what an unsafe pickle looks like."""


@pytest.mark.torch
def test_real_torch_save_output_passes_both_modes_and_its_truncation_fails(tmp_path):
    import torch

    path = tmp_path / "m.pth"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    check_file(path, "format")
    check_file(path, "torch")
    data = path.read_bytes()
    message = rejected(write(tmp_path / "cut.pth", data[: len(data) // 2]), "torch")
    assert "not a readable zip checkpoint" in message


@pytest.mark.torch
def test_validate_torch_refuses_what_weights_only_cannot_load(tmp_path):
    import torch

    path = tmp_path / "unsafe.ckpt"
    torch.save({"w": torch.zeros(3), "extra": Custom()}, path)
    check_file(path, "format")  # a well-formed zip: only loading it tells
    message = rejected(path, "torch")
    assert "torch.load failed" in message and "Custom" in message


# ---- the daemon --------------------------------------------------------------------------
