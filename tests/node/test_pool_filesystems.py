"""Thick images on real small filesystems: a full one refuses, one without
fallocate refuses, and neither leaves anything behind; thin images still work."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver.core.errors import FailedPrecondition, ResourceExhausted
from csi_driver.core.model import GiB, MiB
from csi_driver.node.pool import Pool
from tests.node.conftest import new_volume_id, requires_root, small_filesystem

pytestmark = [requires_root, pytest.mark.root]


def _leftovers(pool: Pool) -> list[str]:
    return sorted(p.name for p in pool.images_dir.iterdir())


def test_a_reservation_the_filesystem_cannot_hold_is_refused(tmp_path: Path) -> None:
    with small_filesystem(tmp_path, 64 * MiB, ["mkfs.ext4", "-q", "-m", "0"]) as fs:
        # A configured capacity larger than the filesystem: the promise is checked
        # against the real free space when the image is made.
        pool = Pool(fs / "pool", capacity_bytes=1 * GiB)
        with pytest.raises(ResourceExhausted, match="no room left to reserve"):
            pool.create_image(new_volume_id(1), 100 * MiB, epoch=1)
        assert _leftovers(pool) == [] and pool.provisioned_bytes == 0
        thin = pool.create_image(new_volume_id(1), 100 * MiB, epoch=1, thin=True)
        assert thin.thin and pool.shortfall() > 0
        thick = pool.create_image(new_volume_id(2), 16 * MiB, epoch=1)
        with pytest.raises(ResourceExhausted):
            pool.expand_image(thick.volume_id, 200 * MiB)
        # The failed growth left the image as it was, its space still reserved.
        assert pool.require(thick.volume_id).size_bytes == 16 * MiB
        assert pool.require(thick.volume_id).unallocated_bytes == 0


def test_a_filesystem_without_fallocate_cannot_hold_thick_images(tmp_path: Path) -> None:
    with small_filesystem(tmp_path, 64 * MiB, ["mkfs.ext2", "-q"]) as fs:
        pool = Pool(fs / "pool", capacity_bytes=32 * MiB)
        with pytest.raises(FailedPrecondition, match="provisioning: thin"):
            pool.create_image(new_volume_id(1), 8 * MiB, epoch=1)
        assert _leftovers(pool) == [] and pool.provisioned_bytes == 0
        assert pool.create_image(new_volume_id(1), 8 * MiB, epoch=1, thin=True).thin
