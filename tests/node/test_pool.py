from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from csi_driver.backup.repository import part_path
from csi_driver.core.errors import AlreadyExists, InvalidArgument, OutOfRange, ResourceExhausted
from csi_driver.core.model import MiB
from csi_driver.node.pool import Pool
from csi_driver.sandbox.scratch import scratch_filesystem
from tests.node.conftest import requires_root

VOL_A = "vol-" + "a" * 32
VOL_B = "vol-" + "b" * 32


@pytest.fixture
def small_pool(tmp_path: Path) -> Pool:
    return Pool(tmp_path / "pool", capacity_bytes=100 * MiB)


def test_thick_image_reserves_its_space_without_writing(small_pool: Pool) -> None:
    info = small_pool.create_image(VOL_A, 64 * MiB, epoch=1)
    assert (info.size_bytes, info.thin) == (64 * MiB, False)
    assert info.allocated_bytes >= 64 * MiB and info.unallocated_bytes == 0
    assert info.path.stat().st_mode & 0o777 == 0o600
    assert small_pool.get(VOL_A) == info
    # Reserved as unwritten extents: no data to seek to (checked before reading,
    # which would cache zero pages that count as data), and reads as zeros.
    with open(info.path, "rb") as image:
        with pytest.raises(OSError):
            os.lseek(image.fileno(), 0, os.SEEK_DATA)
        assert image.read(1 * MiB) == bytes(1 * MiB)


def test_thin_image_is_sparse(small_pool: Pool) -> None:
    info = small_pool.create_image(VOL_A, 64 * MiB, epoch=1, thin=True)
    assert (info.size_bytes, info.thin) == (64 * MiB, True)
    assert info.allocated_bytes < 1 * MiB
    assert info.unallocated_bytes > 63 * MiB
    assert small_pool.get(VOL_A) == info


def test_create_with_the_other_kind_is_already_exists(small_pool: Pool) -> None:
    small_pool.create_image(VOL_A, 10 * MiB, epoch=1)
    with pytest.raises(AlreadyExists, match="thick"):
        small_pool.create_image(VOL_A, 10 * MiB, epoch=1, thin=True)


def test_expand_reserves_the_new_range_of_a_thick_image(small_pool: Pool) -> None:
    small_pool.create_image(VOL_A, 10 * MiB, epoch=1)
    small_pool.create_image(VOL_B, 10 * MiB, epoch=1, thin=True)
    assert small_pool.expand_image(VOL_A, 40 * MiB).allocated_bytes >= 40 * MiB
    assert small_pool.expand_image(VOL_B, 40 * MiB).allocated_bytes < 1 * MiB


def test_shortfall_counts_what_thin_images_may_still_claim(small_pool: Pool) -> None:
    small_pool.create_image(VOL_A, 10 * MiB, epoch=1)
    assert small_pool.shortfall() == 0
    small_pool.create_image(VOL_B, 10 * MiB, epoch=1, thin=True)
    assert small_pool.shortfall() == 0  # the host filesystem has far more than 10 MiB free


def test_size_is_rounded_up_to_whole_mib(small_pool: Pool) -> None:
    assert small_pool.create_image(VOL_A, 1, epoch=1).size_bytes == 1 * MiB


def test_create_is_idempotent_for_same_size(small_pool: Pool) -> None:
    first = small_pool.create_image(VOL_A, 10 * MiB, epoch=1)
    assert small_pool.create_image(VOL_A, 10 * MiB, epoch=1) == first
    assert small_pool.status().image_count == 1


def test_create_with_other_size_is_already_exists(small_pool: Pool) -> None:
    small_pool.create_image(VOL_A, 10 * MiB, epoch=1)
    with pytest.raises(AlreadyExists):
        small_pool.create_image(VOL_A, 20 * MiB, epoch=1)


