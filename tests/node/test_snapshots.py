"""A node's snapshot store on real pool filesystems: reflink where it can, copy elsewhere.

A snapshot must hold the image's bytes at the moment it was taken, whatever
is written to the image afterwards; on xfs (reflink=1) it shares the blocks
(FICLONE), on ext4 it is a copy of the data ranges. A restore starts as the
snapshot's bytes and is grown (reserved) to its volume's size.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from csi_driver.chunks.scan import scan_image
from csi_driver.core.errors import NotFound
from csi_driver.core.model import AccessMode, AccessType, FsType, MiB, VolumeCapability
from csi_driver.core.records import SnapshotMethod
from csi_driver.node.agent import NodeAgent
from csi_driver.node.clones import SnapshotExports
from csi_driver.node.pool import Pool
from csi_driver.node.snapshots import SnapshotStore, copy_image
from tests.node.conftest import new_volume_id, requires_root, small_filesystem

SNAPSHOT = "snap-" + "1" * 32
MOUNT_RW = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT)
FILESYSTEMS = {
    "xfs": (["mkfs.xfs", "-q", "-m", "reflink=1"], SnapshotMethod.REFLINK),
    "ext4": (["mkfs.ext4", "-q", "-m", "0"], SnapshotMethod.COPY),
}


@requires_root
@pytest.mark.root
@pytest.mark.parametrize("fs", sorted(FILESYSTEMS))
def test_snapshot_holds_its_point_in_time(tmp_path: Path, fs: str) -> None:
    mkfs, method = FILESYSTEMS[fs]
    with small_filesystem(tmp_path, 320 * MiB, mkfs) as mount:
        pool = Pool(mount / "pool", capacity_bytes=200 * MiB)
        volume = new_volume_id(1)
        info = pool.create_image(volume, 32 * MiB, epoch=1)
        before = os.urandom(MiB)
        with open(info.path, "r+b") as handle:
            handle.seek(3 * MiB)
            handle.write(before)
        store = SnapshotStore(pool.root)
        taken = store.take(SNAPSHOT, volume, info.path)
        assert taken.method is method
        assert store.take(SNAPSHOT, volume, info.path) == taken  # a repeat returns it
        with open(info.path, "r+b") as handle:
            handle.seek(3 * MiB)
            handle.write(b"\xff" * MiB)
        held = taken.path.read_bytes()
        assert held[3 * MiB : 4 * MiB] == before and len(held) == 32 * MiB

        clone = new_volume_id(2)
        restored = pool.create_image_from(
            clone, 48 * MiB, 1, lambda path: copy_image(taken.path, path)
        )
        data = restored.path.read_bytes()
        assert data[: 32 * MiB] == held and data[32 * MiB :].count(0) == 16 * MiB
        assert not restored.thin and restored.unallocated_bytes == 0
        pool.delete_image(volume)
        assert store.require(SNAPSHOT).path.read_bytes() == held  # outlives its volume
        store.delete(SNAPSHOT)
        assert store.get(SNAPSHOT) is None and store.ids() == []


@requires_root
@pytest.mark.root
def test_a_restart_thaws_a_filesystem_a_crash_left_frozen(agent: NodeAgent, kubelet: Path) -> None:
    volume = new_volume_id(3)
    agent.pool.create_image(volume, 64 * MiB, epoch=1)
    staging = kubelet / "plugins" / "frozen" / "globalmount"
    agent.stage(volume, str(staging), MOUNT_RW, FsType.EXT4)
    agent.filesystems.freeze(staging)  # as a snapshot does, then the process died
    written = threading.Event()

    def write() -> None:
        with open(staging / "after", "wb") as handle:
            handle.write(b"x" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        written.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert not written.wait(0.5)  # frozen: the writer waits
    agent.recover()  # what a restarted node agent does first
    assert written.wait(10)
    writer.join()
    agent.recover()  # and again, on a filesystem that is not frozen: nothing to do
    assert (staging / "after").read_bytes() == b"x" * 4096
    agent.unstage(volume, str(staging))


def test_snapshots_are_exported_on_demand_and_withdrawn_when_deleted(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "pool", capacity_bytes=64 * MiB)
    volume = new_volume_id(4)
    info = pool.create_image(volume, 8 * MiB, epoch=1, thin=True)
    with open(info.path, "r+b") as handle:
        handle.seek(MiB)
        handle.write(b"exported" * 512)
    store = SnapshotStore(pool.root)
    taken = store.take(SNAPSHOT, volume, info.path)
    exports = SnapshotExports(store)
    export = exports.require(SNAPSHOT)
    assert export.manifest == scan_image(taken.path).manifest
    assert export.manifest.data_bytes == export.manifest.chunk_size  # one data chunk
    assert exports.require(SNAPSHOT) is export
    with pytest.raises(NotFound):
        exports.require("snap-" + "2" * 32)
    store.delete(SNAPSHOT)
    assert not list(store.directory.iterdir())  # the cached manifest went with it
    with pytest.raises(NotFound):
        exports.require(SNAPSHOT)
