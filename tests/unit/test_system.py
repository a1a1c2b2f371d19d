"""The OS seam's parsers, on mock-up /proc and /sys files with what the kernel writes."""

from __future__ import annotations

import os
from pathlib import Path

from ramstage.system import System


def test_mountinfo_octal_escapes_and_raw_bytes_are_decoded_as_bytes(tmp_path):
    (tmp_path / "self").mkdir()
    lines = [
        rb"36 35 0:30 / /run/a\040b\011c\012d\134e rw,nosuid shared:1 - tmpfs ramstage rw,size=8k",
        b"37 35 0:31 / /run/caf\xc3\xa9 rw - tmpfs ramstage rw,noswap",
        b"38 35 0:32 / /run/latin\xe9 rw - ext4 /dev/sd\\040x rw",
    ]
    (tmp_path / "self" / "mountinfo").write_bytes(b"\n".join(lines) + b"\n")
    entries = System(proc=tmp_path).mounts()
    assert [e.mountpoint for e in entries] == [
        Path("/run/a b\tc\nd\\e"),
        Path("/run/café"),
        Path("/run/latin\udce9"),  # not UTF-8: the bytes survive as os.fsdecode keeps them
    ]
    assert entries[0].options >= {"nosuid", "size=8k"}
    assert "noswap" in entries[1].options
    assert entries[2].source == "/dev/sd x"


def test_a_spinning_disk_is_told_by_sysfs_for_the_disk_or_the_disk_a_partition_is_on(tmp_path):
    source = tmp_path / "m.ckpt"
    source.write_bytes(b"x")
    device = os.stat(source).st_dev
    block = tmp_path / "sys" / "dev" / "block"
    block.mkdir(parents=True)
    disk = tmp_path / "sys" / "devices" / "sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "queue").mkdir()
    (block / f"{os.major(device)}:{os.minor(device)}").symlink_to(disk / "sda1")
    system = System(sysfs=tmp_path / "sys")
    for rotational, expected in (("1\n", device), ("0\n", None)):
        (disk / "queue" / "rotational").write_text(rotational)  # a partition: its disk's
        assert system.spinning_disk(source) == expected
    # tmpfs has no block device (major 0): never a spinning disk
    assert System().spinning_disk(Path("/dev/shm")) is None
    assert system.spinning_disk(tmp_path / "gone") is None  # the copy says what is wrong
