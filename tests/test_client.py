"""The application client against real daemons: resolving links, waiting, loading with torch."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from ramstage import client
from ramstage.errors import NotFound, RamstageError


def save_state_dict(path: Path, seed: int = 0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {f"layer{i}.weight": torch.randn(256, 256, generator=generator) for i in range(4)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def mapped_paths() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split()) == 6}


def test_resolve_reads_the_config_without_a_daemon(tmp_path, monkeypatch):
    config = tmp_path / "ramstage.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "links_dir": str(tmp_path / "links"),
                "models": [{"name": "lama", "source": "/nowhere.ckpt"}],
            }
        )
    )
    assert client.resolve("lama", config=config) == tmp_path / "links" / "lama"
    monkeypatch.setenv("RAMSTAGE_CONFIG", str(config))
    assert client.resolve("lama") == tmp_path / "links" / "lama"
    with pytest.raises(NotFound, match=f"no model named sd15 in {config}"):
        client.resolve("sd15")


def test_the_client_does_not_import_torch_until_it_loads(tmp_path):
    config = tmp_path / "ramstage.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "source": "/x.ckpt"}]}))
    code = (
        "import sys; from ramstage import client; "
        f"client.resolve('m', config={str(config)!r}); print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_wait_staged_returns_the_status_entry_once_staged(tmp_path, make_daemon):
    source = tmp_path / "src" / "m.ckpt"
    source.parent.mkdir()
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("archive/data/0", os.urandom(1 << 20))
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    model = client.wait_staged("m", 30, config=daemon.config_path)
    assert model["state"] == "staged"
    assert model["target"].startswith(str(daemon.store))
    with pytest.raises(NotFound, match="no model named other"):
        client.wait_staged("other", 5, config=daemon.config_path)


def test_wait_staged_raises_the_reason_for_a_checkpoint_that_will_not_stage(tmp_path, make_daemon):
    source = tmp_path / "src" / "m.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")  # header longer than the file
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    with pytest.raises(
        client.NotStaged, match=r"m is not staged \(fallback\): error: invalid checkpoint"
    ):
        client.wait_staged("m", 30, config=daemon.config_path)


def test_wait_staged_gives_up_after_the_timeout_when_no_daemon_answers(make_daemon):
    daemon = make_daemon([])  # configured, never started
    with pytest.raises(RamstageError, match="not staged within 0.5s .*ramstage is not running"):
        client.wait_staged("m", 0.5, config=daemon.config_path)


@pytest.mark.torch
def test_load_maps_the_staged_copy_and_returns_the_same_tensors(tmp_path, make_daemon):
    import torch

    expected = save_state_dict(tmp_path / "src" / "m.pt")
    daemon = make_daemon([{"name": "m", "source": str(tmp_path / "src" / "m.pt")}]).start()
    target = client.wait_staged("m", 30, config=daemon.config_path)["target"]

    mapped = client.load("m", config=daemon.config_path)
    assert mapped.keys() == expected.keys()
    assert all(torch.equal(mapped[k], expected[k]) for k in expected)
    # The tensors are views of the RAM copy, not a private read of it (nor of the source).
    assert target in mapped_paths()
    assert str(tmp_path / "src" / "m.pt") not in mapped_paths()

    del mapped
    copied = client.load("m", mmap=False, config=daemon.config_path)
    assert all(torch.equal(copied[k], expected[k]) for k in expected)


@pytest.mark.torch
def test_load_picks_a_file_inside_a_directory_model(tmp_path, make_daemon):
    import torch

    expected = save_state_dict(tmp_path / "sd" / "unet" / "weights.bin", seed=1)
    (tmp_path / "sd" / "config.json").write_text("{}")
    daemon = make_daemon([{"name": "sd", "source": str(tmp_path / "sd")}]).start()
    client.wait_staged("sd", 30, config=daemon.config_path)
    loaded = client.load("sd", file="unet/weights.bin", config=daemon.config_path)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.torch
def test_load_follows_the_link_to_the_source_in_fallback(tmp_path, make_daemon):
    import torch

    expected = save_state_dict(tmp_path / "src" / "m.pt", seed=2)
    daemon = make_daemon([{"name": "m", "source": str(tmp_path / "src" / "m.pt")}]).start()
    client.wait_staged("m", 30, config=daemon.config_path)
    daemon.cli("evict", "m", check=True)
    loaded = client.load("m", mmap=False, config=daemon.config_path)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def save_safetensors(path: Path, seed: int = 0) -> dict:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {
        "w": torch.randn(128, 64, generator=generator).to(torch.bfloat16),
        "norm": torch.randn(64, generator=generator),
        "step": torch.tensor(7),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return state


def maps_file(tensor, path: Path) -> bool:
    """Whether the tensor's bytes lie in a mapping of path: its pages, not a private copy."""
    address, inode = tensor.untyped_storage().data_ptr(), path.stat().st_ino
    with open("/proc/self/maps") as maps:
        for fields in (line.split() for line in maps):
            if len(fields) >= 6 and int(fields[4]) == inode:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high:
                    return True
    return False


