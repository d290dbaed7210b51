"""Point-in-time captures of a live image, each costing what changed since the last.

Layout of a tracker's work directory::

    snap-<n>.img        reflink snapshot n of the image (pools that can reflink)
    snap-<n>.blocks     its block table (see :mod:`.blocks`)
    snap-<n>.manifest   its manifest (written last: a snapshot without one is
                        an interrupted capture, discarded at the next)
    hashed.blocks       the block table of the last capture by hashing (ext4)

Invariants:

- On a pool that can reflink (xfs, btrfs), capture ``n`` is a reflink
  snapshot; its manifest and block table are snapshot ``n - 1``'s with only
  the blocks whose extents differ between the two snapshots read again. The previous
  snapshot is removed only after the new manifest is durable (by the capture,
  or once the new one is served: :func:`retire_older_captures`), so the extent
  comparison always has a live older copy (see :mod:`.extents`).
- Elsewhere (ext4) the image is hashed whole in place: the caller must keep
  it quiescent (unmounted or frozen) while :meth:`ChangeTracker.capture` runs.
- A capture's ``source`` holds exactly the bytes its manifest describes
  until the next capture.
- A lineage may be seeded (:meth:`ChangeTracker.seed`) with an image whose
  manifest and block table are verified (a replica generation made primary),
  and an image this lineage captured may be described from its newest
  capture (:func:`describe_since_capture`): both cost what changed, never the
  whole image, and both keep the older copy open while comparing extents.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.durable import write_atomic
from csi_driver.chunks.extents import changed_ranges, extent_map, reflink
from csi_driver.chunks.manifest import DEFAULT_CHUNK_SIZE, Manifest, decode, encode
from csi_driver.chunks.scan import Scan, rescan_blocks, scan_image
from csi_driver.core.errors import FailedPrecondition, FerryError, InvalidArgument

log = logging.getLogger(__name__)

_SNAPSHOT = re.compile(r"^snap-(\d{8})\.img$")


class Method(enum.Enum):
    EXTENTS = "extents"  # reflink snapshot, only blocks with changed extents read
    FULL = "full"  # reflink snapshot, read whole (first capture, or size changed)
    HASHING = "hashing"  # no reflink: the image itself, read whole


@dataclass(frozen=True)
class Capture:
    number: int
    manifest: Manifest
    source: Path  # where the manifest's bytes can be read until the next capture
    method: Method
    bytes_read: int
    #: The manifest's block table (:mod:`.blocks`), valid as long as ``source`` is.
    blocks: Path | None = None


class ChangeTracker:
    """Captures of the image at ``image``, kept in ``work_dir``."""

    def __init__(self, image: Path, work_dir: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.image = image
        self.work_dir = work_dir
        self.chunk_size = chunk_size
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _snapshot(self, number: int) -> Path:
        return self.work_dir / f"snap-{number:08d}.img"

    def _numbers(self) -> list[int]:
        return _numbers(self.work_dir)

    def seed(self, image: Path, manifest: Manifest, blocks: Path) -> bool:
        """Start the lineage afresh with a reflink of ``image``, whose ``manifest``
        and block table (``blocks``) are known and verified: the next capture
        compares extents with it instead of reading the whole image. False (and
        nothing kept) where the pool cannot reflink: captures hash there anyway."""
        if manifest.chunk_size != self.chunk_size:
            return False
        for number in self._numbers():
            for suffix in (".img", ".blocks", ".manifest"):
                self._snapshot(number).with_suffix(suffix).unlink(missing_ok=True)
        snapshot = self._snapshot(1)
        try:
            reflink(image, snapshot)
            reflink(blocks, snapshot.with_suffix(".blocks"))
        except FailedPrecondition:
            snapshot.unlink(missing_ok=True)
            snapshot.with_suffix(".blocks").unlink(missing_ok=True)
            return False
        write_atomic(snapshot.with_suffix(".manifest"), encode(manifest))  # last: complete
        log.info("capture lineage seeded", extra={"image": str(image)})
        return True

    def last(self) -> tuple[int, Manifest] | None:
        """The newest complete capture's number and manifest."""
        for number in reversed(self._numbers()):
            path = self._snapshot(number).with_suffix(".manifest")
            if path.exists():
                try:
                    return number, decode(path.read_bytes())
                except InvalidArgument:
                    log.warning("capture of an older format ignored", extra={"path": str(path)})
                    return None
        return None

    def retire_older(self) -> None:
        """Remove the captures older than the newest complete one (see
        :func:`retire_older_captures`)."""
        retire_older_captures(self.work_dir)

    def capture(self, *, keep_older: bool = False) -> Capture:
        """A new capture of the image; the older ones are removed before this returns
        unless ``keep_older`` (then :meth:`retire_older` does it later)."""
        previous = self.last()
        number = previous[0] + 1 if previous else 1
        for stale in self._numbers():
            if previous is None or stale > previous[0]:
                for suffix in (".img", ".blocks", ".manifest"):  # an interrupted capture
                    self._snapshot(stale).with_suffix(suffix).unlink(missing_ok=True)
        snapshot = self._snapshot(number)
        try:
            reflink(self.image, snapshot)
        except FailedPrecondition:
            hashed = self.work_dir / "hashed.blocks"
            table = BlockTable.create(hashed, self.image.stat().st_size, self.chunk_size)
            try:
                scan = scan_image(self.image, self.chunk_size, table=table)
            finally:
                table.close()
            log.info(
                "image hashed (no reflink on this pool)",
                extra={"image": str(self.image), "bytes_read": scan.bytes_read},
            )
            return Capture(
                number, scan.manifest, self.image, Method.HASHING, scan.bytes_read, hashed
            )
        method = Method.FULL
        blocks = snapshot.with_suffix(".blocks")
        older = self._snapshot(previous[0]) if previous else None
        size = snapshot.stat().st_size
        if (
            previous is not None
            and older is not None
            and older.exists()
            and older.with_suffix(".blocks").exists()
            and previous[1].size == size
            and previous[1].chunk_size == self.chunk_size
        ):
            scan = _rescan_since(older, previous[1], snapshot, blocks)
            method = Method.EXTENTS
        else:
            table = BlockTable.create(blocks, size, self.chunk_size)
            try:
                scan = scan_image(snapshot, self.chunk_size, table=table)
                table.sync()
            finally:
                table.close()
        write_atomic(snapshot.with_suffix(".manifest"), encode(scan.manifest))
        if not keep_older:
            self.retire_older()
        log.info(
            "image captured",
            extra={
                "image": str(self.image),
                "capture": number,
                "method": method.value,
                "bytes_read": scan.bytes_read,
            },
        )
        return Capture(number, scan.manifest, snapshot, method, scan.bytes_read, blocks)


