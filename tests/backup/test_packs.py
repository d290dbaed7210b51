"""Format 2: blocks in packs. Scattered changes cost what changed, collection repacks
packs mostly unused, leftovers of dead backups go, and format 1 targets stay readable."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest
import zstandard

from csi_driver.backup.collection import collect_garbage
from csi_driver.backup.format import (
    Backup,
    BackupInfo,
    TargetConfig,
    encode_config,
    seal_chunk,
    seal_manifest,
)
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.packs import RECORD_OVERHEAD, BlockCodec, Entry, PackBuilder
from csi_driver.backup.repository import (
    CONFIG,
    MANIFESTS,
    Repository,
    backup_image,
    chunk_key,
    prune,
    restore_image,
    verify_backup,
)
from csi_driver.backup.retention import RetentionPolicy
from csi_driver.backup.targets import Target
from csi_driver.backup.upload import PACKS, pack_key
from csi_driver.chunks.manifest import BLOCK_SIZE
from csi_driver.chunks.scan import scan_image
from csi_driver.core.errors import DataLoss, FailedPrecondition
from tests.backup.conftest import (
    CHUNK,
    GRACE_S,
    mixed_image,
    packs,
    random_chunks,
    write_image,
)
from tests.backup.test_gc import PauseAt


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scattered_changes_upload_only_their_blocks(repo: Repository, tmp_path: Path) -> None:
    """1% of a 16 MiB image as 64 KiB writes all over it: the second backup puts
    those blocks (and an index, the manifest, the claims): under 2% of the volume."""
    count = 64
    image = tmp_path / "image"
    write_image(image, random_chunks(range(count), 21), count)
    backup_image(repo, image, volume_name="db")
    size = image.stat().st_size
    rng = random.Random(22)
    changed = rng.sample(range(size // BLOCK_SIZE), 3)  # 3 of 256 blocks: 1.2%
    with open(image, "r+b") as handle:
        for block in changed:
            handle.seek(block * BLOCK_SIZE)
            handle.write(rng.randbytes(BLOCK_SIZE))
    second = backup_image(repo, image, volume_name="db")
    assert (second.blocks_uploaded, second.packs_uploaded) == (3, 1)
    assert second.bytes_uploaded <= 0.02 * size
    restored = restore_image(repo, second.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)


def test_gc_repacks_a_pack_mostly_unused(target: Target, key: BackupKey, tmp_path: Path) -> None:
    repo = Repository.open(
        target, key, create=True, chunk_size=CHUNK, grace_s=GRACE_S, pack_bytes=4 * CHUNK
    )
    image = tmp_path / "image"
    chunks = random_chunks(range(4), 31)
    write_image(image, chunks, 4)
    old = backup_image(repo, image, volume_name="db").backup.backup_id
    (first_pack,) = packs(target)
    write_image(image, {**chunks, **random_chunks([0, 1, 2], 32)}, 4)  # 3 of 4 chunks new
    new = backup_image(repo, image, volume_name="db").backup.backup_id
    prune(repo, RetentionPolicy(keep_last=1))
    # The first pack keeps one chunk's blocks in use (a quarter): below the threshold.
    gc = collect_garbage(repo)
    assert (gc.packs_repacked, gc.blocks_moved, gc.packs_deleted) == (1, 4, 0)
    assert first_pack not in packs(target)
    assert len(packs(target)) == 2
    verify_backup(repo, new)
    restored = restore_image(repo, new, tmp_path / "restored")
    assert digest(restored.path) == digest(image)
    assert collect_garbage(repo).packs_repacked == 0  # nothing left to gain
    assert old not in [b.backup_id for b in repo.backups()]


def test_gc_drops_an_old_unindexed_pack_and_keeps_a_young_one(
    fs_repo: Repository, tmp_path: Path
) -> None:
    """What a backup killed between its packs and their indexes leaves: gone once older
    than the grace period (its claim would have protected it while it ran)."""
    target = fs_repo.target
    for age in (0.0, 2 * GRACE_S):
        builder = PackBuilder(fs_repo.key, None, 1024)
        builder.add(os.urandom(32), b"x" * 100, 100)
        data, _ = builder.close()
        target.put(pack_key(builder.pack_id), bytes(data))
        path = fs_repo.target.root / pack_key(builder.pack_id)  # type: ignore[attr-defined]
        os.utime(path, (time.time() - age, time.time() - age))
    gc = collect_garbage(fs_repo)
    assert (gc.packs_deleted, gc.packs_kept) == (1, 1)
    assert len(list(target.list(PACKS))) == 1


def write_format_1(target: Target, key: BackupKey, image: Path) -> str:
    """A target as format 1 wrote it: a chunk object per chunk, a format 1 manifest."""
    target.put(CONFIG, encode_config(key, TargetConfig(CHUNK, key.key_id, time.time(), 1)))
    manifest = scan_image(image, CHUNK).manifest
    data = image.read_bytes()
    for index in manifest.data_chunks:
        digest = manifest.chunks[index]
        assert digest is not None
        name = key.chunk_name(digest)
        chunk = data[index * CHUNK : (index + 1) * CHUNK]
        target.put(chunk_key(name), seal_chunk(key, name, chunk))
    backup_id = "20260101T000000Z-0000abcd"
    info = BackupInfo(backup_id, time.time(), "", "db", None, str(image))
    target.put(MANIFESTS + backup_id, seal_manifest(key, Backup(info, manifest, format=1)))
    return backup_id


def test_format_1_backups_are_restored_verified_and_collected_not_written(
    target: Target, key: BackupKey, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    mixed_image(image)
    backup_id = write_format_1(target, key, image)
    repo = Repository.open(target, key, grace_s=GRACE_S)
    assert repo.config.format == 1
    (listed,) = repo.backups()
    assert (listed.backup_id, listed.format) == (backup_id, 1)
    verify_backup(repo, backup_id)
    restored = restore_image(repo, backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)
    with pytest.raises(FailedPrecondition, match="back up into a new target"):
        backup_image(repo, image, volume_name="db")
    chunk = sorted(s.key for s in target.list("chunks/"))[0]
    damaged = bytearray(target.get(chunk))
    damaged[-1] ^= 1
    target.put(chunk, bytes(damaged))
    with pytest.raises(DataLoss, match="1 of 16 chunks"):
        verify_backup(repo, backup_id)
    target.put(chunk, bytes(damaged[:-1]) + bytes([damaged[-1] ^ 1]))  # repaired
    target.delete(MANIFESTS + backup_id)
    gc = collect_garbage(repo)
    assert gc.chunks_deleted == 16 and list(target.list("chunks/")) == []


def test_a_restore_keeps_its_packs_from_a_repack(
    fs_target: Target, key: BackupKey, tmp_path: Path
) -> None:
    """A collection that would repack a pack a running restore reads leaves it alone
    (the restore claimed it), and repacks it once the restore is over."""
    repo = Repository.open(
        fs_target, key, create=True, chunk_size=CHUNK, grace_s=GRACE_S, pack_bytes=4 * CHUNK
    )
    image = tmp_path / "image"
    chunks = random_chunks(range(4), 41)
    write_image(image, chunks, 4)
    backup_image(repo, image, volume_name="db")
    write_image(image, {**chunks, **random_chunks([0, 1, 2], 42)}, 4)
    new = backup_image(repo, image, volume_name="db").backup.backup_id
    prune(repo, RetentionPolicy(keep_last=1))
    pause = PauseAt()
    outcome: dict[str, object] = {}

    def run_restore() -> None:
        try:
            outcome["result"] = restore_image(repo, new, tmp_path / "restored", progress=pause)
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=run_restore)
    thread.start()
    assert pause.paused.wait(30)
    assert collect_garbage(repo).packs_repacked == 0
    pause.release.set()
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert digest(tmp_path / "restored") == digest(image)
    assert collect_garbage(repo).packs_repacked == 1
    verify_backup(repo, new)


def test_an_image_ending_in_a_short_block_round_trips(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(random.Random(51).randbytes(2 * CHUNK + BLOCK_SIZE + 4464))
    backup_image(repo, image, volume_name="db")
    again = backup_image(repo, image, volume_name="db")
    assert (again.blocks_uploaded, again.bytes_deduplicated) == (0, image.stat().st_size)
    restored = restore_image(repo, again.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)


def _blocks(count: int) -> list[bytes]:
    """Alternately random and compressible 64 KiB blocks, and a short last one."""
    text = b"".join(b"%08d GET /items?id=%d 200\n" % (i, i * 7919) for i in range(4000))
    blocks = [os.urandom(BLOCK_SIZE) if i % 2 else text[:BLOCK_SIZE] for i in range(count)]
    return [*blocks, text[:1000]]


def test_blocks_sealed_together_open_together_byte_for_byte(key: BackupKey) -> None:
    codec = BlockCodec(key)
    blocks = _blocks(6)
    ids = [key.block_id(hashlib.sha256(block).digest()) for block in blocks]
    out = bytearray(sum(len(block) + RECORD_OVERHEAD for block in blocks))
    records = codec.seal_many(list(zip(ids, blocks, strict=True)), memoryview(out))
    flags = [out[offset] for _, offset, _, _ in records]
    assert flags == [1, 0, 1, 0, 1, 0, 1]  # text compressed, random stored as is
    restored = [bytearray(len(block)) for block in blocks]
    codec.open_many(
        [
            (
                Entry(block_id, offset, stored, length),
                memoryview(out)[offset : offset + stored],
                hashlib.sha256(block).digest(),
                memoryview(into),
            )
            for (block_id, offset, stored, length), block, into in zip(
                records, blocks, restored, strict=True
            )
        ]
    )
    assert restored == blocks


@pytest.mark.parametrize(
    ("length", "declared"),
    [(BLOCK_SIZE - 1, True), (4 * BLOCK_SIZE, True), (4 * BLOCK_SIZE, False)],
)
def test_a_frame_declaring_another_length_is_refused_within_the_block(
    key: BackupKey, length: int, declared: bool
) -> None:
    """A record sealed under the key (a bug, or a writer holding the key) whose zstd
    frame declares another length than its index, or none, decompresses no further
    than the index's length and is DataLoss, among well-formed neighbours."""
    codec = BlockCodec(key)
    good = _blocks(2)[0]
    frame = zstandard.ZstdCompressor(write_content_size=declared).compress(bytes(length))
    block_id = key.block_id(hashlib.sha256(good).digest())
    nonce = os.urandom(12)
    record = bytes([1]) + nonce + key.block_cipher.encrypt(nonce, frame, b"FBB2\x01" + block_id)
    out = bytearray(len(good) + RECORD_OVERHEAD)
    (sealed,) = codec.seal_many([(block_id, good)], memoryview(out))
    entry = Entry(block_id, 0, len(record), BLOCK_SIZE)
    into = [bytearray(BLOCK_SIZE), bytearray(BLOCK_SIZE)]
    batch = [
        (Entry(block_id, 0, sealed[2], BLOCK_SIZE), memoryview(out)[: sealed[2]]),
        (entry, memoryview(record)),
    ]
    with pytest.raises(DataLoss, match=block_id.hex()):
        codec.open_many(
            [
                (e, r, hashlib.sha256(good).digest(), memoryview(i))
                for (e, r), i in zip(batch, into, strict=True)
            ]
        )
