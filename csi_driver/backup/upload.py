"""A backup's write path (format 2): chunks read and hashed, new blocks sealed into packs.

Invariants:

- The per-block work that releases the GIL (pread, SHA-256, zstd) runs on
  worker threads; AES-GCM, which ``cryptography`` runs with the GIL held,
  runs on the driving thread, which seals each new block straight into the
  open pack (no copy of the records) while the workers read and compress
  the next chunks. Results come back in submission order, so packs hold
  blocks in image order and a restore reads a chunk's blocks with one
  ranged read.
- A pack's id is claimed (see :mod:`.claims`) before the pack is staged, so
  a collection never takes a pack being written for an index it lacks yet.
- A pack's index object is staged only after the pack itself is durable
  (:meth:`PackWriter.commit`): an index never names a pack a crash could
  lose, so no backup deduplicates against blocks that are not there.
- Memory is bounded by a pool of chunk buffers and two packs (one being
  filled, one being staged): a chunk's buffer goes back once its blocks are
  sealed into the pack. A chunk buffer is taken by a worker only after
  the driving thread acquired a slot for it (:meth:`ChunkWorkers.read_ahead`,
  :meth:`ChunkWorkers.read_and_compress`), so no worker ever waits for a buffer
  that only a task queued behind it would give back.
- A chunk's block ids (keyed HMACs) are computed on the worker that hashed
  it, once: the driving thread only looks them up.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

from csi_driver.backup.keys import BackupKey
from csi_driver.backup.packs import PACK_BYTES, BlockCodec, PackBuilder, new_nonces
from csi_driver.backup.targets import Blob, Target
from csi_driver.chunks.manifest import (
    BLOCK_SIZE,
    DIGEST_SIZE,
    HOLE_BLOCK,
    block_digest,
    block_digests,
)
from csi_driver.chunks.scan import read_exactly
from csi_driver.core.errors import FailedPrecondition

PACKS = "packs/"
INDEX = "index/"


def pack_key(pack_id: bytes) -> str:
    name = pack_id.hex()
    return f"{PACKS}{name[:2]}/{name}"


def index_key(pack_id: bytes) -> str:
    return f"{INDEX}{pack_id.hex()}"


def split_digests(blocks: bytes) -> list[bytes]:
    return [blocks[at : at + DIGEST_SIZE] for at in range(0, len(blocks), DIGEST_SIZE)]


class Buffers:
    """Chunk-sized buffers, reused from chunk to chunk: their number bounds the memory
    an operation holds (and fresh 4 MiB objects cost a page fault per 4 KiB each).
    Made on first need, not up front: zeroing 100 MiB before the first read
    stalled a backup's start by seconds on a busy machine."""

    def __init__(self, count: int, size: int) -> None:
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._size = size
        self._count = count
        self._unmade = count
        self._lock = threading.Lock()

    @property
    def made(self) -> int:
        """How many buffers exist: the most this pool has held at once."""
        with self._lock:
            return self._count - self._unmade

    def take(self) -> bytearray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            make = self._unmade > 0
            self._unmade -= make
        return bytearray(self._size) if make else self._free.get()

    def give(self, buffer: bytearray) -> None:
        self._free.put(buffer)


class Codecs:
    """One :class:`BlockCodec` per thread (codecs keep zstd contexts)."""

    def __init__(self, key: BackupKey) -> None:
        self._key = key
        self._local = threading.local()

    def get(self) -> BlockCodec:
        codec: BlockCodec | None = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = BlockCodec(self._key)
        return codec


@dataclass(frozen=True)
class ChunkRead:
    """A chunk read into a pooled buffer, its block digests, and each block's id in the
    target (None for a block of zeros, never stored)."""

    index: int
    buffer: bytearray
    data: memoryview
    blocks: bytes
    ids: list[bytes | None]


@dataclass(frozen=True)
class Compressed:
    """New blocks of one chunk, compressed where zstd shrinks them, to be sealed into
    a pack by the driving thread; ``buffer`` (the chunk's, pooled) holds the blocks
    and goes back once they are sealed."""

    index: int
    bytes_read: int
    buffer: bytearray
    blocks: list[tuple[bytes, memoryview]]  # block id and bytes, in block order
    payloads: list[Blob | None]  # each block's zstd frame, None to store it as is