def retire_older_captures(work_dir: Path) -> None:
    """Remove the captures in ``work_dir`` older than the newest complete one.

    Freeing a reflinked snapshot costs as much as the volume has extents, not
    what changed, so a caller that serves the new capture may defer this until
    it serves it (``capture(keep_older=True)``); the next capture does it anyway.
    """
    try:
        numbers = _numbers(work_dir)
    except FileNotFoundError:
        return
    complete = [n for n in numbers if (work_dir / f"snap-{n:08d}.manifest").exists()]
    for old in numbers:
        if complete and old < complete[-1]:
            for suffix in (".img", ".blocks", ".manifest"):
                (work_dir / f"snap-{old:08d}{suffix}").unlink(missing_ok=True)


def _numbers(work_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in work_dir.iterdir() if (m := _SNAPSHOT.match(p.name)))


def _rescan_since(older: Path, manifest: Manifest, newer: Path, blocks: Path) -> Scan:
    """``newer``'s manifest, ``older`` holding ``manifest`` (block table beside it):
    the table is copied to ``blocks`` and only blocks whose extents differ are read.
    The caller keeps ``older`` alive meanwhile (see :mod:`.extents`)."""
    size = newer.stat().st_size
    ranges = changed_ranges(extent_map(older), extent_map(newer), size)
    table = BlockTable.create(
        blocks, size, manifest.chunk_size, copy_of=older.with_suffix(".blocks")
    )
    try:
        scan = rescan_blocks(newer, manifest, table, ranges)
        table.sync()
    finally:
        table.close()
    return scan


def describe_since_capture(lineage: Path, image: Path, blocks: Path) -> Scan | None:
    """The manifest of ``image``, a quiescent image whose captures are kept in
    ``lineage`` (a demoted primary's), with its block table written to ``blocks``:
    computed from the newest capture by comparing extents, reading only what
    changed since. None when no capture can serve (none, another size, gone
    meanwhile, no extent maps): the caller scans the image whole."""
    try:
        numbers = _numbers(lineage)
    except FileNotFoundError:
        return None
    if not numbers:
        return None
    older = lineage / f"snap-{numbers[-1]:08d}.img"
    try:
        # Open first: while this descriptor lives, the capture's blocks cannot be
        # reused, even if its lineage is removed meanwhile (a retired export).
        fd = os.open(older, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        manifest = decode(older.with_suffix(".manifest").read_bytes())
        if manifest.size != image.stat().st_size:
            return None
        return _rescan_since(older, manifest, image, blocks)
    except (OSError, FerryError):
        return None  # an interrupted or removed capture, or no extent maps here
    finally:
        os.close(fd)
