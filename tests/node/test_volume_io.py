"""The I/O path Ferry builds for a volume, read back from the kernel.

Loop device settings come from sysfs, filesystem geometry from the tools
that read the superblock, and fsync is followed from the volume's
filesystem to the loop device's flush counter. Speed itself is measured in
bench/, never here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import AccessMode, AccessType, FsType, VolumeCapability
from csi_driver.node.agent import NodeAgent
from csi_driver.node.loop import SCHEDULER
from csi_driver.node.mounts import UNSAFE_FLAGS
from csi_driver.node.runner import CommandRunner
from tests.node.conftest import DEFAULT_SIZE, XFS_SIZE, new_volume_id

MOUNT_RW = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT)
# Mount options under which an fsync may return before its data is durable.
NOT_DURABLE = {"nobarrier", "barrier=0", "journal_async_commit", "norecovery", "noload"}
# Index of "flush requests completed" in /sys/block/<dev>/stat (kernel 5.5+).
STAT_FLUSHES = 15


def stage(agent: NodeAgent, kubelet: Path, fs: FsType, n: int, size: int = 0) -> str:
    vid = new_volume_id(n)
    size = size or (XFS_SIZE if fs is FsType.XFS else DEFAULT_SIZE)
    agent.pool.create_image(vid, size, epoch=1)
    staging = kubelet / "plugins" / f"io{n}" / "globalmount"
    agent.stage(vid, str(staging), MOUNT_RW, fs)
    return str(staging)


def queue(device: str, name: str) -> str:
    return Path("/sys/block", Path(device).name, "queue", name).read_text(encoding="utf-8").strip()


def flushes(device: str) -> int:
    stat = Path("/sys/block", Path(device).name, "stat").read_text(encoding="utf-8").split()
    return int(stat[STAT_FLUSHES])


def device_at(agent: NodeAgent, staging: str) -> str:
    mount = agent.mounts.at(Path(staging))
    assert mount is not None
    return mount.source


@pytest.mark.root
def test_loop_device_gets_direct_io_no_scheduler_and_keeps_flushes(
    agent: NodeAgent, kubelet: Path
) -> None:
    device = device_at(agent, stage(agent, kubelet, FsType.EXT4, 1))
    name = Path(device).name
    assert Path(f"/sys/block/{name}/loop/dio").read_text(encoding="utf-8").strip() == "1"
    assert f"[{SCHEDULER}]" in queue(device, "scheduler")
    # "write back" is what makes the block layer pass flushes to the loop
    # device, which fsyncs the image; "write through" would drop them.
    assert queue(device, "write_cache") == "write back"
    info = agent.loops.info(device)
    assert (info.direct_io, info.scheduler, info.write_cache) == (True, SCHEDULER, True)


@pytest.mark.root
def test_restage_gives_an_existing_device_ferrys_settings_again(
    agent: NodeAgent, kubelet: Path
) -> None:
    staging = stage(agent, kubelet, FsType.EXT4, 2)
    device = device_at(agent, staging)
    Path("/sys/block", Path(device).name, "queue", "scheduler").write_text("mq-deadline")
    assert "[mq-deadline]" in queue(device, "scheduler")
    vid = new_volume_id(2)
    agent.stage(vid, staging, MOUNT_RW, FsType.EXT4)  # a repeat, e.g. after a restart
    assert f"[{SCHEDULER}]" in queue(device, "scheduler")


@pytest.mark.root
@pytest.mark.parametrize("fs", [FsType.EXT4, FsType.XFS])
def test_fsync_in_the_volume_reaches_the_loop_device_as_a_flush(
    agent: NodeAgent, kubelet: Path, fs: FsType
) -> None:
    staging = stage(agent, kubelet, fs, 3)
    device = device_at(agent, staging)
    mount = agent.mounts.at(Path(staging))
    assert mount is not None
    assert not NOT_DURABLE & set(mount.options + mount.super_options)
    before = flushes(device)
    fd = os.open(Path(staging) / "durable", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"acknowledged means on disk")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert flushes(device) > before


@pytest.mark.root
def test_small_volumes_get_4k_filesystems(agent: NodeAgent, kubelet: Path) -> None:
    runner = CommandRunner()
    ext4 = device_at(agent, stage(agent, kubelet, FsType.EXT4, 4))  # 64 MiB: 1 KiB by default
    header = runner.run(["dumpe2fs", "-h", ext4]).stdout
    assert any(line.split() == ["Block", "size:", "4096"] for line in header.splitlines())
    xfs_staging = stage(agent, kubelet, FsType.XFS, 5)
    geometry = runner.run(["xfs_info", xfs_staging]).stdout
    assert "sectsz=4096" in geometry and "bsize=4096" in geometry


@pytest.mark.root
def test_ext4_inode_tables_are_zeroed_by_mkfs_not_after_mount(
    agent: NodeAgent, kubelet: Path
) -> None:
    # 320 MiB: three block groups, two of them without inodes in use yet.
    device = device_at(agent, stage(agent, kubelet, FsType.EXT4, 6, size=XFS_SIZE))
    groups = CommandRunner().run(["dumpe2fs", device]).stdout
    described = re.findall(r"^Group \d+: .*$", groups, re.MULTILINE)
    assert len(described) == 3
    assert all("ITABLE_ZEROED" in line for line in described)


@pytest.mark.root
def test_stage_refuses_flags_that_weaken_fsync_before_mounting(
    agent: NodeAgent, kubelet: Path
) -> None:
    assert "nobarrier" in UNSAFE_FLAGS
    vid = new_volume_id(7)
    agent.pool.create_image(vid, DEFAULT_SIZE, epoch=1)
    staging = kubelet / "plugins" / "io7" / "globalmount"
    capability = VolumeCapability(
        AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT, mount_flags=("noatime,nobarrier",)
    )
    with pytest.raises(InvalidArgument, match="fsync"):
        agent.stage(vid, str(staging), capability, FsType.EXT4)
    assert agent.mounts.at(staging) is None
    assert agent.loops.find(agent.pool.image_path(vid)) is None
