"""The OS seam's parsers, on mock-up /proc and /sys files with what the kernel writes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ramstage.config import StoreConfig
from ramstage.system import MountEntry, System
from ramstage.tmpfs import Tmpfs


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


def virtio_device(sysfs: Path, name: str, driver: str, features: str) -> None:
    """A virtio device as sysfs shows it: its driver a link, its features one character a bit."""
    device = sysfs / "bus" / "virtio" / "devices" / name
    device.mkdir(parents=True)
    (device / "driver").symlink_to(sysfs / "bus" / "virtio" / "drivers" / driver)
    (device / "features").write_text(features.ljust(64, "0") + "\n")


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        pytest.param([("virtio_balloon", "0110010100")], True, id="balloon-reporting"),
        pytest.param([("virtio_balloon", "0110000000")], False, id="balloon-without-reporting"),
        pytest.param([("virtio_blk", "0010010000")], False, id="bit-5-of-another-device"),
        pytest.param([], False, id="no-virtio"),
    ],
)
def test_a_balloon_that_reports_free_pages_is_told_by_its_feature_bit(tmp_path, devices, expected):
    for index, (driver, features) in enumerate(devices):
        virtio_device(tmp_path, f"virtio{index}", driver, features)
    assert System(sysfs=tmp_path).reports_free_pages() is expected


@pytest.mark.parametrize(
    ("fs", "options", "warned"),
    [
        pytest.param("tmpfs", "rw,size=8k,huge=within_size", "within_size", id="within_size"),
        pytest.param("tmpfs", "rw,size=8k,huge=always", "always", id="always"),
        pytest.param("tmpfs", "rw,size=8k", None, id="never"),  # the kernel shows no huge=
        pytest.param("ext4", "rw", None, id="plain-directory"),  # store.mount: false
    ],
)
def test_a_store_mounted_with_huge_pages_on_a_vm_that_reports_free_pages_is_warned_of(
    tmp_path, fs, options, warned
):
    """Read from the mount as the kernel shows it: what it took, not what was configured."""
    virtio_device(tmp_path / "sys", "virtio0", "virtio_balloon", "0110010100")
    store = tmp_path / "store"
    (tmp_path / "proc" / "self").mkdir(parents=True)
    line = f"36 35 0:30 / {store} rw,nosuid shared:1 - {fs} ramstage {options}\n"
    (tmp_path / "proc" / "self" / "mountinfo").write_text(line)
    system = System(proc=tmp_path / "proc", sysfs=tmp_path / "sys")
    warnings = Tmpfs(StoreConfig(path=store, huge="within_size"), system).warnings()
    assert [warning.split(" on a VM")[0] for warning in warnings] == (
        [f"store.huge is {warned}"] if warned else []
    )


class RefusingHuge(System):
    """A kernel without transparent huge pages for tmpfs: a remount with huge= fails."""

    def __init__(self, entry: MountEntry) -> None:
        super().__init__()
        self.entry = entry
        self.commands: list[list[str]] = []

    def mounts(self, pid: str = "self") -> list[MountEntry]:
        return [self.entry]

    def run_in_init_namespace(self, argv: list[str]) -> None:
        self.commands.append(argv)
        if "huge=" in argv[2]:
            raise OSError("mount: bad option")


def test_an_adopted_store_keeps_its_pages_where_the_kernel_refuses_the_new_huge(tmp_path, caplog):
    """Where the kernel has no huge pages for tmpfs the store stays as it is, as at a mount."""
    caplog.set_level(logging.INFO, logger="ramstage.tmpfs")
    system = RefusingHuge(MountEntry(tmp_path, "tmpfs", "ramstage", frozenset({"rw"})))
    st = os.statvfs(tmp_path)  # its size already: only huge= is remounted
    store = StoreConfig(path=tmp_path, size_bytes=st.f_blocks * st.f_frsize, huge="within_size")
    Tmpfs(store, system).prepare()  # no error: adopted
    assert system.commands == [["mount", "-o", "remount,huge=within_size", str(tmp_path)]]
    assert "the kernel refused huge=within_size" in caplog.text
