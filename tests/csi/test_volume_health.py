"""NodeGetVolumeStats reports filesystem errors the kernel recorded, and clears
them once the operator has repaired the filesystem and restaged the volume.

The errors are real kernel errors: ext4's own ``trigger_fs_error`` knob makes
the kernel record an error exactly as a failed journal commit would, and an
xfs filesystem is shut down with ``xfs_io``'s shutdown command.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from csi_driver.core.model import MiB
from csi_driver.gen import csi_pb2
from csi_driver.node.loop import LoopDevices
from csi_driver.node.runner import CommandRunner
from tests.csi.conftest import NODE_ID, Ferry, mount_capability

pytestmark = pytest.mark.root


def _condition(ferry: Ferry, vid: str, path: str) -> csi_pb2.VolumeCondition:
    reply = ferry.client.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path)
    )
    return reply.volume_condition


def _device(ferry: Ferry, vid: str) -> str:
    image = ferry.base / NODE_ID / "pool" / "images" / f"{vid}.img"
    device = LoopDevices(CommandRunner()).find(image)
    assert device is not None
    return device


def _restage_after(ferry: Ferry, vid: str, target: str, repair: list[str], cap: object) -> str:
    ferry.client.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
    )
    ferry.client.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=ferry.staging(vid))
    )
    if repair:
        image = ferry.base / NODE_ID / "pool" / "images" / f"{vid}.img"
        fixed = subprocess.run([*repair, str(image)], capture_output=True, text=True)
        assert fixed.returncode in (0, 1), fixed.stdout + fixed.stderr
    ferry.stage(vid, cap)
    return ferry.publish(vid, cap)


def test_ext4_errors_are_reported_until_repaired(mountable: Ferry) -> None:
    ferry = mountable
    vid = ferry.create("ext4-errors").volume_id
    ferry.stage(vid)
    target = ferry.publish(vid)
    assert _condition(ferry, vid, target).message == "ok"
    device = _device(ferry, vid)
    trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    trigger.write_text("ferry test: simulated metadata error\n")
    # ext4 copies the count into its superblock from a work item: soon, not at once.
    deadline = time.monotonic() + 10
    while "ext4 has recorded" not in _condition(ferry, vid, target).message:
        assert time.monotonic() < deadline, "ext4 never reported its error count"
        time.sleep(0.1)
    for path in (target, ferry.staging(vid)):
        condition = _condition(ferry, vid, path)
        assert condition.abnormal
        assert "ext4 has recorded 1 error(s)" in condition.message
        assert "EXT4-fs error" in condition.message  # the kernel log said so at once
        assert "run e2fsck -f on its image" in condition.message
    target = _restage_after(ferry, vid, target, ["e2fsck", "-f", "-y"], mount_capability())
    assert _condition(ferry, vid, target).message == "ok"


def test_a_shut_down_xfs_is_reported_until_repaired(mountable: Ferry) -> None:
    ferry = mountable
    capability = mount_capability(fs_type="xfs")
    vid = ferry.create("xfs-down", size=320 * MiB, capability=capability).volume_id
    ferry.stage(vid, capability)
    target = ferry.publish(vid, capability)
    with open(Path(target) / "data", "wb") as data:
        data.write(b"before")
        data.flush()
        os.fsync(data.fileno())  # acknowledged, so it must survive the shutdown
    assert _condition(ferry, vid, target).message == "ok"
    subprocess.run(["xfs_io", "-x", "-c", "shutdown -f", target], check=True)
    condition = _condition(ferry, vid, target)
    assert condition.abnormal and "xfs has shut down" in condition.message
    assert "unstage and restage it (mounting replays its log)" in condition.message
    target = _restage_after(ferry, vid, target, [], capability)
    assert _condition(ferry, vid, target).message == "ok"
    assert (Path(target) / "data").read_bytes() == b"before"
