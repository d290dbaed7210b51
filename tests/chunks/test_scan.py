"""Scanning real files: holes are never read, all-zero chunks become holes,
and a rescan reads only the chunks it is told may have changed."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_driver.chunks.manifest import MiB, chunk_digest
from csi_driver.chunks.scan import scan_image
from csi_driver.node.pool import preallocate

CHUNK = 64 * 1024


def reference(path: Path, chunk_size: int) -> tuple[bytes | None, ...]:
    """Digests from reading the whole file the obvious way."""
    data = path.read_bytes()
    chunks = [data[at : at + chunk_size] for at in range(0, len(data), chunk_size)]
    return tuple(None if not any(c) else chunk_digest(c) for c in chunks)


def test_a_sparse_image_costs_what_it_holds(tmp_path: Path) -> None:
    image = tmp_path / "sparse.img"
    with open(image, "wb") as handle:
        handle.truncate(64 * MiB)
        handle.seek(10 * MiB + 5)
        handle.write(b"data")
    scan = scan_image(image, MiB)
    assert scan.bytes_read == MiB
    assert scan.manifest.data_chunks == (10,)
    assert scan.manifest.chunks == reference(image, MiB)


def test_a_thick_image_reads_its_written_chunks_and_zeros_are_holes(tmp_path: Path) -> None:
    image = tmp_path / "thick.img"
    fd = os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        preallocate(fd, 0, 32 * MiB, "test")
        os.pwrite(fd, b"x" * 4096, 3 * MiB)
        os.pwrite(fd, bytes(MiB), 7 * MiB)  # zeros written for real: data to the filesystem
    finally:
        os.close(fd)
    scan = scan_image(image, MiB)
    assert scan.manifest.data_chunks == (3,)
    # Unwritten extents are holes to SEEK_DATA on this ext4; the written zeros are
    # read once and recognised as a hole. Nothing else is read.
    assert scan.bytes_read <= 2 * MiB
    assert scan.manifest.chunks == reference(image, MiB)


def test_a_rescan_reads_only_the_changed_chunks(tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(8 * CHUNK))
    first = scan_image(image, CHUNK).manifest
    with open(image, "r+b") as handle:
        handle.seek(5 * CHUNK + 7)
        handle.write(b"changed")
    again = scan_image(image, CHUNK, previous=first, changed={5})
    assert again.bytes_read == CHUNK
    assert again.manifest.chunks == reference(image, CHUNK)
    assert again.manifest.chunks[5] != first.chunks[5]


writes = st.lists(
    st.tuples(st.integers(0, 16 * CHUNK), st.binary(min_size=1, max_size=CHUNK * 2)),
    max_size=6,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Chunk sizes below, at, off and above the 64 KiB block: a short last chunk's
# digest must not depend on the chunk size (backups hash chunks without it).
@given(writes, st.integers(1, 20 * CHUNK), st.sampled_from([4096, CHUNK, 100 * 1024, 4 * CHUNK]))
def test_any_sparse_file_scans_to_its_bytes(
    tmp_path: Path, changes: list[tuple[int, bytes]], size: int, chunk_size: int
) -> None:
    image = tmp_path / "any.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
        for offset, data in changes:
            handle.seek(offset)
            handle.write(data)
    scan = scan_image(image, chunk_size)
    assert scan.manifest.size == image.stat().st_size
    assert scan.manifest.chunks == reference(image, chunk_size)
    assert scan.bytes_read <= len(scan.manifest.chunks) * chunk_size
