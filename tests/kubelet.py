"""What kubelet does to a ConfigMap volume, for tests (pkg/volume/util/atomic_writer.go): each
update is a new `..<timestamp>` directory, a `..data_tmp` symlink to it renamed over `..data`,
the files as `NAME -> ..data/NAME` symlinks made once, and the previous directory removed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def project(volume: Path, files: dict[str, str]) -> None:
    volume.mkdir(parents=True, exist_ok=True)
    data = volume / "..data"
    previous = os.readlink(data) if data.is_symlink() else None
    stamp = volume / time.strftime(f"..%Y_%m_%d_%H_%M_%S.{time.monotonic_ns()}", time.gmtime())
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
    temporary = volume / "..data_tmp"
    temporary.symlink_to(stamp.name)
    os.rename(temporary, data)
    for name in files:
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(f"..data/{name}")
    if previous:
        shutil.rmtree(volume / previous)
