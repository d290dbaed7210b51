"""Block tables: the block digests of every chunk of an image, in a file next to it.

A manifest holds one digest per chunk (a few MiB); each chunk digest commits
to the digests of the chunk's blocks (64 KiB, see :mod:`.manifest`). The
table keeps those block digests, so that a delta can be computed and sent
per block: a capture rehashes only the blocks that changed, a sender ships
only the blocks a receiver lacks, and a receiver verifies only what it wrote.

Layout: entry ``j`` of chunk ``i`` is the 32 bytes at
``(i * blocks_per_chunk + j) * 32``; a chunk's slot has room for a whole
chunk's blocks even when it is the short last one. A sparse file reads as
zeros, which is :data:`~.manifest.HOLE_BLOCK`: a new table describes an image
of holes.

Invariants:

- A table is trusted only as far as the manifest beside it: the writer
  stores a chunk's entries together with (before) the manifest or journal
  entry that names the chunk, and readers check a slice against its chunk
  digest (:func:`~.manifest.root_digest`) wherever the slice came from
  elsewhere.
- Memory stays one chunk's slice, or one group of nearby slots written at
  once (:meth:`BlockTable.write_many`, at most ``GROUP_BYTES``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from csi_driver.chunks.direct import pwrite_all
from csi_driver.chunks.extents import reflink
from csi_driver.chunks.manifest import (
    DIGEST_SIZE,
    HOLE_BLOCK,
    block_count,
    chunk_count,
    root_digest,
)
from csi_driver.core.errors import FailedPrecondition, InternalError


class BlockTable:
    """The block table at ``path`` of an image of ``size`` bytes in chunks of ``chunk_size``."""

    def __init__(self, path: Path, size: int, chunk_size: int, *, writable: bool = False) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.size = size
        self.per_chunk = block_count(chunk_size, chunk_size)
        self._writable = writable
        self._fd: int | None = None

    @classmethod
    def create(
        cls, path: Path, size: int, chunk_size: int, copy_of: Path | None = None
    ) -> BlockTable:
        """A writable table at ``path``: a copy of the table at ``copy_of`` (reflinked
        where the filesystem can), or all holes; on disk at the next :meth:`sync`."""
        path.unlink(missing_ok=True)
        if copy_of is not None:
            try:
                # Not fsynced here: every writer syncs the table before the manifest
                # or journal entry that makes it count (see the invariants above).
                reflink(copy_of, path, durable=False)
            except FailedPrecondition:
                with open(copy_of, "rb") as src, open(path, "wb") as dst:
                    while os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30):
                        pass
        table = cls(path, size, chunk_size, writable=True)
        fd = table._open()
        os.ftruncate(fd, chunk_count(size, chunk_size) * table.per_chunk * DIGEST_SIZE)
        return table

    def open(self) -> BlockTable:
        """Open the file now: reads keep to this file even when its path is replaced
        or removed later (a newer capture's table)."""
        self._open()
        return self

    def _open(self) -> int:
        if self._fd is None:
            flags = (os.O_RDWR | os.O_CREAT) if self._writable else os.O_RDONLY
            self._fd = os.open(self.path, flags | os.O_CLOEXEC, 0o600)
        return self._fd

    def _slot(self, index: int) -> tuple[int, int]:
        length = min(self.chunk_size, self.size - index * self.chunk_size)
        return index * self.per_chunk * DIGEST_SIZE, block_count(length, self.chunk_size)

    def read(self, index: int) -> bytes:
        """Chunk ``index``'s block digests, concatenated."""
        offset, count = self._slot(index)
        data = os.pread(self._open(), count * DIGEST_SIZE, offset)
        # A table shorter than its image (torn create) reads as holes past its end.
        return data + HOLE_BLOCK * (count - len(data) // DIGEST_SIZE)

    def _checked_slot(self, index: int, digests: bytes) -> int:
        """Where chunk ``index``'s ``digests`` go; InternalError if they do not fit."""
        offset, count = self._slot(index)
        if len(digests) != count * DIGEST_SIZE:
            raise InternalError(
                f"chunk {index} has {count} blocks; {len(digests) // DIGEST_SIZE} digests given"
            )
        return offset

    def write(self, index: int, digests: bytes) -> None:
        pwrite_all(self._open(), digests, self._checked_slot(index, digests))

    def write_many(self, entries: Mapping[int, bytes]) -> None:
        """Write several chunks' entries, nearby slots in one write: each write into
        a reflinked table costs a copy-on-write, so 600 scattered chunks cost
        far fewer writes than 600. The bytes between two nearby slots are read
        and written back as they are, so nothing is held beyond one group of
        at most :data:`GROUP_BYTES`."""
        fd = self._open()
        start = end = 0
        group = bytearray()
        for index in sorted(entries):
            digests = entries[index]
            offset = self._checked_slot(index, digests)
            if group and offset - end <= GAP_BYTES and offset + len(digests) - start <= GROUP_BYTES:
                if offset > end:
                    gap = os.pread(fd, offset - end, end)
                    group += gap + bytes(offset - end - len(gap))  # past the end: zeros
            else:
                pwrite_all(fd, group, start)
                group, start = bytearray(), offset
            group += digests
            end = offset + len(digests)
        pwrite_all(fd, group, start)

    def punch(self, index: int) -> None:
        """Chunk ``index`` becomes a hole."""
        self.write(index, HOLE_BLOCK * self._slot(index)[1])

    def check(self, index: int, digest: bytes | None) -> bool:
        """Whether chunk ``index``'s entries are those its manifest digest commits to."""
        return root_digest(self.read(index)) == digest

    def sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: Slots at most this far apart are written together by :meth:`BlockTable.write_many`
#: (what lies between is read and written back), in groups of at most GROUP_BYTES.
GAP_BYTES = 64 * 1024
GROUP_BYTES = 1024 * 1024
