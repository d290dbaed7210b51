"""Reflink copies and extent maps: finding what changed without reading what did not.

A reflink copy (``FICLONE``) of an image shares every block with it. When
either file is written afterwards, the filesystem writes the new bytes to new
blocks (copy on write), so comparing two point-in-time copies' extent maps
(``FIEMAP``) tells exactly which byte ranges can differ: those whose physical
blocks differ, or that are data in one and a hole in the other.

Invariants:

- The comparison never misses a change: a range is reported unchanged only
  when both files map it to the same written physical blocks, or both read it
  as zeros with no blocks behind it (unmapped, or unwritten extents).
  Extents without a stable physical address (unknown, inline, encoded,
  delayed allocation) always count as changed.
- It is only sound while the older copy still exists (its blocks cannot be
  reused), which is why :mod:`csi_driver.chunks.changes` keeps the previous
  snapshot until the next one is taken.
- Only syscalls on files Ferry opened; no external command.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.errors import FailedPrecondition, InternalError

_FICLONE = 0x40049409
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_HEADER = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQQQIIII")
_BATCH = 256

EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2
EXTENT_DELALLOC = 0x4
EXTENT_ENCODED = 0x8
EXTENT_DATA_INLINE = 0x200
EXTENT_UNWRITTEN = 0x800
EXTENT_SHARED = 0x2000
#: Flags that mean fe_physical does not name the blocks holding the bytes.
_UNSTABLE = EXTENT_UNKNOWN | EXTENT_DELALLOC | EXTENT_ENCODED | EXTENT_DATA_INLINE

#: Why a filesystem refuses FICLONE: it cannot (or not across these files).
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS)


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length


def reflink(source: Path, destination: Path, *, durable: bool = True) -> None:
    """Make ``destination`` a reflink copy of ``source`` (sharing every block), on
    disk before this returns unless ``durable`` is False: then the caller
    fsyncs it (or can lose it) later, as a staging does once per batch of chunks.

    FailedPrecondition when the filesystem cannot (ext4, tmpfs, or two
    filesystems): the caller falls back to copying or hashing.
    """
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dst, _FICLONE, src)
            if durable:
                os.fsync(dst)
        except OSError as exc:
            os.close(dst)
            destination.unlink(missing_ok=True)
            if exc.errno in _NO_REFLINK:
                raise FailedPrecondition(
                    f"cannot reflink {source} to {destination}: {os.strerror(exc.errno or 0)} "
                    "(reflinks need xfs with reflink=1 or btrfs, one filesystem for both)"
                ) from exc
            raise InternalError(f"reflink {source} -> {destination} failed: {exc}") from exc
        os.close(dst)
    finally:
        os.close(src)


def can_reflink(directory: Path) -> bool:
    """Whether files in ``directory`` can be reflinked (tried on a scratch file)."""
    probe, copy = directory / ".reflink-probe", directory / ".reflink-probe.copy"
    try:
        probe.write_bytes(b"\1" * 4096)
        reflink(probe, copy)
        return True
    except FailedPrecondition:
        return False
    finally:
        probe.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)


def extent_map(path: Path) -> list[Extent]:
    """Every extent of ``path``, after flushing its dirty pages (so none is delayed)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents: list[Extent] = []
        start = 0
        while True:
            request = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
            _HEADER.pack_into(request, 0, start, 2**64 - 1 - start, _FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
            try:
                fcntl.ioctl(fd, _FS_IOC_FIEMAP, request)
            except OSError as exc:
                raise FailedPrecondition(
                    f"cannot map the extents of {path}: {exc.strerror}; its filesystem "
                    "does not support FIEMAP, so changes are found by hashing"
                ) from exc
            mapped = _HEADER.unpack_from(request)[3]
            batch = [
                Extent(fields[0], fields[1], fields[2], fields[5])
                for fields in (
                    _EXTENT.unpack_from(request, _HEADER.size + n * _EXTENT.size)
                    for n in range(mapped)
                )
            ]
            extents.extend(batch)
            if not batch or batch[-1].flags & EXTENT_LAST:
                return extents
            start = batch[-1].end
    finally:
        os.close(fd)


def _mapping(extent: Extent | None, position: int) -> int | None:
    """Where ``position``'s bytes live; None when they read as zeros without any
    (unmapped, or an unwritten extent: a thick image's reserved space, or a hole
    that the pool's ``keep_reserved`` filled since): two such ranges hold the same."""
    if extent is None or extent.flags & EXTENT_UNWRITTEN:
        return None
    return extent.physical + (position - extent.logical)


def changed_ranges(older: list[Extent], newer: list[Extent], size: int) -> list[tuple[int, int]]:
    """Byte ranges below ``size`` that may differ between two reflink-related files,
    as sorted, merged (offset, length) pairs.

    One sweep over both maps (each sorted, without overlaps, as FIEMAP gives
    them): a segment ends wherever an extent of either file begins or ends.
    """
    changed: list[tuple[int, int]] = []
    i = j = position = 0
    while position < size:
        while i < len(older) and older[i].end <= position:
            i += 1
        while j < len(newer) and newer[j].end <= position:
            j += 1
        old = older[i] if i < len(older) and older[i].logical <= position else None
        new = newer[j] if j < len(newer) and newer[j].logical <= position else None
        end = size
        for extents, cursor, here in ((older, i, old), (newer, j, new)):
            if here is not None:
                end = min(end, here.end)
            elif cursor < len(extents):
                end = min(end, extents[cursor].logical)
        unstable = (old is not None and old.flags & _UNSTABLE) or (
            new is not None and new.flags & _UNSTABLE
        )
        if unstable or _mapping(old, position) != _mapping(new, position):
            if changed and changed[-1][0] + changed[-1][1] == position:
                changed[-1] = (changed[-1][0], end - changed[-1][0])
            else:
                changed.append((position, end - position))
        position = end
    return changed
