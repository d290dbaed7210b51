"""Image I/O around the page cache on real files: what is written either way reads
back either way, tails that are not aligned and reads past the end work, and a
direct read sees bytes another writer left in the page cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver.chunks.direct import ALIGN, ImageIO
from csi_driver.core.errors import InternalError
from tests.chunks.images import write_at

CHUNK = 256 * 1024


def test_chunks_written_directly_read_back_byte_identical(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(bytes(4 * CHUNK))
    data = [os.urandom(CHUNK) for _ in range(4)]
    writer = ImageIO(image, write=True, buffer_size=CHUNK)
    assert writer.direct  # /var/tmp's ext4 takes O_DIRECT: the path under test
    for index in (2, 0, 3, 1):
        writer.write(index * CHUNK, data[index])
    writer.sync()
    writer.close()
    reader = ImageIO(image, buffer_size=CHUNK)
    assert reader.direct
    for index in range(4):
        assert bytes(reader.read(index * CHUNK, CHUNK)) == data[index]
    reader.close()
    assert image.read_bytes() == b"".join(data)  # and through the page cache


def test_an_unaligned_tail_is_written_and_read_through_the_page_cache(tmp_path: Path) -> None:
    image = tmp_path / "image"
    size = CHUNK + 1000  # the last chunk is not a multiple of ALIGN
    image.write_bytes(bytes(size))
    tail = os.urandom(1000)
    writer = ImageIO(image, write=True, buffer_size=CHUNK)
    writer.write(CHUNK, tail)
    writer.write(ALIGN, b"\7" * ALIGN)
    writer.write(3, b"odd")  # an unaligned offset too
    writer.sync()
    writer.close()
    reader = ImageIO(image, buffer_size=CHUNK)
    assert bytes(reader.read(CHUNK, 1000)) == tail  # a direct read that ends past EOF
    assert bytes(reader.read(0, 8)) == b"\0\0\0odd\0\0"
    assert bytes(reader.read(ALIGN - 1, 2)) == b"\0\7"
    with pytest.raises(InternalError, match="ended at byte"):
        reader.read(CHUNK, 1001)
    with pytest.raises(InternalError, match="buffer"):
        reader.read(0, CHUNK + ALIGN)
    reader.close()
    assert image.read_bytes()[CHUNK:] == tail


def test_a_direct_read_sees_what_another_writer_left_in_the_page_cache(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"\1" * CHUNK)
    reader = ImageIO(image, buffer_size=CHUNK)
    assert bytes(reader.read(0, CHUNK)) == b"\1" * CHUNK
    with open(image, "r+b") as handle:  # buffered and not synced: only in the page cache
        handle.seek(17)
        handle.write(b"\xff")
    assert bytes(reader.read(0, CHUNK))[16:19] == b"\1\xff\1"
    write_at(image, CHUNK - 1, b"\2")
    assert reader.read(0, CHUNK)[-1] == 2
    reader.close()


def test_a_view_held_past_close_stays_valid(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"\3" * CHUNK)
    reader = ImageIO(image, buffer_size=CHUNK)
    view = reader.read(0, 16)
    reader.close()  # the caller still holds the view: its memory goes with it
    assert bytes(view) == b"\3" * 16


def test_cached_transfers_go_through_the_page_cache_and_agree_with_direct_ones(
    tmp_path: Path,
) -> None:
    image = tmp_path / "image"
    image.write_bytes(bytes(2 * CHUNK))
    io = ImageIO(image, write=True, buffer_size=CHUNK)
    io.write(0, b"\5" * CHUNK, cached=True)  # dirty in the page cache
    io.write(CHUNK, b"\6" * CHUNK)
    io.close()
    reader = ImageIO(image, buffer_size=CHUNK)
    assert bytes(reader.read(0, CHUNK)) == b"\5" * CHUNK  # direct: written back first
    assert bytes(reader.read(CHUNK, CHUNK, cached=True)) == b"\6" * CHUNK
    reader.close()


@pytest.mark.root
def test_a_filesystem_refusing_direct_io_is_read_and_written_through_the_page_cache(
    no_direct_io: Path,
) -> None:
    """ramfs refuses O_DIRECT at open: every transfer goes through the page cache,
    aligned or not, and reads back what was written."""
    image = no_direct_io / "image"
    image.write_bytes(bytes(4 * CHUNK))
    data = [os.urandom(CHUNK) for _ in range(4)]
    writer = ImageIO(image, write=True, buffer_size=CHUNK)
    assert not writer.direct
    for index in (3, 1, 0, 2):
        writer.write(index * CHUNK, data[index])
    writer.write(CHUNK + 5, b"odd")
    writer.sync()
    writer.close()
    expected = bytearray(b"".join(data))
    expected[CHUNK + 5 : CHUNK + 8] = b"odd"
    reader = ImageIO(image, buffer_size=CHUNK)
    assert not reader.direct
    assert b"".join(bytes(reader.read(i * CHUNK, CHUNK)) for i in range(4)) == expected
    assert bytes(reader.read(CHUNK + 4, 5)) == expected[CHUNK + 4 : CHUNK + 9]
    reader.close()
    assert image.read_bytes() == expected
