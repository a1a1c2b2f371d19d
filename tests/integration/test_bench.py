"""`ramstage bench` end to end: a generated model, and configured ones (torch, safetensors, a
directory, no loader installed) behind a real daemon."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

ROWS = ("source, page cache dropped", "source, page cache hot", "RAM copy ", "RAM copy, mmap")


def bench(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "ramstage", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def read_some(terminal: Any) -> bytes:
    try:
        return terminal.read(4096)  # type: ignore[no-any-return]
    except OSError:  # EIO: the other side closed
        return b""


def save_safetensors(path: Path, tensors: int, seed: int = 0) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    save_file({f"layer.{i}": generator.random(1 << 16, dtype=np.float32) for i in range(tensors)},
              str(path))  # fmt: skip
    return path


@pytest.mark.torch
def test_bench_of_a_generated_model_prints_every_case_and_cleans_up(tmp_path):
    result = bench("--size", "8M", "--runs", "2", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "torch.load of a generated state_dict (8.0 MiB), median of 2 runs" in result.stdout
    for row in ROWS:
        assert row in result.stdout
    assert "host may still cache the disk" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.torch
def test_bench_of_a_configured_model_reads_its_link_and_says_when_it_is_not_staged(
    tmp_path, make_daemon
):
    import torch

    source = tmp_path / "src" / "m.pt"
    source.parent.mkdir()
    torch.save({"w": torch.randn(1 << 18)}, source)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    staged = bench("m", "--config", str(daemon.config_path), "--runs", "1")
    assert staged.returncode == 0, staged.stderr
    assert f"RAM copy: {daemon.links / 'm'}" in staged.stdout
    assert "not staged now" not in staged.stdout
    daemon.cli("evict", "m", check=True)
    evicted = bench("m", "--config", str(daemon.config_path), "--runs", "1")
    assert "m is not staged now: its link points at the source" in evicted.stdout


def test_bench_needs_a_name_or_a_size(tmp_path):
    result = bench("--config", str(tmp_path / "none.yaml"))
    assert result.returncode == 2
    assert "name a configured model, or give --size" in result.stderr
    assert bench("--size", "lots").returncode == 2


@pytest.mark.torch
def test_bench_of_a_safetensors_model_uses_its_loader_shows_progress_and_writes_json(
    tmp_path, make_daemon
):
    pytest.importorskip("safetensors")
    source = save_safetensors(tmp_path / "src" / "m.safetensors", tensors=4)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    result = bench("m", "--config", str(daemon.config_path), "--runs", "2", "--json")
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert (table["loader"], table["files"], table["runs"]) == ("safetensors", 1, 2)
    assert table["size_bytes"] == source.stat().st_size
    assert [case["label"] for case in table["cases"]] == [
        "source, page cache dropped", "source, page cache hot", "RAM copy", "RAM copy, mmap",
    ]  # fmt: skip
    assert all(len(case["seconds"]) == 2 for case in table["cases"])
    assert table["cases"][2]["vs_ram_copy"] == 1.0
    # Not a terminal: one progress line per step, on stderr.
    assert "run 2/2: RAM copy, mmap" in result.stderr.splitlines()

    # A terminal: one line, rewritten in place and cleared at the end.
    primary, secondary = pty.openpty()
    with os.fdopen(primary, "rb", buffering=0) as terminal:
        process = subprocess.Popen(
            [sys.executable, "-m", "ramstage", "bench", "m", "--config", str(daemon.config_path),
             "--runs", "1"],
            stdout=subprocess.PIPE, stderr=secondary, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        os.close(secondary)
        shown = b""
        while chunk := read_some(terminal):
            shown += chunk
        assert process.wait(timeout=60) == 0
    assert b"\r\x1b[Krun 1/1: RAM copy, mmap\r\x1b[K" in shown
    assert b"\n" not in shown


@pytest.mark.torch
def test_bench_of_a_directory_model_loads_every_file_with_its_loader(tmp_path, make_daemon):
    pytest.importorskip("safetensors")
    model = tmp_path / "src" / "sd"
    save_safetensors(model / "unet" / "a.safetensors", tensors=2, seed=1)
    save_safetensors(model / "unet" / "b.safetensors", tensors=2, seed=2)
    (model / "config.json").write_text('{"layers": 4}')
    daemon = make_daemon([{"name": "sd", "source": str(model)}]).start()
    daemon.wait_state("sd", "staged")
    result = bench("sd", "--config", str(daemon.config_path), "--runs", "1")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("plain reads + safetensors of sd (")  # config.json, then the shards
    assert first.endswith(" MiB, 3 files), median of 1 runs")
    assert f"RAM copy: {daemon.links / 'sd'}" in result.stdout
    one = bench("sd", "--config", str(daemon.config_path), "--runs", "1", "--file",
                "unet/b.safetensors", "--json")  # fmt: skip
    assert json.loads(one.stdout)["files"] == 1
    missing = bench("sd", "--config", str(daemon.config_path), "--file", "unet/c.safetensors")
    assert missing.returncode == 2
    assert f"--file unet/c.safetensors: no such file in {model}" in missing.stderr


SYSTEM_PYTHON = "/usr/bin/python3"


def test_bench_without_a_loader_installed_reads_the_files_plainly(tmp_path, make_daemon):
    """Debian's python3 with ramstage's own dependencies only: no torch, no safetensors."""
    probe = "import ramstage.cli, importlib.util as u; assert not u.find_spec('safetensors')"
    if subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True,
                      env={**os.environ, "PYTHONPATH": str(REPO)}).returncode:  # fmt: skip
        pytest.skip("needs Debian's python3 with python3-yaml and python3-xxhash, no safetensors")
    source = tmp_path / "src" / "m.safetensors"
    source.parent.mkdir()
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    source.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    result = bench("m", "--config", str(daemon.config_path), "--runs", "1", python=SYSTEM_PYTHON)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("plain reads of m (")
    assert "note: plain reads: no loader for .safetensors is installed" in result.stdout
