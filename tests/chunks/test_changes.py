"""Change detection on real xfs, btrfs and ext4 filesystems on loop devices: with
reflinks a capture reads only the chunks whose extents changed; without, it hashes."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.changes import ChangeTracker, Method, describe_since_capture
from csi_driver.chunks.extents import can_reflink, changed_ranges, extent_map, reflink
from csi_driver.chunks.manifest import BLOCK_SIZE, MiB
from csi_driver.chunks.scan import scan_image
from csi_driver.node.pool import preallocate
from tests.chunks.images import write_at
from tests.node.conftest import requires_root, small_filesystem

pytestmark = [requires_root, pytest.mark.root]

REFLINK_FILESYSTEMS = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q"],
}


def thick_image(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        preallocate(fd, 0, size, "test")
    finally:
        os.close(fd)


def mkfs(fs: str) -> list[str]:
    argv = REFLINK_FILESYSTEMS[fs]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (scripts/setup.sh installs it)")
    return argv


@pytest.mark.parametrize("fs", sorted(REFLINK_FILESYSTEMS))
def test_a_capture_reads_only_the_chunks_written_since_the_last(tmp_path: Path, fs: str) -> None:
    with small_filesystem(tmp_path, 320 * MiB, mkfs(fs)) as mount:
        assert can_reflink(mount)
        image = mount / "image.img"
        thick_image(image, 64 * MiB)
        rng = random.Random(8)
        for index in (0, 5, 6, 40):
            write_at(image, index * MiB, rng.randbytes(MiB))
        tracker = ChangeTracker(image, mount / "track", chunk_size=MiB)
        first = tracker.capture()
        assert first.method is Method.FULL
        assert first.manifest.data_chunks == (0, 5, 6, 40)

        for offset in (5 * MiB + 4096, 41 * MiB + 100 * 1024, 63 * MiB):
            write_at(image, offset, b"\xab" * 4096)
        second = tracker.capture()
        assert second.method is Method.EXTENTS
        # The 64 KiB blocks holding the three writes (in chunks 5, 41, 63), nothing else.
        assert second.bytes_read == 3 * BLOCK_SIZE
        fresh = BlockTable.create(tmp_path / "fresh.blocks", 64 * MiB, MiB)
        assert second.manifest == scan_image(second.source, MiB, table=fresh).manifest
        assert second.blocks is not None
        assert second.blocks.read_bytes() == fresh.path.read_bytes()  # table kept exact
        assert second.manifest.data_chunks == (0, 5, 6, 40, 41, 63)
        assert not first.source.exists()  # the older snapshot went after the new manifest

        third = tracker.capture(keep_older=True)
        assert third.method is Method.EXTENTS and third.bytes_read == 0
        assert third.manifest == second.manifest
        assert second.source.exists()  # kept until the new capture is served
        tracker.retire_older()
        assert not second.source.exists() and third.source.exists()
        assert tracker.last() == (third.number, third.manifest)


@pytest.mark.parametrize("fs", sorted(REFLINK_FILESYSTEMS))
def test_extent_comparison_reports_exactly_the_rewritten_ranges(tmp_path: Path, fs: str) -> None:
    with small_filesystem(tmp_path, 320 * MiB, mkfs(fs)) as mount:
        image, snapshot = mount / "image.img", mount / "snap.img"
        image.write_bytes(os.urandom(16 * MiB))
        reflink(image, snapshot)
        assert changed_ranges(extent_map(snapshot), extent_map(image), 16 * MiB) == []
        write_at(image, 3 * MiB, b"\1" * 8192)
        ranges = changed_ranges(extent_map(snapshot), extent_map(image), 16 * MiB)
        assert ranges and all(3 * MiB - 256 * 1024 <= o < 3 * MiB + 256 * 1024 for o, _ in ranges)
        assert sum(length for _, length in ranges) <= MiB


def test_without_reflinks_a_capture_hashes_the_image(tmp_path: Path) -> None:
    with small_filesystem(tmp_path, 128 * MiB, ["mkfs.ext4", "-q"]) as mount:
        assert not can_reflink(mount)
        image = mount / "image.img"
        thick_image(image, 16 * MiB)
        write_at(image, 2 * MiB, b"\1" * 4096)
        tracker = ChangeTracker(image, mount / "track", chunk_size=MiB)
        capture = tracker.capture()
        assert capture.method is Method.HASHING and capture.source == image
        assert capture.manifest.data_chunks == (2,)


@pytest.mark.parametrize("fs", sorted(REFLINK_FILESYSTEMS))
def test_reserving_a_hole_again_is_not_a_change(tmp_path: Path, fs: str) -> None:
    """The pool's keep_reserved fills holes with unwritten extents: both read as zeros."""
    with small_filesystem(tmp_path, 320 * MiB, mkfs(fs)) as mount:
        image, snapshot = mount / "image.img", mount / "snap.img"
        image.write_bytes(os.urandom(MiB))
        os.truncate(image, 16 * MiB)
        reflink(image, snapshot)
        thick_image(image, 16 * MiB)
        assert changed_ranges(extent_map(snapshot), extent_map(image), 16 * MiB) == []
        write_at(image, 9 * MiB, b"\1" * 4096)  # a write into the reserved space is one
        ranges = changed_ranges(extent_map(snapshot), extent_map(image), 16 * MiB)
        assert ranges and all(8 * MiB <= o < 10 * MiB for o, _ in ranges)