class ChunkWorkers:
    """Reads, hashes and seals chunks of the image open as ``fd`` on worker threads."""

    def __init__(
        self, key: BackupKey, fd: int, size: int, chunk_size: int, workers: int, batch: int
    ) -> None:
        self._key = key
        self._fd = fd
        self._size = size
        self._chunk_size = chunk_size
        self._codecs = Codecs(key)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="backup-block")
        self._buffers = Buffers(batch + 2 * workers, chunk_size)
        # One slot per chunk buffer, acquired by the driving thread before it submits
        # a task that takes one, released when the buffer is given back.
        self._slots = threading.Semaphore(batch + 2 * workers)

    def _length(self, index: int) -> int:
        return min(self._chunk_size, self._size - index * self._chunk_size)

    @property
    def buffers_made(self) -> int:
        """Chunk buffers made so far: the chunks held at once, at most."""
        return self._buffers.made

    def _give_chunk(self, buffer: bytearray) -> None:
        self._buffers.give(buffer)
        self._slots.release()

    def _read(self, index: int) -> ChunkRead:
        buffer = self._buffers.take()
        try:
            data = read_exactly(self._fd, buffer, index * self._chunk_size, self._length(index))
            blocks = block_digests(data, self._chunk_size)
            block_id = self._key.block_id
            ids = [
                None if digest == HOLE_BLOCK else block_id(digest)
                for digest in split_digests(blocks)
            ]
            return ChunkRead(index, buffer, data, blocks, ids)
        except BaseException:
            self._give_chunk(buffer)
            raise

    def read(self, indexes: list[int]) -> Iterator[ChunkRead]:
        """``indexes`` read and hashed on the workers, in order."""
        # A read abandoned after an error keeps its buffer: the pool goes with the run.
        futures = []
        for index in indexes:
            self._slots.acquire()
            futures.append(self._pool.submit(self._read, index))
        for future in futures:
            yield future.result()

    def read_ahead(self, indexes: list[int], ahead: int) -> Iterator[ChunkRead]:
        """``indexes`` read and hashed on the workers, in order, with up to ``ahead``
        reads in flight while the caller works on what they yield (one run of reads
        per batch left the workers idle while the driving thread decided the batch)."""
        pending: deque[Future[ChunkRead]] = deque()
        at = 0
        while at < len(indexes) or pending:
            # Without a read in flight, wait for a sealed chunk's buffer; else top up
            # only with the buffers free now.
            while (
                at < len(indexes)
                and len(pending) < ahead
                and self._slots.acquire(blocking=not pending)
            ):
                pending.append(self._pool.submit(self._read, indexes[at]))
                at += 1
            yield pending.popleft().result()

    def release(self, read: ChunkRead) -> None:
        self._give_chunk(read.buffer)

    def give(self, compressed: Compressed) -> None:
        """Give back the buffer of ``compressed``, once its blocks are sealed."""
        self._give_chunk(compressed.buffer)

    def _compress(
        self, index: int, bytes_read: int, buffer: bytearray, blocks: list[tuple[bytes, memoryview]]
    ) -> Compressed:
        try:
            payloads = self._codecs.get().compress([data for _, data in blocks])
            return Compressed(index, bytes_read, buffer, blocks, payloads)
        except BaseException:
            self._give_chunk(buffer)
            raise

    def compress(self, read: ChunkRead, wanted: list[tuple[int, bytes]]) -> Future[Compressed]:
        """Compress blocks ``wanted`` (block number, block id) of ``read``, whose buffer
        goes with the result."""
        blocks = [
            (block_id, read.data[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE])
            for block, block_id in wanted
        ]
        return self._pool.submit(self._compress, read.index, 0, read.buffer, blocks)

    def _read_and_compress(
        self, index: int, wanted: list[tuple[int, bytes]], blocks: bytes
    ) -> Compressed:
        buffer = self._buffers.take()
        try:
            found = list(self._read_checked(index, dict(wanted), blocks, buffer))
        except BaseException:
            self._give_chunk(buffer)
            raise
        bytes_read = sum(len(data) for _, data in found)
        return self._compress(index, bytes_read, buffer, found)

    def _read_checked(
        self, index: int, ids: dict[int, bytes], blocks: bytes, buffer: bytearray
    ) -> Iterator[tuple[bytes, memoryview]]:
        """Blocks ``ids`` of chunk ``index`` read into ``buffer`` where they are in the
        chunk, a run of consecutive ones per read, each checked against its digest
        in ``blocks``."""
        start = index * self._chunk_size
        length = self._length(index)
        whole = memoryview(buffer)
        for run in _runs(sorted(ids)):
            offset = run[0] * BLOCK_SIZE
            end = min((run[-1] + 1) * BLOCK_SIZE, length)
            view = read_exactly(self._fd, whole[offset:], start + offset, end - offset)
            for block in run:
                at = (block - run[0]) * BLOCK_SIZE
                data = view[at : at + BLOCK_SIZE]
                if block_digest(data) != blocks[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE]:
                    raise FailedPrecondition(
                        f"chunk {index} of the image changed since its manifest was taken; "
                        "back up a snapshot, or a volume nobody writes to"
                    )
                yield ids[block], data

    def read_and_compress(
        self, index: int, wanted: list[tuple[int, bytes]], blocks: bytes
    ) -> Future[Compressed]:
        """Read only blocks ``wanted`` of chunk ``index``, check each against its digest in
        ``blocks`` (FailedPrecondition when the image changed), and compress them."""
        self._slots.acquire()
        return self._pool.submit(self._read_and_compress, index, wanted, blocks)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _runs(blocks: list[int]) -> Iterator[list[int]]:
    """Sorted block numbers as lists of consecutive ones."""
    run: list[int] = []
    for block in blocks:
        if run and block != run[-1] + 1:
            yield run
            run = []
        run.append(block)
    if run:
        yield run


