"""`ramstage bench` end to end: a generated model, and a configured one behind a real daemon."""

from __future__ import annotations

import subprocess
import sys

import pytest

ROWS = ("source, page cache dropped", "source, page cache hot", "RAM copy ", "RAM copy, mmap=True")


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ramstage", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


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