@pytest.mark.parametrize("fs", sorted(REFLINK_FILESYSTEMS))
def test_a_seeded_lineage_captures_by_extents_from_the_first_capture(
    tmp_path: Path, fs: str
) -> None:
    """A replica generation made primary: its verified manifest and table start the
    lineage, so the new primary's first capture reads only what was written since."""
    with small_filesystem(tmp_path, 320 * MiB, mkfs(fs)) as mount:
        image = mount / "image.img"
        thick_image(image, 32 * MiB)
        for index in (1, 7, 30):
            write_at(image, index * MiB, os.urandom(MiB))
        table = BlockTable.create(mount / "image.blocks", 32 * MiB, MiB)
        manifest = scan_image(image, MiB, table=table).manifest
        table.close()
        tracker = ChangeTracker(image, mount / "track", chunk_size=MiB)
        assert tracker.seed(image, manifest, table.path)

        write_at(image, 7 * MiB + 8192, b"\2" * 4096)
        capture = tracker.capture()

        assert capture.method is Method.EXTENTS and capture.bytes_read == BLOCK_SIZE
        fresh = BlockTable.create(tmp_path / "fresh.blocks", 32 * MiB, MiB)
        assert capture.manifest == scan_image(image, MiB, table=fresh).manifest
        assert capture.blocks is not None
        assert capture.blocks.read_bytes() == fresh.path.read_bytes()


def test_seeding_where_nothing_reflinks_keeps_nothing(tmp_path: Path) -> None:
    with small_filesystem(tmp_path, 128 * MiB, ["mkfs.ext4", "-q"]) as mount:
        image = mount / "image.img"
        image.write_bytes(b"\1" * 4096)
        table = BlockTable.create(mount / "image.blocks", 4096, MiB)
        manifest = scan_image(image, MiB, table=table).manifest
        table.close()
        tracker = ChangeTracker(image, mount / "track", chunk_size=MiB)
        assert not tracker.seed(image, manifest, table.path)
        assert list((mount / "track").iterdir()) == []
        assert tracker.capture().method is Method.HASHING


@pytest.mark.parametrize("fs", sorted(REFLINK_FILESYSTEMS))
def test_an_image_is_described_from_its_last_capture_by_extents(tmp_path: Path, fs: str) -> None:
    """A demoted primary's image: its manifest and table from the move's final capture,
    reading only what changed since; nothing to go on, the caller scans."""
    with small_filesystem(tmp_path, 320 * MiB, mkfs(fs)) as mount:
        image = mount / "image.img"
        thick_image(image, 32 * MiB)
        for index in (0, 12):
            write_at(image, index * MiB, os.urandom(MiB))
        lineage = mount / "track"
        ChangeTracker(image, lineage, chunk_size=MiB).capture()
        write_at(image, 20 * MiB, b"\3" * 4096)

        described = describe_since_capture(lineage, image, mount / "described.blocks")

        assert described is not None and described.bytes_read == BLOCK_SIZE
        fresh = BlockTable.create(tmp_path / "fresh.blocks", 32 * MiB, MiB)
        assert described.manifest == scan_image(image, MiB, table=fresh).manifest
        assert (mount / "described.blocks").read_bytes() == fresh.path.read_bytes()
        shutil.rmtree(lineage)
        assert describe_since_capture(lineage, image, mount / "again.blocks") is None
