"""A directory target's staging: objects appear only at a flush, all of them, and
a flush that failed in the background is reported, never lost; page-aligned
objects (packs) are written around the page cache, anything else through it."""

from __future__ import annotations

import mmap
import os
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi_driver.backup.targets import DIRECT_ALIGN, STAGING, FilesystemTarget
from csi_driver.core.errors import NotFound, Unavailable


def test_staged_objects_appear_at_a_flush_whole(tmp_path: Path) -> None:
    target = FilesystemTarget(tmp_path / "t", flush_bytes=1 << 30)
    target.stage("chunks/ab/one", b"head-", memoryview(b"body"))
    with pytest.raises(NotFound):
        target.get("chunks/ab/one")
    assert list(target.list("chunks/")) == []
    target.flush()
    assert target.get("chunks/ab/one") == b"head-body"
    assert list((tmp_path / "t" / STAGING).iterdir()) == []


def test_background_flushes_leave_every_object_in_place(tmp_path: Path) -> None:
    target = FilesystemTarget(tmp_path / "t", flush_bytes=3000)
    blobs = {f"chunks/{i:02x}/c{i}": bytes([i]) * 1000 for i in range(40)}
    for key, blob in blobs.items():
        target.stage(key, blob[:10], blob[10:])
    target.flush()
    assert {s.key: target.get(s.key) for s in target.list("chunks/")} == blobs
    assert target.uploaded.bytes == 40 * 1000
    assert list((tmp_path / "t" / STAGING).iterdir()) == []


def test_a_flush_waits_for_every_background_flush_under_concurrent_staging(
    tmp_path: Path,
) -> None:
    """Many threads cross the flush threshold at once (as a backup's workers do):
    once flush returns, every object is in place, none left in staging."""
    target = FilesystemTarget(tmp_path / "t", flush_bytes=16 * 1024)
    blob = bytes(1024)

    def stage_many(worker: int) -> None:
        for i in range(60):
            target.stage(f"chunks/{i % 16:02x}/w{worker}-{i}", blob)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(stage_many, range(8)))
    target.flush()
    assert not [t for t in threading.enumerate() if t.name == "backup-target-flush"]
    assert len(list(target.list("chunks/"))) == 8 * 60
    assert list((tmp_path / "t" / STAGING).iterdir()) == []


def test_a_failed_background_flush_is_reported_by_the_next_flush(tmp_path: Path) -> None:
    target = FilesystemTarget(tmp_path / "t", flush_bytes=1)
    (tmp_path / "t" / "chunks").write_bytes(b"")  # no directory can be made under it
    target.stage("chunks/ab/one", b"x")  # due at once: flushed in the background
    with pytest.raises(Unavailable, match="flush objects"):
        target.flush()
    assert not any((tmp_path / "t" / STAGING).iterdir())  # nothing half-made stays


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache, by util-linux's fincore."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "PAGES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.split()[0])


@pytest.mark.parametrize("tail", [0, 100, DIRECT_ALIGN - 1])
def test_a_page_aligned_object_is_written_around_the_page_cache(tmp_path: Path, tail: int) -> None:
    """A pack (a page-aligned map) goes to disk with O_DIRECT, its last partial page
    through the cache, and reads back byte for byte: the cache holds at most that page."""
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} has no direct I/O (ramfs, or tmpfs before Linux 6.6?)")
    size = 64 * DIRECT_ALIGN + tail
    pack = mmap.mmap(-1, size)
    pack[:] = os.urandom(size)
    target = FilesystemTarget(tmp_path / "t")
    target.stage("packs/ab/one", memoryview(pack))
    target.flush()
    assert resident_pages(tmp_path / "t" / "packs" / "ab" / "one") <= (1 if tail else 0)
    assert target.get("packs/ab/one") == pack[:]
    assert target.uploaded.bytes == size


@pytest.mark.root
def test_a_page_aligned_object_is_written_through_the_cache_where_direct_io_is_refused(
    no_direct_io: Path,
) -> None:
    size = 64 * DIRECT_ALIGN + 100
    pack = mmap.mmap(-1, size)
    pack[:] = os.urandom(size)
    target = FilesystemTarget(no_direct_io / "t")
    target.stage("packs/ab/one", memoryview(pack))
    target.flush()
    assert target.get("packs/ab/one") == pack[:]
    assert target.uploaded.bytes == size


@pytest.mark.parametrize(
    "make",
    [
        lambda data: data,  # bytes: wherever Python put them
        lambda data: memoryview(bytearray(b"x" + data))[1:],  # one byte past an alignment
    ],
    ids=["bytes", "unaligned"],
)
def test_unaligned_objects_fall_back_to_the_page_cache(
    tmp_path: Path, make: Callable[[bytes], bytes | memoryview]
) -> None:
    data = os.urandom(8 * DIRECT_ALIGN + 7)
    target = FilesystemTarget(tmp_path / "t")
    target.stage("packs/ab/one", make(data))
    target.flush()
    assert target.get("packs/ab/one") == data
