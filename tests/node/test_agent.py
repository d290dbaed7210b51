"""The node agent on real loop devices, filesystems and mounts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from csi_driver.core.errors import (
    SINGLE_WRITER_CONFLICT,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi_driver.core.model import AccessMode, AccessType, FsType, MiB, VolumeCapability
from csi_driver.node.agent import NodeAgent, Staged, Target
from csi_driver.node.pool import Pool
from csi_driver.node.runner import CommandRunner
from tests.node.conftest import DEFAULT_SIZE, XFS_SIZE, has_cap_sys_resource, new_volume_id

MOUNT_RW = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT)
BLOCK_RW = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.BLOCK)


def paths(kubelet: Path, n: int = 0) -> tuple[str, str]:
    staging = kubelet / "plugins" / f"vol{n}" / "globalmount"
    target = kubelet / "pods" / f"pod{n}" / "volumes" / "mount"
    return str(staging), str(target)


def staged(
    agent: NodeAgent, kubelet: Path, fs: FsType = FsType.EXT4, n: int = 1
) -> tuple[str, str, str]:
    vid = new_volume_id(n)
    agent.pool.create_image(vid, XFS_SIZE if fs is FsType.XFS else DEFAULT_SIZE, epoch=1)
    staging, target = paths(kubelet, n)
    agent.stage(vid, staging, MOUNT_RW, fs)
    return vid, staging, target


def loops_of(agent: NodeAgent, vid: str) -> list[str]:
    image = os.path.realpath(agent.pool.image_path(vid))
    return [loop.device for loop in agent.loops.attached() if loop.backing_file == image]


@pytest.mark.root
@pytest.mark.parametrize("fs", [FsType.EXT4, FsType.XFS])
def test_stage_formats_once_and_data_survives_restage(
    agent: NodeAgent, kubelet: Path, fs: FsType
) -> None:
    vid, staging, target = staged(agent, kubelet, fs)
    mount = agent.mounts.at(Path(staging))
    assert mount is not None and mount.fs_type == fs.value
    assert agent.loops.info(mount.source).direct_io
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    payload = os.urandom(1 * MiB)
    (Path(target) / "data.bin").write_bytes(payload)
    agent.unpublish(vid, target)
    agent.unstage(vid, staging)
    assert agent.mounts.at(Path(staging)) is None
    assert loops_of(agent, vid) == []
    assert not os.path.exists(target)

    agent.stage(vid, staging, MOUNT_RW, fs)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    assert (Path(target) / "data.bin").read_bytes() == payload


@pytest.mark.root
def test_repeats_are_idempotent(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, target = staged(agent, kubelet)
    agent.stage(vid, staging, MOUNT_RW, FsType.EXT4)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    assert len(loops_of(agent, vid)) == 1
    stacked = [e for e in agent.mounts.table() if e.mountpoint == target]
    assert len(stacked) == 1
    agent.unpublish(vid, target)
    agent.unpublish(vid, target)
    agent.unstage(vid, staging)
    agent.unstage(vid, staging)
    assert agent.mounts.at(Path(staging)) is None


@pytest.mark.root
def test_stage_at_a_second_path_is_failed_precondition(agent: NodeAgent, kubelet: Path) -> None:
    vid, _, _ = staged(agent, kubelet)
    other, _ = paths(kubelet, 99)
    with pytest.raises(FailedPrecondition, match="already staged"):
        agent.stage(vid, other, MOUNT_RW, FsType.EXT4)


@pytest.mark.root
def test_restage_with_other_fs_type_is_already_exists(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, _ = staged(agent, kubelet)
    with pytest.raises(AlreadyExists):
        agent.stage(vid, staging, MOUNT_RW, FsType.XFS)


@pytest.mark.root
def test_existing_filesystem_is_never_reformatted(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, _ = staged(agent, kubelet)
    agent.unstage(vid, staging)
    with pytest.raises(FailedPrecondition, match="does not reformat"):
        agent.stage(vid, staging, MOUNT_RW, FsType.XFS)
    assert loops_of(agent, vid)  # attached, left for the retry with the right fsType
    agent.unstage(vid, staging)
    agent.stage(vid, staging, MOUNT_RW, FsType.EXT4)


@pytest.mark.root
def test_unknown_volume_is_not_found(agent: NodeAgent, kubelet: Path) -> None:
    staging, _ = paths(kubelet)
    with pytest.raises(NotFound):
        agent.stage(new_volume_id(7), staging, MOUNT_RW, FsType.EXT4)


@pytest.mark.root
def test_mount_flags_are_applied(agent: NodeAgent, kubelet: Path) -> None:
    vid = new_volume_id(3)
    agent.pool.create_image(vid, DEFAULT_SIZE, epoch=1)
    staging, _ = paths(kubelet, 3)
    cap = VolumeCapability(
        AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT, mount_flags=("noatime",)
    )
    agent.stage(vid, staging, cap, FsType.EXT4)
    mount = agent.mounts.at(Path(staging))
    assert mount is not None and "noatime" in mount.options


@pytest.mark.root
def test_publish_before_stage_is_failed_precondition(agent: NodeAgent, kubelet: Path) -> None:
    vid = new_volume_id(4)
    agent.pool.create_image(vid, DEFAULT_SIZE, epoch=1)
    staging, target = paths(kubelet, 4)
    with pytest.raises(FailedPrecondition, match="not staged"):
        agent.publish(vid, staging, target, MOUNT_RW, readonly=False)


@pytest.mark.root
def test_read_only_publish_refuses_writes(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, target = staged(agent, kubelet)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=True)
    with pytest.raises(OSError) as caught:
        (Path(target) / "x").write_text("no")
    assert caught.value.errno == errno.EROFS
    (Path(staging) / "y").write_text("staging stays writable")
    with pytest.raises(AlreadyExists):
        agent.publish(vid, staging, target, MOUNT_RW, readonly=False)


@pytest.mark.root
def test_unstage_while_published_is_refused(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, target = staged(agent, kubelet)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    with pytest.raises(FailedPrecondition, match="still published"):
        agent.unstage(vid, staging)


@pytest.mark.root
def test_paths_outside_kubelet_are_refused(agent: NodeAgent, kubelet: Path, host_dir: Path) -> None:
    vid, staging, _ = staged(agent, kubelet)
    with pytest.raises(InvalidArgument):
        agent.publish(vid, staging, str(host_dir / "outside"), MOUNT_RW, readonly=False)
    (kubelet / "pods").mkdir(exist_ok=True)
    (kubelet / "pods" / "evil").symlink_to(host_dir)
    with pytest.raises(InvalidArgument, match="symlink"):
        agent.publish(vid, staging, str(kubelet / "pods" / "evil" / "t"), MOUNT_RW, readonly=False)
    assert not (host_dir / "t").exists()


@pytest.mark.root
def test_block_volume_publishes_the_raw_device(agent: NodeAgent, kubelet: Path) -> None:
    vid = new_volume_id(5)
    agent.pool.create_image(vid, DEFAULT_SIZE, epoch=1)
    staging, _ = paths(kubelet, 5)
    target = str(kubelet / "plugins" / "volumeDevices" / "publish" / vid / "pod-uid")
    agent.stage(vid, staging, BLOCK_RW, FsType.EXT4)
    agent.publish(vid, staging, target, BLOCK_RW, readonly=False)
    assert Path(target).is_block_device()
    block = os.urandom(4096)
    fd = os.open(target, os.O_WRONLY)
    try:
        os.pwrite(fd, block, 8192)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(agent.pool.image_path(vid), "rb") as image:
        image.seek(8192)
        assert image.read(4096) == block
    stats = agent.stats(vid, target)
    assert (stats.total_bytes, stats.abnormal) == (DEFAULT_SIZE, False)
    assert stats.total_inodes is None
    agent.unpublish(vid, target)
    assert not os.path.exists(target)
    agent.unstage(vid, staging)
    assert loops_of(agent, vid) == []


@pytest.mark.root
def test_read_only_block_publication_cannot_write(agent: NodeAgent, kubelet: Path) -> None:
    vid = new_volume_id(6)
    agent.pool.create_image(vid, DEFAULT_SIZE, epoch=1)
    staging, _ = paths(kubelet, 6)
    target = str(kubelet / "pods" / "p" / "dev")
    agent.stage(vid, staging, BLOCK_RW, FsType.EXT4)
    agent.publish(vid, staging, target, BLOCK_RW, readonly=True)
    fd = os.open(target, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.pwrite(fd, b"x" * 4096, 0)
    finally:
        os.close(fd)
    assert caught.value.errno in (errno.EPERM, errno.EROFS)
    assert len(loops_of(agent, vid)) == 2
    agent.unpublish(vid, target)
    assert len(loops_of(agent, vid)) == 1


@pytest.mark.root
def test_block_staged_volume_cannot_be_published_as_mount(agent: NodeAgent, kubelet: Path) -> None:
    vid = new_volume_id(8)
    agent.pool.create_image(vid, DEFAULT_SIZE, epoch=1)
    staging, target = paths(kubelet, 8)
    agent.stage(vid, staging, BLOCK_RW, FsType.EXT4)
    with pytest.raises(InvalidArgument):
        agent.publish(vid, staging, target, MOUNT_RW, readonly=False)


@pytest.mark.root
def test_stats_report_bytes_and_inodes_then_abnormal(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, target = staged(agent, kubelet)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    before = agent.stats(vid, target)
    (Path(target) / "blob").write_bytes(os.urandom(4 * MiB))
    os.sync()
    after = agent.stats(vid, target)
    assert not after.abnormal
    assert 0 < after.total_bytes <= DEFAULT_SIZE
    assert after.used_bytes >= before.used_bytes + 4 * MiB
    assert after.total_inodes and after.used_inodes == (before.used_inodes or 0) + 1
    CommandRunner().run(["umount", target])  # the mount vanishes behind Ferry's back
    lost = agent.stats(vid, target)
    assert lost.abnormal and "mount was lost" in lost.message


@pytest.mark.root
def test_stats_for_unknown_paths_are_not_found(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, target = staged(agent, kubelet)
    with pytest.raises(NotFound):
        agent.stats(vid, target)  # not published there
    with pytest.raises(NotFound):
        agent.stats(new_volume_id(42), staging)


ONLINE_EXT4 = pytest.mark.skipif(
    not has_cap_sys_resource(),
    reason="this host withholds CAP_SYS_RESOURCE, which the kernel requires to grow a "
    "mounted ext4 (Ferry's DaemonSet runs privileged and has it)",
)


@pytest.mark.root
@pytest.mark.parametrize("fs", [pytest.param(FsType.EXT4, marks=ONLINE_EXT4), FsType.XFS])
def test_online_expansion_grows_the_filesystem(agent: NodeAgent, kubelet: Path, fs: FsType) -> None:
    vid, staging, target = staged(agent, kubelet, fs, n=10)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    (Path(target) / "keep").write_text("still here")
    before = agent.stats(vid, target).total_bytes
    grown = agent.pool.require(vid).size_bytes + 128 * MiB
    agent.pool.expand_image(vid, grown)
    assert agent.expand(vid, target, None) == grown
    after = agent.stats(vid, target).total_bytes
    assert after - before >= 100 * MiB
    assert (Path(target) / "keep").read_text() == "still here"
    assert agent.expand(vid, target, None) == grown  # repeat is harmless


@pytest.mark.root
def test_restarted_agent_finds_its_devices_and_frees_leaks(
    pool: Pool, kubelet: Path, agent: NodeAgent
) -> None:
    vid, staging, target = staged(agent, kubelet)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    device = loops_of(agent, vid)
    leaked_id = new_volume_id(77)
    pool.create_image(leaked_id, DEFAULT_SIZE, epoch=1)
    leaked = agent.loops.attach(pool.image_path(leaked_id))  # attached, never recorded

    restarted = NodeAgent(
        "node-a", Pool(pool.root, pool.capacity_bytes), CommandRunner(), [kubelet]
    )
    assert restarted.recover() == [leaked]
    restarted.stage(vid, staging, MOUNT_RW, FsType.EXT4)
    restarted.publish(vid, staging, target, MOUNT_RW, readonly=False)
    assert loops_of(restarted, vid) == device
    restarted.unpublish(vid, target)
    restarted.unstage(vid, staging)
    assert loops_of(restarted, vid) == []


@pytest.mark.root
def test_stage_after_reboot_reattaches_and_remounts(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, target = staged(agent, kubelet)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    (Path(target) / "f").write_text("before reboot")
    runner = CommandRunner()
    runner.run(["umount", target])
    runner.run(["umount", staging])
    for device in loops_of(agent, vid):
        agent.loops.detach(device)
    agent.stage(vid, staging, MOUNT_RW, FsType.EXT4)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    assert (Path(target) / "f").read_text() == "before reboot"


@pytest.mark.root
@pytest.mark.skipif(has_cap_sys_resource(), reason="only hosts without CAP_SYS_RESOURCE refuse")
def test_refused_online_ext4_growth_says_what_to_do(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, _ = staged(agent, kubelet, FsType.EXT4, n=12)
    agent.pool.expand_image(vid, DEFAULT_SIZE * 2)
    with pytest.raises(FailedPrecondition, match="CAP_SYS_RESOURCE"):
        agent.expand(vid, staging, None)


@pytest.mark.root
@pytest.mark.parametrize("fs", [FsType.EXT4, FsType.XFS])
def test_volume_expanded_while_unstaged_grows_at_next_stage(
    agent: NodeAgent, kubelet: Path, fs: FsType
) -> None:
    vid, staging, _ = staged(agent, kubelet, fs, n=11)
    (Path(staging) / "keep").write_text("kept")
    before = agent.stats(vid, staging).total_bytes
    agent.unstage(vid, staging)
    grown = agent.pool.require(vid).size_bytes + 128 * MiB
    agent.pool.expand_image(vid, grown)
    agent.stage(vid, staging, MOUNT_RW, fs)
    assert agent.stats(vid, staging).total_bytes - before >= 100 * MiB
    assert agent.expand(vid, staging, None) == grown
    assert (Path(staging) / "keep").read_text() == "kept"


@pytest.mark.root
@pytest.mark.parametrize("fs", [FsType.EXT4, FsType.XFS])
def test_a_loop_device_that_outlived_the_unstage_grows_with_its_image(
    agent: NodeAgent, kubelet: Path, fs: FsType
) -> None:
    """A device left attached after the unmount (a node killed before detaching it,
    or one the kernel had not let go yet) is reused at the next stage: it must see
    the image's new size, or the filesystem cannot grow into it."""
    vid, staging, _ = staged(agent, kubelet, fs, n=15)
    before = agent.stats(vid, staging).total_bytes
    agent.unstage(vid, staging)
    image = agent.pool.image_path(vid)
    leftover = subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    grown = agent.pool.require(vid).size_bytes + 128 * MiB
    agent.pool.expand_image(vid, grown)
    agent.stage(vid, staging, MOUNT_RW, fs)
    assert loops_of(agent, vid) == [leftover]
    assert agent.loops.info(leftover).size_bytes == grown
    assert agent.stats(vid, staging).total_bytes - before >= 100 * MiB


