"""A step cut short (the RPC's deadline, a shutdown, a killed pod) is finished by a retry.

Each test puts the host in the exact state an interrupted step leaves —
made with the real tools, on real loop devices and mounts — next to the
intent the agent had persisted before the step, then retries.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path

import pytest

from csi_driver.core.model import AccessType, FsType
from csi_driver.node.agent import NodeAgent, Staged, StateStore, Target
from csi_driver.node.runner import CommandRunner
from tests.node.conftest import XFS_SIZE, new_volume_id
from tests.node.test_agent import BLOCK_RW, MOUNT_RW, paths, staged

pytestmark = pytest.mark.root


def half_made_xfs(image: Path) -> None:
    """What mkfs.xfs killed after writing its superblock leaves: blkid reports xfs,
    the kernel refuses to mount it ("offline file system operation in progress")."""
    runner = CommandRunner()
    runner.run(["mkfs.xfs", "-q", "-f", str(image)])
    runner.run(["xfs_db", "-x", "-c", "sb 0", "-c", "write inprogress 1", str(image)])
    probe = runner.run(["blkid", "--probe", "--output", "value", "--match-tag", "TYPE", str(image)])
    assert probe.stdout.strip() == "xfs"


def unfinished_format(agent: NodeAgent, kubelet: Path, n: int) -> tuple[str, str, StateStore]:
    """A volume whose first stage was cut short in mkfs.xfs: the stage record the
    agent saved before running mkfs, and the half-made filesystem it left."""
    vid = new_volume_id(n)
    agent.pool.create_image(vid, XFS_SIZE, epoch=1)
    staging, _ = paths(kubelet, n)
    states = StateStore(agent.pool.state_dir)
    states.save(
        Staged(
            volume_id=vid,
            staging_path=staging,
            access_type=AccessType.MOUNT,
            fs_type=FsType.XFS,
            mount_flags=(),
            read_only=False,
            formatting=True,
        )
    )
    half_made_xfs(agent.pool.image_path(vid))
    return vid, staging, states


def test_a_retried_stage_finishes_a_mkfs_that_was_cut_short(
    agent: NodeAgent, kubelet: Path
) -> None:
    vid, staging, states = unfinished_format(agent, kubelet, 21)

    agent.stage(vid, staging, MOUNT_RW, FsType.XFS)

    mount = agent.mounts.at(Path(staging))
    assert mount is not None and mount.fs_type == "xfs"
    (Path(staging) / "written").write_text("usable")
    record = states.load(vid)
    assert record is not None and not record.formatting


def test_unstaging_an_unfinished_format_leaves_the_device_blank(
    agent: NodeAgent, kubelet: Path
) -> None:
    vid, staging, _ = unfinished_format(agent, kubelet, 22)
    image = agent.pool.image_path(vid)
    agent.loops.attach(image)  # the stage had attached it before mkfs

    agent.unstage(vid, staging)  # kubelet gave up on the volume meanwhile

    assert agent.loops.find(image) is None
    assert agent.filesystems.needs_mkfs(str(image), FsType.EXT4)
    agent.stage(vid, staging, MOUNT_RW, FsType.EXT4)  # blank again: any fsType may format it
    mount = agent.mounts.at(Path(staging))
    assert mount is not None and mount.fs_type == "ext4"


def test_a_retried_read_only_publish_finishes_its_remount(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, target = staged(agent, kubelet, n=23)
    # The publish recorded its read-only target and bound it, then was cut short
    # before the read-only remount.
    states = StateStore(agent.pool.state_dir)
    record = states.load(vid)
    assert record is not None
    states.save(replace(record, targets={target: Target(read_only=True)}))
    Path(target).mkdir(parents=True)
    agent.mounts.bind(staging, Path(target), read_only=False)

    agent.publish(vid, staging, target, MOUNT_RW, readonly=True)

    with pytest.raises(OSError) as caught:
        (Path(target) / "x").write_text("must not land")
    assert caught.value.errno == errno.EROFS
    assert len([e for e in agent.mounts.table() if e.mountpoint == target]) == 1
    assert not os.path.exists(Path(staging) / "x")


def test_unstage_frees_a_read_only_device_whose_publish_was_cut_short(
    agent: NodeAgent, kubelet: Path
) -> None:
    vid = new_volume_id(24)
    agent.pool.create_image(vid, XFS_SIZE, epoch=1)
    staging, _ = paths(kubelet, 24)
    agent.stage(vid, staging, BLOCK_RW, FsType.EXT4)
    image = agent.pool.image_path(vid)
    agent.loops.attach_read_only(image)  # attached; the publish died before recording it

    agent.unstage(vid, staging)

    assert [d for d in agent.loops.attached() if d.backing_file == os.path.realpath(image)] == []
