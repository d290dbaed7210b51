"""Reading an image into a manifest, touching only what holds data.

Invariants:

- Ranges the filesystem reports as holes (``SEEK_DATA``/``SEEK_HOLE``) are
  never read: a sparse or mostly empty image costs what it holds.
- Each chunk that may hold data is read exactly once, by one of
  :data:`HASHERS` threads (memory stays a few chunks, whatever the image's
  size); the same bytes decide
  "all zeros, so a hole" and give the digest. Thick images are fallocated:
  ext4 and xfs report their unwritten extents as holes, but a filesystem may
  report them as data, and written zeros are data to every filesystem; both
  still become holes in the manifest.
- A rescan given the previous manifest and the chunks that may have changed
  reads only those chunks; given the previous block table and the byte
  ranges that may have changed (:func:`rescan_blocks`), only the blocks
  those ranges touch.
- With a :class:`~.blocks.BlockTable`, every chunk whose digest is computed
  has its block digests written to the table, so table and manifest agree.
"""

from __future__ import annotations

import collections
import errno
import os
import queue
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.direct import ImageIO
from csi_driver.chunks.manifest import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZE,
    Digest,
    Manifest,
    block_digest,
    block_digests,
    block_size,
    check_chunk_size,
    chunk_count,
    root_digest,
)
from csi_driver.core.errors import InternalError, InvalidArgument, NotFound

#: A byte range: offset and length.
Range = tuple[int, int]


@dataclass(frozen=True)
class Scan:
    manifest: Manifest
    bytes_read: int


