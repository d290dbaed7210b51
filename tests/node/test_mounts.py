from __future__ import annotations

import pytest

from csi_driver.core.errors import InvalidArgument
from csi_driver.node.mounts import check_mount_flags, parse_mountinfo

SAMPLE = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 7:3 / /var/lib/kubelet/a\\040b rw,noatime shared:5 - xfs /dev/loop3 rw,attr2\n"
    "41 40 0:5 /loop3 /var/lib/kubelet/blk ro,nosuid - devtmpfs udev rw,size=10k\n"
)


def test_mountinfo_fields_and_escapes() -> None:
    root, loop, block = parse_mountinfo(SAMPLE)
    assert (root.mountpoint, root.fs_type, root.source) == ("/", "ext4", "/dev/sda1")
    assert loop.mountpoint == "/var/lib/kubelet/a b"
    assert (loop.source, loop.fs_type, loop.read_only) == ("/dev/loop3", "xfs", False)
    assert (block.root, block.read_only) == ("/loop3", True)


def test_real_mountinfo_parses() -> None:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        entries = parse_mountinfo(handle.read())
    assert any(e.mountpoint == "/" for e in entries)


@pytest.mark.parametrize("flags", [["noatime"], ["noatime,nodiratime"], ["data=ordered"], []])
def test_ordinary_flags_pass(flags: list[str]) -> None:
    assert check_mount_flags(flags) == tuple(flags)


@pytest.mark.parametrize("flag", ["bind", "remount", "rw,bind", "x y", "a;rm -rf /", "move"])
def test_flags_that_change_what_is_mounted_are_refused(flag: str) -> None:
    with pytest.raises(InvalidArgument):
        check_mount_flags([flag])


@pytest.mark.parametrize("flag", ["nobarrier", "barrier=0", "journal_async_commit", "ro,nobarrier"])
def test_flags_that_weaken_fsync_are_refused(flag: str) -> None:
    with pytest.raises(InvalidArgument, match="fsync acknowledged"):
        check_mount_flags([flag])


def test_super_options_are_parsed() -> None:
    root, loop, _ = parse_mountinfo(SAMPLE)
    assert root.super_options == ("rw",)
    assert loop.super_options == ("rw", "attr2")