def test_capacity_is_never_over_committed(small_pool: Pool) -> None:
    small_pool.create_image(VOL_A, 60 * MiB, epoch=1)
    with pytest.raises(ResourceExhausted, match="40"):
        small_pool.create_image(VOL_B, 41 * MiB, epoch=1)
    assert small_pool.get(VOL_B) is None
    small_pool.create_image(VOL_B, 40 * MiB, epoch=1)
    status = small_pool.status()
    assert (status.provisioned_bytes, status.available_bytes) == (100 * MiB, 0)


def test_larger_than_whole_pool_is_out_of_range(small_pool: Pool) -> None:
    with pytest.raises(OutOfRange):
        small_pool.create_image(VOL_A, 101 * MiB, epoch=1)


def test_delete_is_idempotent_and_frees_capacity(small_pool: Pool) -> None:
    small_pool.create_image(VOL_A, 60 * MiB, epoch=1)
    small_pool.delete_image(VOL_A)
    small_pool.delete_image(VOL_A)
    assert small_pool.get(VOL_A) is None
    assert small_pool.status().provisioned_bytes == 0


def test_delete_removes_an_interrupted_restore_into_the_volume(small_pool: Pool) -> None:
    image = small_pool.create_image(VOL_A, 8 * MiB, epoch=1).path
    other = small_pool.create_image(VOL_B, 8 * MiB, epoch=1).path
    mine = part_path(image, "20261127T050801Z-4a526434")
    theirs = part_path(other, "20261127T050801Z-4a526434")
    for part in (mine, theirs):
        part.write_bytes(b"restored so far")
    small_pool.delete_image(VOL_A)
    assert not mine.exists() and theirs.exists()


def test_expand_grows_and_never_shrinks(small_pool: Pool) -> None:
    small_pool.create_image(VOL_A, 10 * MiB, epoch=1)
    assert small_pool.expand_image(VOL_A, 30 * MiB).size_bytes == 30 * MiB
    assert small_pool.expand_image(VOL_A, 20 * MiB).size_bytes == 30 * MiB
    with pytest.raises(ResourceExhausted):
        small_pool.expand_image(VOL_A, 101 * MiB - 1)


def test_bad_ids_never_become_paths(small_pool: Pool) -> None:
    for bad in ("../../etc/passwd", "vol-xyz", "", "vol-" + "A" * 32):
        with pytest.raises(InvalidArgument):
            small_pool.create_image(bad, MiB, epoch=1)


def test_pool_survives_reopen_and_drops_temp_files(tmp_path: Path) -> None:
    first = Pool(tmp_path / "pool", capacity_bytes=100 * MiB)
    first.create_image(VOL_A, 8 * MiB, epoch=3)
    (first.images_dir / f".{VOL_B}.json.tmp").write_text("{half")
    again = Pool(tmp_path / "pool", capacity_bytes=100 * MiB)
    assert [i.volume_id for i in again.images()] == [VOL_A]
    assert again.require(VOL_A).epoch == 3
    assert not list(again.images_dir.glob(".*.tmp"))


def test_default_capacity_follows_the_filesystem(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "pool")
    assert pool.capacity_bytes > 0
    assert pool.status().filesystem != "unknown"


@requires_root
@pytest.mark.root
def test_restart_recomputes_capacity_for_thick_and_thin(tmp_path: Path) -> None:
    """Reserved bytes count as the pool's own, a thin image's unwritten ones stay free."""
    # A filesystem of the test's own: on the shared host one, other users' writes
    # between the two Pool() calls moved the free space by hundreds of MiB.
    with scratch_filesystem(tmp_path, 256 * MiB, ["mkfs.ext4", "-q"]) as mount:
        first = Pool(mount / "pool")
        first.create_image(VOL_A, 32 * MiB, epoch=1)
        first.create_image(VOL_B, 32 * MiB, epoch=1, thin=True)
        again = Pool(mount / "pool")
        # The thick image left the filesystem's free space but is counted back in
        # (give or take the filesystem's own metadata for it: far below its 32 MiB).
        assert abs(again.capacity_bytes - first.capacity_bytes) < 4 * MiB
        assert again.status().provisioned_bytes == 64 * MiB
        assert {i.volume_id: i.thin for i in again.images()} == {VOL_A: False, VOL_B: True}