def data_ranges(fd: int, size: int) -> Iterator[Range]:
    """The ranges of ``fd`` below ``size`` that the filesystem says may hold data."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after position
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        position = end


def blocks_touching(ranges: Iterable[Range], chunk_size: int) -> dict[int, set[int]]:
    """The blocks (by chunk index, then block index within the chunk) that overlap
    any of ``ranges``."""
    step = block_size(chunk_size)
    touched: dict[int, set[int]] = {}
    for offset, length in ranges:
        end = offset + length
        while offset < end:
            index = offset // chunk_size
            start = index * chunk_size
            stop = min(end, start + chunk_size)
            blocks = range((offset - start) // step, (stop - 1 - start) // step + 1)
            touched.setdefault(index, set()).update(blocks)
            offset = stop
    return touched


def chunks_touching(ranges: Iterable[Range], chunk_size: int) -> set[int]:
    """Indexes of the chunks that overlap any of ``ranges``."""
    touched: set[int] = set()
    for offset, length in ranges:
        if length > 0:
            touched.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
    return touched


def read_exactly(fd: int, buffer: bytearray | memoryview, offset: int, length: int) -> memoryview:
    """``length`` bytes of ``fd`` at ``offset``, read into ``buffer``."""
    view = memoryview(buffer)[:length]
    done = 0
    while done < length:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise InternalError(
                f"the image ended at byte {offset + done} while reading a chunk; was it "
                "truncated during the scan? Retry once it is quiescent"
            )
        done += got
    return view


def scan_image(
    path: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    previous: Manifest | None = None,
    changed: Iterable[int] | None = None,
    table: BlockTable | None = None,
) -> Scan:
    """The manifest of the image at ``path``.

    With ``previous`` and ``changed``, only the ``changed`` chunks are read;
    the others keep their digests from ``previous`` (which must describe the
    same size and chunk size). ``table`` receives the block digests of every
    chunk read (it must hold ``previous``'s, or be new when there is none).
    """
    check_chunk_size(chunk_size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"no image at {path}") from exc
    try:
        size = os.fstat(fd).st_size
        count = chunk_count(size, chunk_size)
        wanted: set[int] = set(range(count))
        digests: list[Digest | None] = [None] * count
        if previous is not None and changed is not None:
            if previous.size != size or previous.chunk_size != chunk_size:
                raise InvalidArgument(
                    f"{path} is {size} bytes in {chunk_size}-byte chunks; the previous "
                    f"manifest is {previous.size} in {previous.chunk_size}: scan it whole"
                )
            digests = list(previous.chunks)
            wanted = {i for i in changed if 0 <= i < count}
            for index in wanted:
                digests[index] = None
        holding = chunks_touching(data_ranges(fd, size), chunk_size) & wanted
        bytes_read = 0
        for index, length, blocks in _hashed(path, sorted(holding), chunk_size, size):
            bytes_read += length
            digests[index] = root_digest(blocks)
            if table is not None:
                table.write(index, blocks)
        if table is not None and previous is not None:
            for index in wanted - holding:  # no data any more: the old entries go
                table.punch(index)
    finally:
        os.close(fd)
    return Scan(Manifest(size, chunk_size, tuple(digests)), bytes_read)


#: Threads reading and hashing chunks: reads and SHA-256 of 64 KiB blocks
#: release the GIL. Reads around the page cache have no read-ahead, so each
#: waits for the device: four keep two cores hashing while two reads are in
#: flight (a 1 GiB capture on the loaded 2 vCPU machine: 1.6-2.4 s with two
#: threads, 1.2-1.9 s with four, the same CPU).
HASHERS = 4


def _hashed(
    path: Path, indexes: list[int], chunk_size: int, size: int
) -> Iterator[tuple[int, int, bytes]]:
    """(index, length, block digests) of each chunk of ``indexes``, in order, read and
    hashed by :data:`HASHERS` threads; at most ``HASHERS`` chunks are held, in
    reused buffers, read around the page cache where the filesystem can
    (:mod:`.direct`: a capture is read once more at most, to be sent, and a
    verification not again)."""

    readers: queue.SimpleQueue[ImageIO] = queue.SimpleQueue()
    opened: list[ImageIO] = []

    def work(index: int) -> tuple[int, int, bytes]:
        offset = index * chunk_size
        length = min(chunk_size, size - offset)
        try:
            reader = readers.get_nowait()
        except queue.Empty:
            reader = ImageIO(path, buffer_size=chunk_size)
            opened.append(reader)
        try:
            return index, length, block_digests(reader.read(offset, length), chunk_size)
        finally:
            readers.put(reader)

    try:
        with ThreadPoolExecutor(HASHERS, thread_name_prefix="hash") as pool:
            window: collections.deque[Future[tuple[int, int, bytes]]] = collections.deque()
            for index in indexes:
                window.append(pool.submit(work, index))
                if len(window) >= 2 * HASHERS:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
    finally:
        for reader in opened:
            reader.close()


def rescan_blocks(
    path: Path, previous: Manifest, table: BlockTable, ranges: Iterable[Range]
) -> Scan:
    """The manifest of the image at ``path``, which was ``previous`` but for
    ``ranges``: only the blocks those ranges touch are read, and ``table``
    (``previous``'s block table) is brought up to date."""
    chunk_size = previous.chunk_size
    step = block_size(chunk_size)
    touched = {i: sorted(b) for i, b in sorted(blocks_touching(ranges, chunk_size).items())}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"no image at {path}") from exc
    digests = list(previous.chunks)
    bytes_read = 0
    try:
        size = os.fstat(fd).st_size
        if previous.size != size:
            raise InvalidArgument(
                f"{path} is {size} bytes, the previous manifest {previous.size}: scan it whole"
            )
        # A new snapshot's pages are not cached (the image's are, but they
        # belong to another file): reading one run after another would wait
        # for the disk each time, so the runs ahead are asked for at once.
        ahead = _ReadAhead(
            fd,
            [
                (index * chunk_size + first * step, count * step)
                for index, blocks in touched.items()
                for first, count in _runs(blocks)
            ],
        )
        buffer = bytearray(chunk_size)
        written: dict[int, bytes] = {}  # table entries, written a batch at a time
        for index, blocks in touched.items():
            if index >= len(digests):
                continue
            entries = bytearray(table.read(index))
            chunk_start = index * chunk_size
            for run_start, run_length in _runs(blocks):
                offset = chunk_start + run_start * step
                length = min(run_length * step, size - offset)
                ahead.reading(offset)
                if length <= 0:
                    continue
                view = read_exactly(fd, buffer, offset, length)
                bytes_read += length
                for n, at in enumerate(range(0, length, step)):
                    slot = (run_start + n) * DIGEST_SIZE
                    entries[slot : slot + DIGEST_SIZE] = block_digest(view[at : at + step])
            written[index] = bytes(entries)
            digests[index] = root_digest(written[index])
            if len(written) >= TABLE_BATCH:
                table.write_many(written)
                written.clear()
        table.write_many(written)
    finally:
        os.close(fd)
    return Scan(Manifest(size, chunk_size, tuple(digests)), bytes_read)


#: Chunks whose new table entries :func:`rescan_blocks` holds before writing them.
TABLE_BATCH = 256

#: How far ahead of the reader :class:`_ReadAhead` asks for ranges.
READ_AHEAD_BYTES = 32 * 1024 * 1024


class _ReadAhead:
    """``POSIX_FADV_WILLNEED`` for sorted ``ranges`` about to be read in order, at
    most :data:`READ_AHEAD_BYTES` beyond the one being read (so a large delta
    does not push what it is about to read out of the cache)."""

    def __init__(self, fd: int, ranges: list[Range]) -> None:
        self._fd = fd
        self._ranges = ranges
        self._next = 0  # the first range not asked for yet
        self._asked: collections.deque[Range] = collections.deque()
        self._bytes = 0
        self.reading(ranges[0][0] if ranges else 0)

    def reading(self, offset: int) -> None:
        """The reader is at the range starting at ``offset``: drop what it passed,
        ask for more."""
        while self._asked and self._asked[0][0] < offset:
            self._bytes -= self._asked.popleft()[1]
        while self._next < len(self._ranges) and self._bytes < READ_AHEAD_BYTES:
            start, length = self._ranges[self._next]
            os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_WILLNEED)
            self._asked.append((start, length))
            self._bytes += length
            self._next += 1


def _runs(blocks: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted block numbers as (first, count) runs of consecutive ones."""
    start = previous = blocks[0]
    for block in blocks[1:]:
        if block != previous + 1:
            yield start, previous - start + 1
            start = block
        previous = block
    yield start, previous - start + 1
