"""Files that are either wholly old or wholly new after a crash, and writes made
durable sooner: writeback started as bytes are written, so that the fsync
that makes them count waits for less."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

from csi_driver.node.pool import fsync_dir

#: sync_file_range(2): start writing the range's dirty pages, wait for nothing.
_SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if call is None:
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _libc_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``fd``'s dirty pages in the range to disk, without waiting.

    Only a head start for the fdatasync that follows (which alone makes them
    durable): where the call is missing or fails, nothing is lost but time.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
