"""Point-in-time captures of a live image, each costing what changed since the last.

Layout of a tracker's work directory::

    snap-<n>.img        reflink snapshot n of the image (pools that can reflink)
    snap-<n>.manifest   its manifest (written last: a snapshot without one is
                        an interrupted capture, discarded at the next)

Invariants:

- On a pool that can reflink (xfs, btrfs), capture ``n`` is a reflink
  snapshot; its manifest is snapshot ``n - 1``'s with only the chunks whose
  extents differ between the two snapshots read again. The previous
  snapshot is removed only after the new manifest is durable, so the extent
  comparison always has a live older copy (see :mod:`.extents`).
- Elsewhere (ext4) the image is hashed whole in place: the caller must keep
  it quiescent (unmounted or frozen) while :meth:`ChangeTracker.capture` runs.
- A capture's ``source`` holds exactly the bytes its manifest describes
  until the next capture.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from csi_driver.chunks.durable import write_atomic
from csi_driver.chunks.extents import changed_ranges, extent_map, reflink
from csi_driver.chunks.manifest import DEFAULT_CHUNK_SIZE, Manifest, decode, encode
from csi_driver.chunks.scan import chunks_touching, scan_image
from csi_driver.core.errors import FailedPrecondition

log = logging.getLogger(__name__)

_SNAPSHOT = re.compile(r"^snap-(\d{8})\.img$")


class Method(enum.Enum):
    EXTENTS = "extents"  # reflink snapshot, only chunks with changed extents read
    FULL = "full"  # reflink snapshot, read whole (first capture, or size changed)
    HASHING = "hashing"  # no reflink: the image itself, read whole


@dataclass(frozen=True)
class Capture:
    number: int
    manifest: Manifest
    source: Path  # where the manifest's bytes can be read until the next capture
    method: Method
    bytes_read: int


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
        return sorted(
            int(m.group(1)) for p in self.work_dir.iterdir() if (m := _SNAPSHOT.match(p.name))
        )

    def last(self) -> tuple[int, Manifest] | None:
        """The newest complete capture's number and manifest."""
        for number in reversed(self._numbers()):
            path = self._snapshot(number).with_suffix(".manifest")
            if path.exists():
                return number, decode(path.read_bytes())
        return None

    def capture(self) -> Capture:
        previous = self.last()
        number = previous[0] + 1 if previous else 1
        for stale in self._numbers():
            if previous is None or stale > previous[0]:
                self._snapshot(stale).unlink(missing_ok=True)  # an interrupted capture
        snapshot = self._snapshot(number)
        try:
            reflink(self.image, snapshot)
        except FailedPrecondition:
            scan = scan_image(self.image, self.chunk_size)
            log.info(
                "image hashed (no reflink on this pool)",
                extra={"image": str(self.image), "bytes_read": scan.bytes_read},
            )
            return Capture(number, scan.manifest, self.image, Method.HASHING, scan.bytes_read)
        method = Method.FULL
        older = self._snapshot(previous[0]) if previous else None
        if previous is not None and older is not None and older.exists():
            size = snapshot.stat().st_size
            base = previous[1]
            if base.size == size and base.chunk_size == self.chunk_size:
                ranges = changed_ranges(extent_map(older), extent_map(snapshot), size)
                changed = chunks_touching(ranges, self.chunk_size)
                scan = scan_image(snapshot, self.chunk_size, previous=base, changed=changed)
                method = Method.EXTENTS
        if method is Method.FULL:
            scan = scan_image(snapshot, self.chunk_size)
        write_atomic(snapshot.with_suffix(".manifest"), encode(scan.manifest))
        for old in self._numbers():
            if old < number:
                self._snapshot(old).unlink(missing_ok=True)
                self._snapshot(old).with_suffix(".manifest").unlink(missing_ok=True)
        log.info(
            "image captured",
            extra={
                "image": str(self.image),
                "capture": number,
                "method": method.value,
                "bytes_read": scan.bytes_read,
            },
        )
        return Capture(number, scan.manifest, snapshot, method, scan.bytes_read)
