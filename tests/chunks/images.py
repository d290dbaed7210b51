"""Test images: sparse files with chosen chunks written."""

from __future__ import annotations

import os
from pathlib import Path


def write_image(path: Path, chunks: dict[int, bytes], count: int, chunk_size: int) -> None:
    """``path`` as ``count`` chunks of ``chunk_size``: holes but for ``chunks``."""
    with open(path, "wb") as handle:
        handle.truncate(count * chunk_size)
        for index, data in chunks.items():
            handle.seek(index * chunk_size)
            handle.write(data)


def write_at(path: Path, offset: int, data: bytes) -> None:
    """``data`` written over ``path`` at ``offset``, durably."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
