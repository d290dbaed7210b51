"""Backups through a real target (a directory and moto's S3 server): round trips,
deduplication and incrementality counted in bytes uploaded, tampering, wrong keys."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from csi_driver.backup.format import open_manifest
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import (
    CHUNKS,
    MANIFESTS,
    Repository,
    backup_image,
    chunk_key,
    restore_image,
    verify_backup,
)
from csi_driver.backup.targets import Target
from csi_driver.chunks.scan import scan_image
from csi_driver.core.errors import AlreadyExists, DataLoss, FailedPrecondition, NotFound
from tests.backup.conftest import CHUNK, GRACE_S, mixed_image, random_chunks, write_image


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_chunks(target: Target) -> dict[str, int]:
    return {s.key: s.size for s in target.list(CHUNKS)}


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
    sizes = sorted(stored_chunks(fs_repo.target).values())
    assert sizes[0] < CHUNK // 50  # text: zstd
    assert CHUNK < sizes[1] < CHUNK + 64  # random: stored as is, plus header and tag


def test_second_backup_of_an_unchanged_volume_uploads_only_a_manifest(
    repo: Repository, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    mixed_image(image)
    first = backup_image(repo, image, volume_name="db")
    chunks_after_first = stored_chunks(repo.target)
    assert first.chunks_uploaded == len(chunks_after_first) == 16  # the zero chunk is a hole
    second = backup_image(repo, image, volume_name="db")
    assert second.chunks_uploaded == 0
    manifest_size = len(repo.target.get(MANIFESTS + second.backup.backup_id))
    # The manifest, plus the claim's heartbeat and its list of chunk names.
    assert manifest_size <= second.bytes_uploaded <= manifest_size + 16 * 32 + 200
    assert stored_chunks(repo.target) == chunks_after_first


def test_a_changed_chunk_is_all_a_backup_uploads(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    mixed_image(image)
    backup_image(fs_repo, image, volume_name="db")
    with open(image, "r+b") as handle:
        handle.seek(7 * CHUNK + 100)
        handle.write(b"changed")
    result = backup_image(fs_repo, image, volume_name="db")
    assert result.chunks_uploaded == 1
    assert result.bytes_uploaded < 2 * CHUNK
    restored = restore_image(fs_repo, result.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)


def test_chunks_are_shared_across_volumes(fs_repo: Repository, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    chunks = random_chunks(range(8), 5)
    write_image(first, chunks, 8)
    write_image(second, {**chunks, 3: random_chunks([3], 6)[3]}, 8)
    backup_image(fs_repo, first, volume_name="a")
    result = backup_image(fs_repo, second, volume_name="b")
    assert result.chunks_uploaded == 1
    assert len(stored_chunks(fs_repo.target)) == 9


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
    victim = sorted(stored_chunks(repo.target))[3]
    flip_byte(repo.target, victim)
    with pytest.raises(DataLoss) as caught:
        verify_backup(repo, result.backup.backup_id)
    assert "1 of 16 chunks" in caught.value.message
    assert victim.rsplit("/", 1)[-1] in caught.value.message
    destination = tmp_path / "restored"
    with pytest.raises(DataLoss, match="failed authentication"):
        restore_image(repo, result.backup.backup_id, destination)
    assert not destination.exists()


def test_a_chunk_swapped_for_another_is_detected(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    result = backup_image(fs_repo, image, volume_name="db")
    first, second = sorted(stored_chunks(fs_repo.target))
    fs_repo.target.put(first, fs_repo.target.get(second))
    with pytest.raises(DataLoss):
        verify_backup(fs_repo, result.backup.backup_id)


def test_a_missing_chunk_is_named(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    result = backup_image(fs_repo, image, volume_name="db")
    fs_repo.target.delete(sorted(stored_chunks(fs_repo.target))[0])
    with pytest.raises(DataLoss, match="missing or damaged"):
        verify_backup(fs_repo, result.backup.backup_id)


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


def test_chunk_keys_spread_over_directories() -> None:
    assert chunk_key("ab" + "0" * 62) == "chunks/ab/ab" + "0" * 62


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