@pytest.mark.root
def test_lost_loop_device_is_an_abnormal_condition(agent: NodeAgent, kubelet: Path) -> None:
    vid = new_volume_id(13)
    agent.pool.create_image(vid, DEFAULT_SIZE, epoch=1)
    staging, _ = paths(kubelet, 13)
    agent.stage(vid, staging, BLOCK_RW, FsType.EXT4)
    assert not agent.stats(vid, staging).abnormal
    for device in loops_of(agent, vid):
        agent.loops.detach(device)  # the device disappears behind Ferry's back
    lost = agent.stats(vid, staging)
    assert lost.abnormal and "no loop device" in lost.message
    agent.stage(vid, staging, BLOCK_RW, FsType.EXT4)  # restaging repairs it
    assert not agent.stats(vid, staging).abnormal


@pytest.mark.root
def test_publish_never_hides_existing_content(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, target = staged(agent, kubelet, n=14)
    Path(target).mkdir(parents=True)
    (Path(target) / "precious").write_text("keep me visible")
    with pytest.raises(FailedPrecondition, match="not an empty directory"):
        agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    assert agent.mounts.at(Path(target)) is None
    assert (Path(target) / "precious").read_text() == "keep me visible"
    agent.unstage(vid, staging)  # nothing was recorded as published there


def test_stage_record_from_before_access_modes_still_loads() -> None:
    target = "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/v/mount"
    old = {
        "volume_id": new_volume_id(9),
        "staging_path": "/var/lib/kubelet/plugins/kubernetes.io/csi/v/globalmount",
        "access_type": "mount",
        "fs_type": "ext4",
        "mount_flags": [],
        "read_only": False,
        "targets": {target: {"read_only": False, "device": ""}},
    }
    record = Staged.from_json(old)
    assert record.targets[target] == Target(read_only=False)
    upgraded = replace(
        record, targets={target: Target(False, access_mode=AccessMode.SINGLE_NODE_SINGLE_WRITER)}
    )
    assert Staged.from_json(json.loads(json.dumps(upgraded.to_json()))) == upgraded


@pytest.mark.root
def test_publish_repeat_records_the_access_mode_of_an_old_target(
    agent: NodeAgent, kubelet: Path
) -> None:
    vid, staging, target = staged(agent, kubelet)
    snsw = VolumeCapability(AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessType.MOUNT)
    agent.publish(vid, staging, target, MOUNT_RW, readonly=False)
    state = agent.pool.state_dir / f"{vid}.json"
    doc = json.loads(state.read_text())
    for entry in doc["targets"].values():
        del entry["access_mode"]  # as an agent before this release wrote it
    state.write_text(json.dumps(doc))
    agent.publish(vid, staging, target, snsw, readonly=False)
    assert json.loads(state.read_text())["targets"][target]["access_mode"] == snsw.access_mode.value
    with pytest.raises(FailedPrecondition):
        agent.publish(vid, staging, paths(kubelet, 7)[1], snsw, readonly=False)


@pytest.mark.root
def test_single_node_single_writer_allows_one_target(agent: NodeAgent, kubelet: Path) -> None:
    vid, staging, first = staged(agent, kubelet)
    second = paths(kubelet, 8)[1]
    snsw = VolumeCapability(AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessType.MOUNT)
    snmw = VolumeCapability(AccessMode.SINGLE_NODE_MULTI_WRITER, AccessType.MOUNT)
    agent.publish(vid, staging, first, snsw, readonly=False)
    agent.publish(vid, staging, first, snsw, readonly=False)  # the same target repeats
    for other in (snsw, snmw):
        with pytest.raises(FailedPrecondition) as caught:
            agent.publish(vid, staging, second, other, readonly=False)
        assert caught.value.message == SINGLE_WRITER_CONFLICT.format(volume_id=vid, other=first)
    assert not os.path.exists(second)
    agent.unpublish(vid, first)
    agent.publish(vid, staging, second, snmw, readonly=False)
    agent.publish(vid, staging, first, snmw, readonly=False)  # multi-writer: several targets
    assert agent.mounts.at(Path(first)) and agent.mounts.at(Path(second))
