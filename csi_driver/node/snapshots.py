"""A node's snapshots: point-in-time copies of its images, kept in the pool.

Layout under the pool root::

    snapshots/<snapshot-id>.img    the snapshot's bytes (never written again)
    snapshots/<snapshot-id>.json   its metadata: source volume, method, when taken
    snapshots/<snapshot-id>.manifest  its chunk manifest, once another node asked for it

Invariants:

- A snapshot is built under a temporary name and renamed into place after
  its metadata, so a crash leaves nothing, a temporary file (removed at the
  next start) or a whole snapshot; a repeat of a finished take returns it.
- On a pool that can reflink (xfs, btrfs) a snapshot shares every block with
  the image (``FICLONE``): O(1) in the image's size, and atomic with respect
  to the image's writes. Elsewhere its data ranges are copied, which is only
  a point in time while nothing writes the image (the caller freezes or
  refuses).
- A copy of a snapshot taken on another node (this node holds a replica of
  its volume) is installed whole and verified, with its manifest, under the
  same id (:meth:`SnapshotStore.install`); it is served and restored like
  one taken here.
- A snapshot outlives its volume: deleting the image leaves its snapshots,
  whose blocks the filesystem keeps for them.
- A restored image starts as a reflink (or copy) of the snapshot and is then
  grown to its volume's size; it never shares a writable block with the
  snapshot (copy on write).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from csi_driver.chunks.durable import write_atomic
from csi_driver.chunks.extents import reflink
from csi_driver.chunks.generations import sparse_copy
from csi_driver.chunks.manifest import Manifest, encode
from csi_driver.core.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_driver.core.records import SNAPSHOT_ID_PATTERN, SnapshotMethod
from csi_driver.metrics import SNAPSHOT_BYTES, SNAPSHOT_SECONDS
from csi_driver.node.pool import fsync_dir, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    source_volume_id: str
    size_bytes: int
    taken_at: float
    method: SnapshotMethod
    path: Path


def _checked(snapshot_id: str) -> str:
    if not SNAPSHOT_ID_PATTERN.match(snapshot_id):
        raise InvalidArgument(f"{snapshot_id!r} is not a Ferry snapshot id")
    return snapshot_id


def copy_image(source: Path, destination: Path) -> SnapshotMethod:
    """``destination`` as a copy of ``source``: a reflink where the pool can, else its
    data ranges copied (holes stay holes). Returns how."""
    try:
        reflink(source, destination)
        return SnapshotMethod.REFLINK
    except FailedPrecondition:
        sparse_copy(source, destination)
        return SnapshotMethod.COPY


class SnapshotStore:
    """The snapshots held in one pool's ``snapshots/`` directory."""

    def __init__(self, pool_root: Path) -> None:
        self.directory = Path(pool_root) / "snapshots"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def path(self, snapshot_id: str) -> Path:
        return self.directory / f"{_checked(snapshot_id)}.img"

    def _meta(self, snapshot_id: str) -> Path:
        return self.directory / f"{_checked(snapshot_id)}.json"

    def get(self, snapshot_id: str) -> SnapshotInfo | None:
        try:
            meta = json.loads(self._meta(snapshot_id).read_text(encoding="utf-8"))
            size = self.path(snapshot_id).stat().st_size
        except FileNotFoundError:
            return None
        return SnapshotInfo(
            snapshot_id=snapshot_id,
            source_volume_id=str(meta["source_volume_id"]),
            size_bytes=size,
            taken_at=float(meta["taken_at"]),
            method=SnapshotMethod(meta["method"]),
            path=self.path(snapshot_id),
        )

    def require(self, snapshot_id: str) -> SnapshotInfo:
        info = self.get(snapshot_id)
        if info is None:
            raise NotFound(f"snapshot {snapshot_id} is not held in {self.directory}")
        return info

    def ids(self) -> list[str]:
        return sorted(
            p.stem for p in self.directory.glob("snap-*.json") if SNAPSHOT_ID_PATTERN.match(p.stem)
        )

    def take(self, snapshot_id: str, volume_id: str, image: Path) -> SnapshotInfo:
        """Capture ``image`` (volume ``volume_id``) now; a finished take is returned as is.

        The caller keeps the image quiescent (frozen or unused) while this runs.
        """
        existing = self.get(snapshot_id)
        if existing is not None:
            return existing
        final = self.path(snapshot_id)
        tmp = final.with_name(f".{final.name}.tmp")
        taken_at = time.time()
        started = time.monotonic()
        method = copy_image(image, tmp)
        try:
            write_json_atomic(
                self._meta(snapshot_id),
                {
                    "snapshot_id": snapshot_id,
                    "source_volume_id": volume_id,
                    "taken_at": taken_at,
                    "method": method.value,
                },
            )
            os.replace(tmp, final)
            fsync_dir(self.directory)
        except BaseException:
            tmp.unlink(missing_ok=True)
            self._meta(snapshot_id).unlink(missing_ok=True)
            raise
        elapsed = time.monotonic() - started
        SNAPSHOT_SECONDS.labels(method.value).observe(elapsed)
        SNAPSHOT_BYTES.set(self.allocated_bytes())
        log.info(
            "snapshot taken",
            extra={
                "snapshot": snapshot_id,
                "volume": volume_id,
                "method": method.value,
                "seconds": round(elapsed, 4),
            },
        )
        return self.require(snapshot_id)

    def install(
        self, snapshot_id: str, volume_id: str, image: Path, taken_at: float, manifest: Manifest
    ) -> SnapshotInfo:
        """Keep ``image`` (verified against ``manifest``; moved here by rename, on the
        pool's filesystem) as a copy of snapshot ``snapshot_id`` taken elsewhere at
        ``taken_at``. Its manifest is kept beside it, so this node serves it to a
        restore without reading it again."""
        existing = self.get(snapshot_id)
        if existing is not None:
            return existing
        final = self.path(snapshot_id)
        write_atomic(final.with_suffix(".manifest"), encode(manifest))
        write_json_atomic(
            self._meta(snapshot_id),
            {
                "snapshot_id": snapshot_id,
                "source_volume_id": volume_id,
                "taken_at": taken_at,
                "method": SnapshotMethod.PULLED.value,
            },
        )
        os.replace(image, final)
        fsync_dir(self.directory)
        SNAPSHOT_BYTES.set(self.allocated_bytes())
        log.info("snapshot copy kept", extra={"snapshot": snapshot_id, "volume": volume_id})
        return self.require(snapshot_id)

    def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot; an unknown one is already deleted."""
        self._meta(snapshot_id).unlink(missing_ok=True)
        self.path(snapshot_id).unlink(missing_ok=True)
        self.path(snapshot_id).with_suffix(".manifest").unlink(missing_ok=True)
        fsync_dir(self.directory)
        SNAPSHOT_BYTES.set(self.allocated_bytes())
        log.info("snapshot deleted", extra={"snapshot": snapshot_id})

    def allocated_bytes(self) -> int:
        """Blocks the snapshots hold (shared ones included) on the pool's filesystem."""
        return sum(
            p.stat().st_blocks * 512 for p in self.directory.glob("snap-*.img") if p.exists()
        )
