"""Image bytes read and written around the page cache (``O_DIRECT``), where it only costs.

A move reads a volume's capture (to hash it, then to send it) and writes the
replica's generation (then reads it back to verify it). Through the page
cache each of those passes allocates, fills and later reclaims a cache page
per 4 KiB: on the 2 vCPU test machine that cost 0.4 to 2 s of kernel CPU per
GiB written, more than hashing it, and a 3 GiB move pushed 6 GiB of the
node's own workloads out of the cache. Direct I/O moves the bytes between
the device and a reused buffer instead, and a read-back then reads what the
disk holds, not what memory does.

Invariants:

- Direct transfers use page-aligned buffers (anonymous maps: :class:`ImageIO`
  keeps one per purpose and reuses it, or a caller writes from its own, as a
  restore does from the buffers its chunks were fetched into), offsets that
  are multiples of :data:`ALIGN` (chunk offsets are: chunk sizes are
  multiples of 4096) and lengths rounded up to :data:`ALIGN`; a read past
  the end of the image returns short. A write whose offset or length is not
  aligned (the short tail of an image whose size is not a multiple) goes
  through the page cache, on a buffered descriptor of the same file.
- Where the filesystem refuses ``O_DIRECT`` (ramfs, tmpfs before Linux 6.6,
  some FUSE or overlay mounts: EINVAL at open or at the first transfer),
  everything goes through the page cache, as before.
- Mixing both on one file stays coherent: a direct read writes back the
  range's dirty cached pages first, a direct write drops the range's cached
  pages (Linux's rules for ``O_DIRECT``), so a byte written either way is
  read back either way.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

from csi_driver.core.errors import InternalError

#: Alignment of direct transfers' offsets, lengths and buffers (the largest
#: logical block size of the devices Ferry's pools sit on).
ALIGN = 4096


def aligned(length: int) -> int:
    """``length`` rounded up to :data:`ALIGN`."""
    return -(-length // ALIGN) * ALIGN


class ImageIO:
    """One image opened for chunk-sized reads or writes, directly where it can.

    Not thread-safe: one per thread (each holds its own buffer).
    """

    def __init__(self, path: Path, *, write: bool = False, buffer_size: int) -> None:
        flags = (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC
        self.path = path
        self._fd = os.open(path, flags)
        self._direct: int | None
        try:
            self._direct = os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                os.close(self._fd)
                raise
            self._direct = None
        self._map = mmap.mmap(-1, aligned(max(buffer_size, 1)))
        self._buffer = memoryview(self._map)

    @property
    def fd(self) -> int:
        """The buffered descriptor (for what is not a read or write: holes, sync)."""
        return self._fd

    @property
    def direct(self) -> bool:
        """Whether transfers still bypass the page cache."""
        return self._direct is not None

    def read(self, offset: int, length: int, *, cached: bool = False) -> memoryview:
        """``length`` bytes at ``offset``, in this reader's buffer: valid until the next
        call. InternalError when the image ends first. ``cached`` reads through the
        page cache (see :meth:`write`)."""
        if length > len(self._buffer):
            raise InternalError(f"a read of {length} bytes into a {len(self._buffer)}-byte buffer")
        view = self._buffer[:length]
        done = 0
        while done < length:
            got = self._read_some(offset + done, view, done, length, cached)
            if got == 0:
                raise InternalError(
                    f"{self.path} ended at byte {offset + done} while reading a chunk; was "
                    "it truncated meanwhile? Retry once it is quiescent"
                )
            done += got
        return view

    def _read_some(
        self, offset: int, view: memoryview, done: int, length: int, cached: bool
    ) -> int:
        direct = self._direct
        if direct is not None and not cached and not offset % ALIGN:
            span = self._buffer[done : done + aligned(length - done)]
            try:
                # Past the end of the file a direct read returns short: what is there.
                return min(os.preadv(direct, [span], offset), length - done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._buffered_from_now()
        return os.preadv(self._fd, [view[done:]], offset)

    def write(
        self,
        offset: int,
        data: bytes | memoryview,
        *,
        cached: bool = False,
        page_aligned: bool = False,
    ) -> None:
        """Write ``data`` at ``offset`` (copied into the aligned buffer for a direct write).

        ``cached`` writes through the page cache: for small scattered writes (a
        delta's 64 KiB blocks), which the cache writes back together at the next
        sync, where each direct write would wait for the device on its own (a
        warm move's final sync took 0.5 s longer so) and its read-back too.
        ``page_aligned``: ``data`` starts a page-aligned buffer of the caller's (an
        anonymous map), written directly as it is, without the copy."""
        length = len(data)
        direct = self._direct
        if (
            direct is not None
            and not cached
            and not (offset | length) % ALIGN
            and (page_aligned or length <= len(self._buffer))
        ):
            if page_aligned:
                view = memoryview(data)
            else:
                view = self._buffer[:length]
                view[:] = data
            try:
                pwrite_all(direct, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._buffered_from_now()
        pwrite_all(self._fd, memoryview(data), offset)

    def _buffered_from_now(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None

    def sync(self) -> None:
        """fdatasync: what either descriptor wrote is on disk (the file's data and
        the metadata needed to read it back are the same for both)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        self._buffered_from_now()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._buffer.release()
        # A caller may still hold a view of the last read: then freed with it.
        with contextlib.suppress(BufferError):
            self._map.close()


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
