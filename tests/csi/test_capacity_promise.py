"""Promised capacity is real: issue 6's scenario on a small pool that fills up.

A 600 MiB ext4 filesystem, made and mounted by the test on its own loop
device, is the node's pool (capacity left to Ferry's default, 95% of its free
space). A thick and a thin volume are published, then another program fills
the pool's filesystem. The thick volume still takes fsync'd writes up to its
own size, and they read back after a restage; the thin volume's writes fail,
and Ferry says so — in NodeGetVolumeStats at once, in ControllerGetVolume
after the next heartbeat — with a message that says what to do. After the
operator frees space, unstages, checks the filesystem and restages, the thin
volume is healthy again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.gen import csi_pb2
from csi_driver.node.teardown import release_under
from csi_driver.runtime import HEARTBEAT_INTERVAL_S
from tests.csi.conftest import Ferry, block_capability, expect_code, node_config, running
from tests.node.conftest import ROOT_REASON, host_can_mount, small_filesystem

pytestmark = [pytest.mark.root, pytest.mark.slow]

POOL_FS_BYTES = 600 * MiB
THICK_BYTES = 400 * MiB
THIN_BYTES = 100 * MiB
CHUNK = 4 * MiB


@pytest.fixture
def small_pool(tmp_path: Path) -> Iterator[Ferry]:
    if not host_can_mount():
        pytest.skip(ROOT_REASON)
    try:
        with small_filesystem(tmp_path, POOL_FS_BYTES, ["mkfs.ext4", "-q", "-m", "0"]) as fs:
            config = replace(node_config(tmp_path), pool_root=fs / "pool", pool_capacity_bytes=None)
            try:
                with running(tmp_path, config) as ferry:
                    yield ferry
            finally:
                release_under(tmp_path / "kubelet")  # the volumes' mounts, before their pool
    finally:
        release_under(tmp_path)


def _stats(ferry: Ferry, vid: str, path: str) -> csi_pb2.VolumeCondition:
    reply = ferry.client.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path)
    )
    return reply.volume_condition


def _controller_condition(ferry: Ferry, vid: str) -> csi_pb2.VolumeCondition:
    reply = ferry.client.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vid)
    )
    return reply.status.volume_condition


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until its filesystem is full; return the bytes written."""
    written = 0
    block = bytes(1 * MiB)
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                written += filler.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return written


def _chunk(index: int) -> bytes:
    seed = hashlib.sha256(index.to_bytes(8, "little")).digest()
    return seed * (CHUNK // len(seed))


def _write_synced(directory: Path, budget: int) -> list[Path]:
    """Write ``budget`` bytes as fsync'd files of one chunk each; any error propagates."""
    files = []
    for index in range(budget // CHUNK):
        path = directory / f"chunk-{index:04d}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _chunk(index))
            os.fsync(fd)
        finally:
            os.close(fd)
        files.append(path)
    return files


def _unstage(ferry: Ferry, vid: str, target: str) -> None:
    ferry.client.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
    )
    ferry.client.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=ferry.staging(vid))
    )


def test_thick_keeps_its_promise_and_thin_reports_a_full_pool(small_pool: Ferry) -> None:
    ferry = small_pool
    thick = ferry.create("db", size=THICK_BYTES).volume_id
    thin = ferry.create("scratch", size=THIN_BYTES, parameters={"provisioning": "thin"}).volume_id
    raw = ferry.create(
        "raw", size=16 * MiB, capability=block_capability(), parameters={"provisioning": "thin"}
    ).volume_id
    ferry.stage(thick)
    ferry.stage(thin)
    ferry.stage(raw, block_capability())
    thick_target, thin_target = ferry.publish(thick), ferry.publish(thin)
    raw_target = ferry.publish(raw, block_capability())
    assert not _stats(ferry, thick, thick_target).abnormal
    assert not _stats(ferry, thin, thin_target).abnormal
    room = os.statvfs(thick_target).f_bavail * os.statvfs(thick_target).f_frsize

    assert _fill(ferry.base / "fs" / "filler") > 0

    # The thin volume is reported at once, before anything failed.
    condition = _stats(ferry, thin, thin_target)
    assert condition.abnormal
    assert "bytes short" in condition.message and "thin volume" in condition.message
    assert "Free space on the pool's filesystem" in condition.message
    assert not _stats(ferry, thick, thick_target).abnormal

    # Thick: every fsync'd write up to the volume filesystem's own free space lands.
    files = _write_synced(Path(thick_target), room - 8 * MiB)
    assert len(files) * CHUNK >= room - 12 * MiB
    assert not _stats(ferry, thick, thick_target).abnormal

    # Thin: the pool cannot back the writes; fsync reports the failure.
    with pytest.raises(OSError):
        _write_synced(Path(thin_target), 64 * MiB)
    condition = _stats(ferry, thin, thin_target)
    assert (
        condition.abnormal
        and "reported failed I/O on the volume's loop device" in condition.message
    )
    assert "loop" in condition.message and "check its filesystem" in condition.message

    # A thin block volume fails the same way, and says so.
    with pytest.raises(OSError), open(raw_target, "r+b", buffering=0) as device:
        for index in range(4):
            device.write(_chunk(index))
        os.fsync(device.fileno())
    condition = _stats(ferry, raw, raw_target)
    assert (
        condition.abnormal
        and "reported failed I/O on the volume's loop device" in condition.message
    )

    # The controller hears it from the node's heartbeat. An earlier heartbeat may
    # already have carried the shortfall alone: wait for the one after the failure.
    deadline = time.monotonic() + 2 * HEARTBEAT_INTERVAL_S + 5
    while (
        "failed I/O" not in _controller_condition(ferry, thin).message
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    reported = _controller_condition(ferry, thin)
    assert reported.abnormal and "failed I/O" in reported.message, reported.message
    assert not _controller_condition(ferry, thick).abnormal
    listed = ferry.client.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    conditions = {e.volume.volume_id: e.status.volume_condition for e in listed.entries}
    assert conditions[thin] == reported and not conditions[thick].abnormal

    # Stage records live in the pool too: while it is full they cannot change.
    details = expect_code(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ferry.client.node.NodeUnpublishVolume,
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=thick, target_path=thick_target),
    )
    assert "is full; free space on it and retry" in details

    # The runbook: free space first.
    (ferry.base / "fs" / "filler").unlink()
    condition = _stats(ferry, thin, thin_target)
    assert condition.abnormal and "bytes short" not in condition.message

    # The thick volume's data reached its image: it reads back after a restage.
    _unstage(ferry, thick, thick_target)
    ferry.stage(thick)
    thick_target = ferry.publish(thick)
    for index, path in enumerate(files):
        read_back = (Path(thick_target) / path.name).read_bytes()
        assert read_back == _chunk(index), path.name

    # Then unstage the thin volume, check its filesystem, restage.
    _unstage(ferry, thin, thin_target)
    image = ferry.base / "fs" / "pool" / "images" / f"{thin}.img"
    fsck = subprocess.run(["e2fsck", "-f", "-y", str(image)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    ferry.stage(thin)
    thin_target = ferry.publish(thin)
    condition = _stats(ferry, thin, thin_target)
    assert not condition.abnormal, condition.message