def test_reservations_track_every_change(small_pool: Pool, tmp_path: Path) -> None:
    small_pool.create_image(VOL_A, 30 * MiB, epoch=1)
    small_pool.expand_image(VOL_A, 50 * MiB)
    small_pool.create_image(VOL_B, 50 * MiB, epoch=1)
    with pytest.raises(ResourceExhausted):
        small_pool.create_image("vol-" + "c" * 32, 1 * MiB, epoch=1)
    small_pool.delete_image(VOL_B)
    small_pool.delete_image(VOL_B)  # a repeat must not free the space twice
    with pytest.raises(ResourceExhausted):
        small_pool.create_image(VOL_B, 51 * MiB, epoch=1)
    small_pool.create_image(VOL_B, 50 * MiB, epoch=1)
    reopened = Pool(small_pool.root, capacity_bytes=100 * MiB)
    with pytest.raises(ResourceExhausted):
        reopened.create_image("vol-" + "c" * 32, 1 * MiB, epoch=1)


def test_keep_reserved_fills_holes_punched_in_thick_images(small_pool: Pool) -> None:
    """A loop device punches holes for discard and "write zeroes"; they are reserved
    again without touching any data."""
    thick = small_pool.create_image(VOL_A, 32 * MiB, epoch=1)
    small_pool.create_image(VOL_B, 32 * MiB, epoch=1, thin=True)
    payload = os.urandom(1 * MiB)
    with open(thick.path, "r+b") as image:
        image.write(payload)
        image.seek(20 * MiB)
        image.write(payload)
    hole = ["--punch-hole", "--offset", str(8 * MiB), "--length", str(4 * MiB)]
    subprocess.run(["fallocate", *hole, str(thick.path)], check=True)
    assert small_pool.require(VOL_A).unallocated_bytes >= 4 * MiB - 64 * 1024
    assert small_pool.keep_reserved() == [VOL_A]  # the thin image is left sparse
    assert small_pool.require(VOL_A).unallocated_bytes == 0
    assert small_pool.require(VOL_B).unallocated_bytes > 31 * MiB
    with open(thick.path, "rb") as image:
        assert image.read(1 * MiB) == payload
        image.seek(8 * MiB)
        assert image.read(4 * MiB) == bytes(4 * MiB)
        image.seek(20 * MiB)
        assert image.read(1 * MiB) == payload
    assert small_pool.keep_reserved() == []


def test_concurrent_creates_never_over_commit_and_all_survive_reopen(tmp_path: Path) -> None:
    """Creates write their files outside the pool's lock and share directory fsyncs:
    the reservation still admits exactly what fits, a repeat of one volume waits for
    its first create, and every image acknowledged is there after a reopen."""
    pool = Pool(tmp_path / "pool", capacity_bytes=10 * MiB)
    volumes = [f"vol-{i:032x}" for i in range(16)]
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(len(volumes) + 1)

    def create(volume_id: str, key: str) -> None:
        barrier.wait()
        try:
            outcomes[key] = pool.create_image(volume_id, 1 * MiB, epoch=1, thin=True)
        except ResourceExhausted as exc:
            outcomes[key] = exc

    threads = [threading.Thread(target=create, args=(v, v)) for v in volumes]
    threads.append(threading.Thread(target=create, args=(volumes[0], "repeat")))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    created = {k for k, v in outcomes.items() if not isinstance(v, ResourceExhausted)} - {"repeat"}
    refused = [k for k, v in outcomes.items() if isinstance(v, ResourceExhausted)]
    assert len(outcomes) == len(volumes) + 1
    assert len(created) == 10 and pool.provisioned_bytes == 10 * MiB
    if "repeat" not in refused:  # it ran after the first create of volumes[0] finished
        assert outcomes["repeat"] == outcomes[volumes[0]]
    reopened = Pool(tmp_path / "pool", capacity_bytes=10 * MiB)
    assert {i.volume_id for i in reopened.images()} == created
    assert sorted(reopened.images(), key=lambda i: i.volume_id) == pool.images()


