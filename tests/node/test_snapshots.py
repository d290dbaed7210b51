"""A node's snapshot store on real pool filesystems: reflink where it can, copy elsewhere.

A snapshot must hold the image's bytes at the moment it was taken, whatever
is written to the image afterwards; on xfs (reflink=1) it shares the blocks
(FICLONE), on ext4 it is a copy of the data ranges. A restore starts as the
snapshot's bytes and is grown (reserved) to its volume's size.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver.core.model import MiB
from csi_driver.core.records import SnapshotMethod
from csi_driver.node.pool import Pool
from csi_driver.node.snapshots import SnapshotStore, copy_image
from tests.node.conftest import new_volume_id, requires_root, small_filesystem

SNAPSHOT = "snap-" + "1" * 32
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
