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