def _allocated(pool: Pool, volume_id: str, restat: set[str]) -> int:
    return next(i.allocated_bytes for i in pool.images(restat=restat) if i.volume_id == volume_id)


def test_a_scan_restats_only_the_images_that_may_have_changed(small_pool: Pool) -> None:
    """The heartbeat's scan: images in use are read again; the others are as the last
    scan found them unless the pool (or an unstage) changed them since."""
    small_pool.create_image(VOL_A, 8 * MiB, epoch=1, thin=True)
    small_pool.create_image(VOL_B, 8 * MiB, epoch=1, thin=True)
    first = {i.volume_id: i.allocated_bytes for i in small_pool.images()}
    for volume_id in (VOL_A, VOL_B):  # as a loop device writes it: behind the pool's back
        with open(small_pool.image_path(volume_id), "r+b") as image:
            image.write(os.urandom(1 * MiB))
            os.fsync(image.fileno())
    assert _allocated(small_pool, VOL_A, set()) == first[VOL_A]  # not in use: not read
    assert _allocated(small_pool, VOL_A, {VOL_A}) >= first[VOL_A] + 1 * MiB
    assert _allocated(small_pool, VOL_B, set()) == first[VOL_B]
    small_pool.written(VOL_B)  # its loop device detached (an unstage)
    assert _allocated(small_pool, VOL_B, set()) >= first[VOL_B] + 1 * MiB
    small_pool.expand_image(VOL_A, 16 * MiB)  # the pool's own change
    assert [i.size_bytes for i in small_pool.images(restat=set())] == [16 * MiB, 8 * MiB]
    assert small_pool.images(restat=set()) == small_pool.images()
    small_pool.delete_image(VOL_A)
    assert [i.volume_id for i in small_pool.images(restat=set())] == [VOL_B]


def test_keep_reserved_skips_an_image_deleted_since_the_scan(small_pool: Pool) -> None:
    thick = small_pool.create_image(VOL_A, 16 * MiB, epoch=1)
    subprocess.run(
        ["fallocate", "--punch-hole", "--offset", "0", "--length", str(4 * MiB), str(thick.path)],
        check=True,
    )
    scanned = small_pool.images()
    small_pool.delete_image(VOL_A)
    assert small_pool.keep_reserved(scanned) == []
    assert not thick.path.exists()


def test_an_image_made_ahead_is_invisible_until_kept(small_pool: Pool) -> None:
    made = small_pool.create_ahead(VOL_A, 8 * MiB, epoch=1, thin=True)
    assert made.path == small_pool.image_path(VOL_A) and not made.path.exists()
    assert small_pool.get(VOL_A) is None and small_pool.images() == []
    assert small_pool.provisioned_bytes == 8 * MiB  # reserved meanwhile
    assert small_pool.ahead() == []  # being made: not a crash's leftover
    small_pool.create_image(VOL_B, 8 * MiB, epoch=1)
    with pytest.raises(AlreadyExists):
        small_pool.create_ahead(VOL_B, 8 * MiB, epoch=1)
    kept = small_pool.keep_ahead(VOL_A)
    assert (kept.size_bytes, kept.epoch, kept.thin) == (8 * MiB, 1, True)
    assert [i.volume_id for i in small_pool.images()] == [VOL_A, VOL_B]
    assert not [p for p in small_pool.images_dir.iterdir() if p.name.endswith(".ahead")]


