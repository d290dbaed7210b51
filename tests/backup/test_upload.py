"""A backup's write path: chunks read ahead in order with few buffers held, and new
blocks sealed straight into packs that close where :meth:`PackWriter.add` closes them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from csi_driver.backup.keys import BackupKey
from csi_driver.backup.packs import BlockCodec, open_index
from csi_driver.backup.targets import FilesystemTarget
from csi_driver.backup.upload import ChunkWorkers, Compressed, PackWriter, index_key, pack_key
from csi_driver.chunks.manifest import BLOCK_SIZE, HOLE_BLOCK, block_digests
from tests.backup.conftest import CHUNK, random_chunks, write_image
from tests.backup.test_packs import _blocks


def test_reads_ahead_come_in_order_holding_few_buffers(key: BackupKey, tmp_path: Path) -> None:
    """Sixteen chunks (one of zeros) read two ahead: each arrives in order with its
    own bytes' digests and ids, and never more than three buffers exist (two reads
    in flight, one with the caller), however many the pool may make."""
    image = tmp_path / "image"
    chunks = random_chunks([i for i in range(16) if i != 5], seed=7)
    write_image(image, chunks, 16)
    fd = os.open(image, os.O_RDONLY)
    workers = ChunkWorkers(key, fd, 16 * CHUNK, CHUNK, workers=2, batch=16)
    try:
        seen = []
        for read in workers.read_ahead(list(range(16)), ahead=2):
            expected = chunks.get(read.index, bytes(CHUNK))
            assert bytes(read.data) == expected
            assert read.blocks == block_digests(expected, CHUNK)
            digests = [read.blocks[at : at + 32] for at in range(0, len(read.blocks), 32)]
            assert read.ids == [
                None if digest == HOLE_BLOCK else key.block_id(digest) for digest in digests
            ]
            seen.append(read.index)
            workers.release(read)
    finally:
        workers.close()
        os.close(fd)
    assert seen == list(range(16))
    assert workers.buffers_made <= 3


def test_blocks_sealed_into_packs_close_past_the_size_and_open_byte_for_byte(
    key: BackupKey, tmp_path: Path
) -> None:
    """Seven blocks sealed with packs of three blocks' bytes: a pack closes on the
    block that takes it past the size (as ``add`` does), every pack is durable and
    indexed on commit, and each record opens to its block."""
    target = FilesystemTarget(tmp_path / "target")
    codec = BlockCodec(key)
    blocks = _blocks(6)
    ids = [key.block_id(hashlib.sha256(block).digest()) for block in blocks]
    views = [memoryview(block) for block in blocks]
    compressed = Compressed(
        0, 0, bytearray(), list(zip(ids, views, strict=True)), codec.compress(views)
    )
    pack_bytes = 3 * BLOCK_SIZE
    with PackWriter(target, key, None, pack_bytes) as writer:
        writer.seal(compressed)
        writer.commit()
    target.flush()
    assert writer.blocks == len(blocks)
    opened: dict[bytes, bytes] = {}
    for n, (pack_id, _) in enumerate(writer.indexes):
        entries = open_index(key, pack_id, target.get(index_key(pack_id)))
        records = sum(entry.stored for entry in entries)
        if n < len(writer.indexes) - 1:
            assert records >= pack_bytes > records - entries[-1].stored
        pack = target.get(pack_key(pack_id))
        for entry in entries:
            into = bytearray(entry.length)
            block = blocks[ids.index(entry.block_id)]
            codec.open_into(
                entry,
                memoryview(pack)[entry.offset : entry.offset + entry.stored],
                hashlib.sha256(block).digest(),
                memoryview(into),
            )
            opened[entry.block_id] = bytes(into)
    assert len(writer.indexes) >= 2
    assert opened == dict(zip(ids, blocks, strict=True))