def assert_bits_equal(got: dict, want: dict) -> None:
    import torch

    assert got.keys() == want.keys()
    for key, expected in want.items():
        assert (got[key].dtype, got[key].shape) == (expected.dtype, expected.shape), key
        bits = [t.reshape(-1).view(torch.uint8) for t in (got[key], expected)]
        assert torch.equal(*bits), key


@pytest.mark.torch
def test_load_takes_a_path_and_maps_it_without_a_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMSTAGE_CONFIG", str(tmp_path / "absent.yaml"))
    expected = save_state_dict(tmp_path / "m.pt")
    loaded = client.load(tmp_path / "m.pt")
    assert_bits_equal(loaded, expected)
    assert all(maps_file(t, tmp_path / "m.pt") for t in loaded.values())
    del loaded
    monkeypatch.chdir(tmp_path)  # a bare file name: no model by that name, a file by it
    assert_bits_equal(client.load("m.pt", mmap=False), expected)


@pytest.mark.torch
def test_load_of_a_name_that_is_neither_model_nor_file_says_both(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMSTAGE_CONFIG", str(tmp_path / "absent.yaml"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFound, match="no file 'lama' either"):
        client.load("lama")


@pytest.mark.torch
def test_load_maps_a_safetensors_file_on_the_cpu(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    expected = save_safetensors(tmp_path / "m.safetensors")
    loaded = client.load(str(tmp_path / "m.safetensors"))
    assert all(maps_file(t, tmp_path / "m.safetensors") for t in loaded.values())
    assert_bits_equal(loaded, load_file(tmp_path / "m.safetensors"))
    assert_bits_equal(loaded, expected)
    with pytest.raises(ValueError, match="use device="):
        client.load(tmp_path / "m.safetensors", map_location="cuda:0")


@pytest.mark.torch
def test_load_copies_a_safetensors_file_when_mmap_is_off(tmp_path):
    pytest.importorskip("safetensors")
    expected = save_safetensors(tmp_path / "m.safetensors", seed=3)
    copied = client.load(tmp_path / "m.safetensors", mmap=False)
    assert_bits_equal(copied, expected)
    assert not any(maps_file(t, tmp_path / "m.safetensors") for t in copied.values())


@pytest.mark.torch
def test_load_of_a_directory_model_maps_every_staged_shard(tmp_path, make_daemon):
    pytest.importorskip("safetensors")
    one = save_safetensors(tmp_path / "llm" / "model-00001.safetensors", seed=4)
    two = save_safetensors(tmp_path / "llm" / "model-00002.safetensors", seed=5)
    two = {f"b.{k}": v for k, v in two.items()}
    from safetensors.torch import save_file

    save_file(two, tmp_path / "llm" / "model-00002.safetensors")
    daemon = make_daemon([{"name": "llm", "source": str(tmp_path / "llm")}]).start()
    target = client.wait_staged("llm", 30, config=daemon.config_path)["target"]
    loaded = client.load("llm", config=daemon.config_path)
    assert_bits_equal(loaded, {**one, **two})
    assert maps_file(loaded["w"], Path(target) / "model-00001.safetensors")
    assert maps_file(loaded["b.w"], Path(target) / "model-00002.safetensors")