def test_an_image_made_ahead_and_dropped_leaves_nothing(small_pool: Pool) -> None:
    small_pool.create_ahead(VOL_A, 8 * MiB, epoch=1)
    small_pool.drop_ahead(VOL_A)
    assert small_pool.provisioned_bytes == 0 and small_pool.images() == []
    assert list(small_pool.images_dir.iterdir()) == []
    small_pool.create_image(VOL_B, 96 * MiB, epoch=1, thin=True)
    with pytest.raises(ResourceExhausted):
        small_pool.create_ahead(VOL_A, 8 * MiB, epoch=1)
    assert small_pool.provisioned_bytes == 96 * MiB
    assert [p.name for p in small_pool.images_dir.iterdir() if VOL_A in p.name] == []


@pytest.mark.parametrize("kept", [True, False])
def test_a_crash_leftover_made_ahead_is_settled_after_a_reopen(
    small_pool: Pool, kept: bool
) -> None:
    """What a killed process left: listed by a reopened pool, not counted or seen
    until settled one way or the other."""
    small_pool.create_ahead(VOL_A, 8 * MiB, epoch=2)
    reopened = Pool(small_pool.root, capacity_bytes=100 * MiB)
    assert reopened.ahead() == [VOL_A]
    assert reopened.images() == [] and reopened.provisioned_bytes == 0
    if kept:
        info = reopened.keep_ahead(VOL_A)
        assert (info.size_bytes, info.epoch, info.thin) == (8 * MiB, 2, False)
        assert reopened.provisioned_bytes == 8 * MiB
        assert Pool(small_pool.root, capacity_bytes=100 * MiB).images() == [info]
    else:
        reopened.drop_ahead(VOL_A)
        assert list(reopened.images_dir.iterdir()) == []
    assert reopened.ahead() == []


def test_an_image_made_ahead_whose_rename_failed_is_kept_by_the_next_reconcile(
    small_pool: Pool,
) -> None:
    """keep_ahead failing after the txn (here: a directory in the image's place)
    leaves the image settleable: no longer in flight, kept once the way is clear."""
    small_pool.create_ahead(VOL_A, 8 * MiB, epoch=1, thin=True)
    small_pool.image_path(VOL_A).mkdir()
    (small_pool.image_path(VOL_A) / "blocker").touch()
    with pytest.raises(OSError):
        small_pool.keep_ahead(VOL_A)
    assert small_pool.ahead() == [VOL_A] and small_pool.get(VOL_A) is None
    (small_pool.image_path(VOL_A) / "blocker").unlink()
    small_pool.image_path(VOL_A).rmdir()
    kept = small_pool.kept_ahead(VOL_A)
    assert kept is not None and (kept.size_bytes, kept.thin) == (8 * MiB, True)
    assert small_pool.get(VOL_A) == kept and small_pool.provisioned_bytes == 8 * MiB
    assert small_pool.kept_ahead(VOL_A) is None and small_pool.ahead() == []


def test_an_image_left_by_an_undecided_commit_keeps_its_space_until_settled(
    small_pool: Pool,
) -> None:
    """leave_ahead: not being made any more, not visible, still reserved, and listed
    unsettled (in this process and by a reopened pool) until kept or dropped."""
    small_pool.create_ahead(VOL_A, 60 * MiB, epoch=1, thin=True)
    assert not small_pool.unsettled(VOL_A)  # being made
    small_pool.leave_ahead(VOL_A)
    assert small_pool.unsettled(VOL_A) and small_pool.ahead() == [VOL_A]
    assert small_pool.get(VOL_A) is None and small_pool.images() == []
    assert small_pool.provisioned_bytes == 60 * MiB
    with pytest.raises(ResourceExhausted):  # its space is still taken
        small_pool.create_image(VOL_B, 60 * MiB, epoch=1, thin=True)
    assert Pool(small_pool.root, capacity_bytes=100 * MiB).unsettled(VOL_A)
    small_pool.drop_ahead(VOL_A)
    assert not small_pool.unsettled(VOL_A) and small_pool.provisioned_bytes == 0
    assert list(small_pool.images_dir.iterdir()) == []
    small_pool.create_image(VOL_B, 60 * MiB, epoch=1, thin=True)
