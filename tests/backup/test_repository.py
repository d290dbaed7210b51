"""Backups through a real target (a directory and moto's S3 server): round trips,
deduplication and incrementality counted in bytes uploaded, tampering, wrong keys."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from csi_driver.backup.format import open_manifest
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import (
    MANIFESTS,
    Repository,
    backup_image,
    restore_image,
    verify_backup,
)
from csi_driver.backup.targets import FilesystemTarget, Target
from csi_driver.backup.upload import index_key, pack_key
from csi_driver.chunks.manifest import BLOCK_SIZE
from csi_driver.chunks.scan import scan_image
from csi_driver.core.errors import AlreadyExists, DataLoss, FailedPrecondition, NotFound
from tests.backup.conftest import (
    CHUNK,
    GRACE_S,
    block_entries,
    mixed_image,
    open_repo,
    packs,
    random_chunks,
    rewrite_pack,
    write_image,
)
from tests.backup.test_targets import resident_pages

BLOCKS_PER_CHUNK = CHUNK // BLOCK_SIZE


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(target: Target, key: str, at: int = -1) -> None:
    data = bytearray(target.get(key))
    data[at] ^= 0x01
    target.put(key, bytes(data))


def test_restore_is_byte_identical_and_keeps_holes(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    mixed_image(image)
    result = backup_image(repo, image, volume_name="db")
    source_manifest = scan_image(image, CHUNK).manifest
    assert result.backup.manifest == source_manifest
    restored = restore_image(repo, result.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)
    assert restored.chunks_fetched == len(source_manifest.data_chunks)
    # Holes stay holes: the restored file holds only the data chunks.
    assert restored.path.stat().st_blocks * 512 <= source_manifest.data_bytes + CHUNK
    assert [b.backup_id for b in repo.backups()] == [result.backup.backup_id]


def test_compressible_chunks_are_stored_smaller(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, {0: b"a" * CHUNK, 1: random_chunks([1], 3)[1]}, 2)
    backup_image(fs_repo, image, volume_name="db")
    sizes = sorted(entry.stored for _, entry in block_entries(fs_repo))
    # Chunk 0's four blocks are one block, stored once and compressed by zstd.
    assert len(sizes) == 1 + BLOCKS_PER_CHUNK and sizes[0] < BLOCK_SIZE // 50
    # Random: stored as is, plus flags, nonce and tag.
    assert sizes[1:] == [BLOCK_SIZE + 29] * BLOCKS_PER_CHUNK


def test_second_backup_of_an_unchanged_volume_uploads_only_a_manifest(
    repo: Repository, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    mixed_image(image)
    first = backup_image(repo, image, volume_name="db")
    packs_after_first = packs(repo.target)
    assert first.chunks_uploaded == 16  # the zero chunk is a hole
    assert first.packs_uploaded == len(packs_after_first) == len(repo.indexes())
    second = backup_image(repo, image, volume_name="db")
    assert (second.chunks_uploaded, second.blocks_uploaded, second.packs_uploaded) == (0, 0, 0)
    manifest_size = len(repo.target.get(MANIFESTS + second.backup.backup_id))
    # The manifest, plus the claim's heartbeats and its lists of block ids (two batches).
    claimed = 16 * BLOCKS_PER_CHUNK * 32
    assert manifest_size <= second.bytes_uploaded <= manifest_size + claimed + 400
    assert packs(repo.target) == packs_after_first


def test_a_changed_chunk_is_all_a_backup_uploads(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    mixed_image(image)
    backup_image(fs_repo, image, volume_name="db")
    with open(image, "r+b") as handle:
        handle.seek(7 * CHUNK + 100)
        handle.write(b"changed")
    result = backup_image(fs_repo, image, volume_name="db")
    assert (result.chunks_uploaded, result.blocks_uploaded, result.packs_uploaded) == (1, 1, 1)
    assert result.bytes_uploaded < 2 * BLOCK_SIZE
    restored = restore_image(fs_repo, result.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)


def test_chunks_are_shared_across_volumes(fs_repo: Repository, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    chunks = random_chunks(range(8), 5)
    write_image(first, chunks, 8)
    write_image(second, {**chunks, 3: random_chunks([3], 6)[3]}, 8)
    backup_image(fs_repo, first, volume_name="a")
    result = backup_image(fs_repo, second, volume_name="b")
    assert (result.chunks_uploaded, result.blocks_uploaded) == (1, BLOCKS_PER_CHUNK)
    assert len(block_entries(fs_repo)) == 9 * BLOCKS_PER_CHUNK


def test_the_target_holds_no_plaintext_and_no_content_hashes(
    repo: Repository, tmp_path: Path
) -> None:
    pattern = b"FERRY-SECRET-PATTERN-0123456789"
    image = tmp_path / "image"
    write_image(image, {0: (pattern * CHUNK)[:CHUNK], 1: random_chunks([1], 2)[1]}, 2)
    result = backup_image(repo, image, volume_name="customer-db")
    plain_hashes = {hashlib.sha256((pattern * CHUNK)[:CHUNK]).hexdigest()}
    for stored in repo.target.list(""):
        assert stored.key.rsplit("/", 1)[-1] not in plain_hashes
        blob = repo.target.get(stored.key)
        assert pattern[:16] not in blob
        assert b"customer-db" not in blob
    assert result.backup.info.volume_name == "customer-db"


def test_a_tampered_chunk_is_detected_by_verify_and_restore(
    repo: Repository, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    mixed_image(image)
    result = backup_image(repo, image, volume_name="db")
    pack_id, victim = block_entries(repo)[7]

    def flip(data: bytearray) -> None:
        data[victim.offset + victim.stored - 1] ^= 0x01

    rewrite_pack(repo.target, pack_id, flip)
    with pytest.raises(DataLoss) as caught:
        verify_backup(repo, result.backup.backup_id)
    assert "1 of 16 chunks" in caught.value.message
    assert victim.block_id.hex() in caught.value.message
    destination = tmp_path / "restored"
    with pytest.raises(DataLoss, match="failed authentication"):
        restore_image(repo, result.backup.backup_id, destination)
    assert not destination.exists()


def test_a_block_swapped_for_another_is_detected(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    result = backup_image(fs_repo, image, volume_name="db")
    pack_id, first = block_entries(fs_repo)[0]
    second = block_entries(fs_repo)[1][1]
    assert first.stored == second.stored

    def swap(data: bytearray) -> None:
        one = data[first.offset : first.offset + first.stored]
        data[first.offset : first.offset + first.stored] = data[
            second.offset : second.offset + second.stored
        ]
        data[second.offset : second.offset + second.stored] = one

    rewrite_pack(fs_repo.target, pack_id, swap)
    with pytest.raises(DataLoss, match="failed authentication"):
        verify_backup(fs_repo, result.backup.backup_id)


def test_a_tampered_or_swapped_index_is_detected(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    result = backup_image(fs_repo, image, volume_name="db")
    one, two = sorted(fs_repo.indexes())
    fs_repo.target.put(index_key(one), fs_repo.target.get(index_key(two)))
    with pytest.raises(DataLoss, match="altered or renamed"):
        verify_backup(fs_repo, result.backup.backup_id)
    flip_byte(fs_repo.target, index_key(two))
    with pytest.raises(DataLoss):
        restore_image(fs_repo, result.backup.backup_id, tmp_path / "restored")


def test_a_missing_pack_is_named(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    result = backup_image(fs_repo, image, volume_name="db")
    gone = sorted(fs_repo.indexes())[0]
    fs_repo.target.delete(pack_key(gone))
    with pytest.raises(DataLoss, match="missing or damaged") as caught:
        verify_backup(fs_repo, result.backup.backup_id)
    assert gone.hex() in caught.value.message


def test_a_tampered_or_renamed_manifest_is_detected(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    one = backup_image(repo, image, volume_name="db").backup.backup_id
    two = backup_image(repo, image, volume_name="db").backup.backup_id
    # Renamed: the other backup's (authentic) manifest under this id.
    repo.target.put(MANIFESTS + one, repo.target.get(MANIFESTS + two))
    with pytest.raises(DataLoss, match="altered or renamed"):
        restore_image(repo, one, tmp_path / "one")
    flip_byte(repo.target, MANIFESTS + two, at=40)
    with pytest.raises(DataLoss):
        verify_backup(repo, two)
    with pytest.raises(DataLoss):
        repo.backups()


def test_a_wrong_key_is_a_clear_error(
    repo: Repository, target: Target, key: BackupKey, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    backup_id = backup_image(repo, image, volume_name="db").backup.backup_id
    other = BackupKey.generate()
    with pytest.raises(FailedPrecondition) as caught:
        Repository.open(target, other, grace_s=GRACE_S)
    assert key.key_id_hex in caught.value.message
    assert other.key_id_hex in caught.value.message
    with pytest.raises(FailedPrecondition, match="the key the backups were made with"):
        open_manifest(other, backup_id, target.get(MANIFESTS + backup_id))
    # A manifest whose key id was rewritten to the reader's still fails: it is sealed.
    blob = bytearray(target.get(MANIFESTS + backup_id))
    blob[4:12] = other.key_id
    with pytest.raises(DataLoss):
        open_manifest(other, backup_id, bytes(blob))


def test_a_tampered_config_is_detected(
    fs_repo: Repository, fs_target: Target, key: BackupKey
) -> None:
    config = fs_target.get("config").replace(b'"chunk_size": 262144', b'"chunk_size": 524288')
    fs_target.put("config", config)
    with pytest.raises(DataLoss, match="altered"):
        Repository.open(fs_target, key)


def test_restore_refuses_to_overwrite_and_unknown_backups(
    fs_repo: Repository, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    backup_id = backup_image(fs_repo, image, volume_name="db").backup.backup_id
    with pytest.raises(AlreadyExists):
        restore_image(fs_repo, backup_id, image)
    with pytest.raises(NotFound, match="ferry backup list"):
        restore_image(fs_repo, "20200101T000000Z-00000000", tmp_path / "x")


def test_an_empty_target_is_not_a_repository(target: Target, key: BackupKey) -> None:
    with pytest.raises(NotFound, match="no Ferry backups"):
        Repository.open(target, key)


def test_pack_keys_spread_over_directories() -> None:
    assert pack_key(bytes.fromhex("ab" + "0" * 62)) == "packs/ab/ab" + "0" * 62


def test_with_a_manifest_only_missing_chunks_are_read(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    mixed_image(image)
    backup_image(fs_repo, image, volume_name="db")
    with open(image, "r+b") as handle:
        handle.seek(9 * CHUNK)
        handle.write(b"new bytes")
    manifest = scan_image(image, CHUNK).manifest
    result = backup_image(fs_repo, image, volume_name="db", manifest=manifest)
    assert (result.bytes_read, result.chunks_uploaded) == (CHUNK, 1)
    assert result.backup.manifest == manifest
    restored = restore_image(fs_repo, result.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)


def test_a_source_that_changed_since_its_manifest_is_refused(
    fs_repo: Repository, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(4), 9), 4)
    manifest = scan_image(image, CHUNK).manifest
    with open(image, "r+b") as handle:
        handle.write(b"changed after the manifest")
    with pytest.raises(FailedPrecondition, match="changed since its manifest"):
        backup_image(fs_repo, image, volume_name="db", manifest=manifest)
    assert fs_repo.backups() == []


def test_a_restore_writes_its_chunks_around_the_page_cache(
    fs_repo: Repository, tmp_path: Path
) -> None:
    """Whole chunks go to the disk with O_DIRECT from the buffers they were fetched
    into: none of the restored file's pages stays in the page cache."""
    image = tmp_path / "image"
    mixed_image(image, count=8)
    result = backup_image(fs_repo, image, volume_name="db")
    restored = restore_image(fs_repo, result.backup.backup_id, tmp_path / "restored")
    assert resident_pages(restored.path) == 0
    assert digest(restored.path) == digest(image)


@pytest.mark.root
def test_a_backup_and_its_restore_on_a_filesystem_refusing_direct_io(
    no_direct_io: Path, key: BackupKey
) -> None:
    """Image, target and restored file on ramfs (no O_DIRECT): the scan, the packs
    and the restore's chunk writes all take the page cache, byte for byte."""
    repo = open_repo(FilesystemTarget(no_direct_io / "target"), key)
    image = no_direct_io / "image"
    mixed_image(image, count=8)
    result = backup_image(repo, image, volume_name="db")
    assert packs(repo.target)
    restored = restore_image(repo, result.backup.backup_id, no_direct_io / "restored")
    assert digest(restored.path) == digest(image)
    verify_backup(repo, result.backup.backup_id)