class PackWriter:
    """Appends records to packs of about ``pack_bytes`` and stages each pack when full.

    ``claim`` is told a pack's id before the pack is staged (a backup's claim;
    None for a collection, which holds every backup back while it runs).
    """

    def __init__(
        self,
        target: Target,
        key: BackupKey,
        claim: Callable[[bytes], None] | None,
        pack_bytes: int = PACK_BYTES,
    ) -> None:
        self._target = target
        self._key = key
        self._claim = claim
        self._pack_bytes = pack_bytes
        self._builder: PackBuilder | None = None
        self._stager = ThreadPoolExecutor(1, thread_name_prefix="backup-pack")
        self._staging: deque[tuple[Future[None], mmap.mmap]] = deque()
        # Two pack buffers, reused: one filling, one staging. A fresh 16 MiB per
        # pack cost a page fault per 4 KiB (60 000 faults per 512 MiB stored).
        self._free: list[mmap.mmap] = []
        self.indexes: list[tuple[bytes, bytes]] = []
        self.blocks = 0
        self.stored_bytes = 0

    def _open(self) -> PackBuilder:
        if self._builder is None:
            buffer = self._free.pop() if self._free else None
            self._builder = PackBuilder(self._key, buffer, self._pack_bytes + self._pack_bytes // 8)
        return self._builder

    def add(self, block_id: bytes, record: Blob, length: int) -> None:
        builder = self._open()
        builder.add(block_id, record, length)
        self.blocks += 1
        self.stored_bytes += len(record)
        if len(builder) >= self._pack_bytes:
            self._close()

    def seal(self, compressed: Compressed) -> None:
        """Seal the blocks of ``compressed`` into packs, in order, closing a pack once
        its records reach ``pack_bytes`` (as :meth:`add` does)."""
        nonces = new_nonces(len(compressed.blocks))
        pairs = zip(compressed.blocks, compressed.payloads, strict=True)
        for n, ((block_id, data), payload) in enumerate(pairs):
            builder = self._open()
            before = len(builder)
            builder.seal(block_id, data, payload, nonces, n)
            self.blocks += 1
            self.stored_bytes += len(builder) - before
            if len(builder) >= self._pack_bytes:
                self._close()

    def _close(self) -> None:
        builder, self._builder = self._builder, None
        if builder is None or not builder.entries:
            return
        if self._claim is not None:
            self._claim(builder.pack_id)
        data, index = builder.close()
        while self._staging:  # one pack staged at a time, the next filling
            self._staged()
        key = pack_key(builder.pack_id)
        self._staging.append((self._stager.submit(self._stage, key, data), builder.buffer))
        self.indexes.append((builder.pack_id, index))

    def _stage(self, key: str, data: memoryview) -> None:
        try:
            self._target.stage(key, data)
        finally:
            data.release()  # the buffer is reused: no view of it may outlive the stage

    def _staged(self) -> None:
        future, buffer = self._staging.popleft()
        future.result()
        self._free.append(buffer)

    def commit(self) -> None:
        """Close the open pack, make every pack durable, then stage their indexes (made
        durable by the next durable put or flush)."""
        self._close()
        while self._staging:
            self._staged()
        self._target.flush()
        for pack_id, index in self.indexes:
            self._target.stage(index_key(pack_id), index)

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for future, _ in self._staging:
            future.cancel()
        self._stager.shutdown(wait=True, cancel_futures=True)
