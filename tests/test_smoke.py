from __future__ import annotations

import hashlib
import os
from pathlib import Path

from conftest import write_random


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_daemon_stages_a_file_into_a_plain_directory_store(tmp_path, make_daemon):
    source = write_random(tmp_path / "src" / "m.ckpt", 3 << 20)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    model = daemon.wait_state("m", "staged")
    link = daemon.links / "m"
    assert os.path.realpath(link).startswith(str(daemon.store))
    assert sha256(link) == sha256(source)
    assert model["digest"] == "sha256:" + sha256(source)
