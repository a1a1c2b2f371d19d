"""The commands an operator runs against a running daemon (or without one): stage, evict, path,
status."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sha256_file, wait_for, write_random


@pytest.mark.root
def test_evict_points_the_link_at_the_source_and_frees_the_ram_then_stage_brings_it_back(
    tmp_path, make_daemon
):
    big = write_random(tmp_path / "ssd" / "lama.ckpt", 64 << 20)
    daemon = make_daemon([{"name": "lama", "source": str(big)}], mount=True).start()
    staged = daemon.wait_state("lama", "staged")
    used_before = daemon.request("status")["store"]["used_bytes"]

    result = daemon.cli("evict", "lama", check=True)
    assert "lama" in result.stdout
    link = daemon.links / "lama"
    assert os.readlink(link) == str(big)
    model = daemon.model("lama")
    assert (model["state"], model["reason"]) == ("fallback", "evicted")
    assert not os.path.exists(staged["target"])
    used_after = daemon.request("status")["store"]["used_bytes"]
    assert used_before - used_after >= 64 << 20

    daemon.cli("stage", "lama", check=True)  # waits until staged
    model = daemon.model("lama")
    assert model["state"] == "staged"
    assert os.path.realpath(link).startswith(str(daemon.store) + "/")
    assert sha256_file(link) == sha256_file(big)
    assert daemon.request("status")["store"]["used_bytes"] >= used_after + (64 << 20)


def test_an_evicted_model_stays_on_its_source_until_staged(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 1 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    daemon.cli("evict", "m", check=True)
    daemon.cli("reload", check=True)  # a pass of the loop that could stage it again
    assert daemon.model("m")["state"] == "fallback"
    assert os.readlink(daemon.links / "m") == str(source)
    assert daemon.cli("stage", "--all", check=True).stdout.strip() == "staged: m"


def test_unknown_names_exit_2(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    for command in ("stage", "evict", "verify"):
        result = daemon.cli(command, "nope")
        assert result.returncode == 2, (command, result.stderr)
        assert "no model named nope" in result.stderr
    assert daemon.cli("status", "nope").returncode == 2
    assert daemon.cli("stage").returncode == 2  # neither a name nor --all
    assert daemon.model("m")["state"] == "staged"


def test_path_works_without_a_daemon(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}])
    result = daemon.cli("path", "m", check=True)
    assert result.stdout.strip() == str(daemon.links / "m")
    result = daemon.cli("path", "nope")
    assert result.returncode == 2
    assert "no model named nope" in result.stderr


def test_status_with_the_daemon_down_exits_3_and_names_the_fix(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 4096)
    daemon = make_daemon([{"name": "m", "source": str(source)}])
    for args in (("status",), ("status", "--json"), ("stage", "m"), ("evict", "m"), ("reload",)):
        result = daemon.cli(*args)
        assert result.returncode == 3, args
        assert f"ramstage is not running: no daemon listening at {daemon.socket}" in result.stderr
        assert "(systemctl start ramstage)" in result.stderr
        assert "Traceback" not in result.stderr


def test_status_with_no_config_file_looks_at_the_default_socket(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ramstage", "status", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    if Path("/run/ramstage/control.sock").exists():
        pytest.skip("a ramstage daemon runs on this machine")
    assert result.returncode == 3
    assert "/run/ramstage/control.sock" in result.stderr


def test_stage_retries_a_new_version_that_failed(tmp_path, make_daemon):
    source = tmp_path / "m.safetensors"
    header = b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}'
    good = len(header).to_bytes(8, "little") + header + b"abcd"
    source.write_bytes(good)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    first = daemon.wait_state("m", "staged")
    source.write_bytes(good[:-2])  # truncated: the new version fails validation
    # While the new version is copied the reason is source_changed; then, why it failed.
    model = wait_for(
        lambda: (m := daemon.model("m"))["reason"] not in (None, "source_changed") and m,
        context=daemon.log,
    )
    assert model["state"] == "staged" and model["generation"] == first["generation"]
    assert model["reason"].startswith("error: invalid checkpoint")
    attempts = len(re.findall(r"m: staging \S+ \S+ from", daemon.log()))
    result = daemon.cli("stage", "m")
    assert result.returncode == 1 and "invalid checkpoint" in result.stderr
    assert len(re.findall(r"m: staging \S+ \S+ from", daemon.log())) == attempts + 1
    assert (daemon.links / "m").read_bytes() == good  # still the verified previous version
