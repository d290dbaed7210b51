"""The node agent's encrypted stages that only a crash or a hand-made image reach."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver.core.encryption import KEY_BYTES, VolumeKey
from csi_driver.core.errors import FailedPrecondition
from csi_driver.core.model import AccessMode, AccessType, FsType, VolumeCapability
from csi_driver.node.agent import ENCRYPTED_DIR, NodeAgent
from csi_driver.node.filesystem import Filesystems
from csi_driver.node.runner import CommandRunner
from tests.node.conftest import DEFAULT_SIZE, new_volume_id

pytestmark = pytest.mark.root

MOUNT_RW = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT)


def image_with_data_dir(agent: NodeAgent, scratch: Path, files: dict[str, bytes]) -> str:
    """A volume whose ext4 (with ``encrypt``) already has ENCRYPTED_DIR holding ``files``,
    unencrypted: what a first stage cut short between its mkdir and its policy leaves
    (no files), or a filesystem changed by hand (files)."""
    vid = new_volume_id(7)
    image = agent.pool.create_image(vid, DEFAULT_SIZE, epoch=1).path
    runner = CommandRunner()
    Filesystems(runner).mkfs(str(image), FsType.EXT4, encrypted=True)
    device = agent.loops.attach(image)
    try:
        scratch.mkdir()
        runner.run(["mount", device, str(scratch)])
        try:
            (scratch / ENCRYPTED_DIR).mkdir()
            for name, content in files.items():
                (scratch / ENCRYPTED_DIR / name).write_bytes(content)
        finally:
            runner.run(["umount", str(scratch)])
    finally:
        agent.loops.detach(device)
    return vid


def test_a_first_stage_cut_short_before_its_policy_is_finished(
    agent: NodeAgent, kubelet: Path, host_dir: Path
) -> None:
    vid = image_with_data_dir(agent, host_dir / "by-hand", {})
    staging = kubelet / "plugins" / vid / "globalmount"
    target = kubelet / "pods" / "p" / "mount"
    agent.stage(vid, str(staging), MOUNT_RW, FsType.EXT4, VolumeKey(os.urandom(KEY_BYTES)))
    assert agent.encryption.policy(staging / ENCRYPTED_DIR) is not None
    agent.publish(vid, str(staging), str(target), MOUNT_RW, readonly=False)
    (target / "after").write_bytes(b"encrypted now")
    agent.unpublish(vid, str(target))
    agent.unstage(vid, str(staging))


def test_a_data_directory_holding_plaintext_is_refused_and_nothing_stays_staged(
    agent: NodeAgent, kubelet: Path, host_dir: Path
) -> None:
    vid = image_with_data_dir(agent, host_dir / "by-hand", {"plain": b"readable"})
    staging = kubelet / "plugins" / vid / "globalmount"
    with pytest.raises(FailedPrecondition, match="already holds unencrypted files"):
        agent.stage(vid, str(staging), MOUNT_RW, FsType.EXT4, VolumeKey(os.urandom(KEY_BYTES)))
    assert agent.mounts.at(staging) is None
    assert agent.loops.find(agent.pool.image_path(vid)) is None
    agent.delete_image(vid)  # refused while anything on the node still used it
