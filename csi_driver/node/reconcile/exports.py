"""The primary's export reconciler: serve point-in-time images its ExportSpecs ask for.

The controller writes ``spec/exports/<node>/<volume>``; each ``round`` asks
for a new capture of the volume's image. This reconciler, in the node agent
that holds the primary image, captures it, serves it through the node's ChunkSource under
the export's transfer id, and reports ``status/exports/<node>/<volume>``
with the endpoint, the manifest digest and the capture time. Invariants:

- A capture of a mounted volume is crash-consistent: its filesystem is
  frozen (FIFREEZE) just long enough to reflink the image, or to copy it
  where the pool cannot reflink; the copy is then hashed and served while
  the volume is written again. An unmounted image is captured as it is.
- A ``final`` export (a move's last sync) is captured only while nothing on
  this node uses the volume, under the volume's lock (:meth:`NodeAgent.unused`),
  so the image it serves is the one the volume's last writer left; until
  then the status says WAITING and why.
- Exports live in memory: after a restart the informer's list brings every
  spec back and each is captured and served again; a status never points
  at an export this process does not serve for longer than that.
- A status is written only while its spec is unchanged (compare on the
  spec's revision), so it never answers a newer round it did not capture.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from csi_driver.chunks.changes import ChangeTracker, retire_older_captures
from csi_driver.chunks.extents import reflink
from csi_driver.chunks.generations import sparse_copy
from csi_driver.chunks.manifest import Manifest, encode
from csi_driver.core.errors import FailedPrecondition, FerryError
from csi_driver.core.records import (
    ExportPhase,
    ExportSpec,
    ExportStatus,
    ImageRole,
    ImageSpec,
    answers,
    export_spec_key,
    export_specs_on,
    export_status_key,
    image_spec_key,
)
from csi_driver.faults import crash_point
from csi_driver.node.agent import NodeAgent
from csi_driver.node.filesystem import frozen, thaw
from csi_driver.node.pool import Pool
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.report import report
from csi_driver.reconcile.runner import Runner, Source, strip_prefix
from csi_driver.store.base import CatalogStore
from csi_driver.store.records import Versioned, read
from csi_driver.transfer.source import Exports

log = logging.getLogger(__name__)

#: How often a final export looks again whether the volume was unstaged.
QUIESCE_POLL_S = 0.5


def capture_lineage(pool: Pool, volume_id: str) -> Path:
    """Where a volume's captures on this node are kept (:class:`ChangeTracker`'s
    work directory), final or not: each capture reads only what changed since
    the one before, whatever made it."""
    return pool.captures_dir / volume_id / "snapshots"


def forget_captures(pool: Pool, volume_id: str) -> None:
    """Remove every capture of the volume on this node (they hold its old blocks)."""
    shutil.rmtree(pool.captures_dir / volume_id, ignore_errors=True)


def manifest_digest(manifest: Manifest) -> str:
    """A short name for a manifest's exact content (what a replica verified)."""
    return hashlib.sha256(encode(manifest)).hexdigest()


class ExportReconciler:
    """Serves this node's exports (the work key is the volume id)."""

    def __init__(
        self, store: CatalogStore, agent: NodeAgent, exports: Exports, endpoint: str
    ) -> None:
        self._store = store
        self._agent = agent
        self._exports = exports
        self._endpoint = endpoint
        self.node_id = agent.node_id
        # transfer id served per volume, so a new round retires the old one
        self._served: dict[str, str] = {}

    def __call__(self, volume_id: str) -> float | None:
        spec_read = read(self._store, ExportSpec, export_spec_key(self.node_id, volume_id))
        if spec_read is None:
            self._retire(volume_id)
            if self._demoted_here(volume_id):
                # The replica reconciler adopts the image by its last capture, then
                # removes the captures; only the frozen copy is of no use to it.
                (self._agent.pool.captures_dir / volume_id / "frozen.img").unlink(missing_ok=True)
            else:
                forget_captures(self._agent.pool, volume_id)
            return None
        spec = spec_read.value
        current = read(self._store, ExportStatus, export_status_key(self.node_id, volume_id))
        if (
            current is not None
            and answers(current.value, spec)
            and current.value.phase is ExportPhase.READY
            and self._served.get(volume_id) == spec.transfer_id
        ):
            return None
        if self._agent.pool.get(volume_id) is None:
            image = read(self._store, ImageSpec, image_spec_key(self.node_id, volume_id))
            if image is None or image.value.role is not ImageRole.PRIMARY or image.value.deleted:
                self._retire(volume_id)  # not (or no longer) this node's to serve
                return None
            # Just made primary: the image reconciler adopts the replica first.
            waiting = self._status(spec, ExportPhase.WAITING, "no image in the pool yet")
            self._report(spec_read, current, waiting)
            return QUIESCE_POLL_S
        try:
            status = self._capture(spec)
        except FailedPrecondition as exc:
            if not spec.final:
                raise
            self._report(spec_read, current, self._status(spec, ExportPhase.WAITING, exc.message))
            return QUIESCE_POLL_S
        except FerryError as exc:
            self._report(spec_read, current, self._status(spec, ExportPhase.FAILED, exc.message))
            raise
        crash_point("node:export:captured")
        self._report(spec_read, current, status)
        # Freeing the older capture waits until the receiver can pull this one.
        retire_older_captures(capture_lineage(self._agent.pool, volume_id))
        return None

    def _demoted_here(self, volume_id: str) -> bool:
        """True when this node now keeps a replica of the volume (a primary demoted
        by a move): the replica reconciler adopts the image, perhaps this very
        moment, by the last capture, and removes the captures itself."""
        image = read(self._store, ImageSpec, image_spec_key(self.node_id, volume_id))
        return (
            image is not None and image.value.role is ImageRole.REPLICA and not image.value.deleted
        )

    def _capture(self, spec: ExportSpec) -> ExportStatus:
        image = self._agent.pool.require(spec.volume_id)
        work = self._agent.pool.captures_dir / spec.volume_id
        # A move's final capture compares extents with the last round's and reads
        # only what changed since (the frozen copies and the image share blocks).
        lineage = capture_lineage(self._agent.pool, spec.volume_id)
        if spec.final:
            with self._agent.unused(spec.volume_id):
                capture = ChangeTracker(image.path, lineage).capture(keep_older=True)
        else:
            with self._agent.holding(spec.volume_id):
                mounted = self._agent.mounted_at(spec.volume_id)
                source = image.path if mounted is None else _frozen_copy(image.path, mounted, work)
            capture = ChangeTracker(source, lineage).capture(keep_older=True)
        self._retire(spec.volume_id)
        self._exports.add(spec.transfer_id, capture.source, capture.manifest, capture.blocks)
        self._served[spec.volume_id] = spec.transfer_id
        return ExportStatus(
            volume_id=spec.volume_id,
            node_id=self.node_id,
            phase=ExportPhase.READY,
            observed_generation=spec.generation,
            epoch=spec.epoch,
            transfer_id=spec.transfer_id,
            endpoint=self._endpoint,
            manifest_digest=manifest_digest(capture.manifest),
            size_bytes=capture.manifest.size,
            data_bytes=capture.manifest.data_bytes,
            captured_at=time.time(),
            final=spec.final,
        )

    def _status(self, spec: ExportSpec, phase: ExportPhase, message: str) -> ExportStatus:
        return ExportStatus(
            volume_id=spec.volume_id,
            node_id=self.node_id,
            phase=phase,
            observed_generation=spec.generation,
            epoch=spec.epoch,
            final=spec.final,
            message=message,
        )

    def _retire(self, volume_id: str) -> None:
        served = self._served.pop(volume_id, None)
        if served is not None:
            self._exports.remove(served)

    def _report(
        self,
        spec_read: Versioned[ExportSpec],
        current: Versioned[ExportStatus] | None,
        status: ExportStatus,
    ) -> None:
        if report(self._store, spec_read, current, status):
            log.info(
                "export status reported",
                extra={
                    "volume": status.volume_id,
                    "phase": status.phase.value,
                    "transfer": status.transfer_id,
                },
            )


def _frozen_copy(image: Path, mountpoint: Path, work: Path) -> Path:
    """A crash-consistent copy of a mounted volume's image: a reflink (or, on a pool
    that cannot, a sparse copy) made while its filesystem is frozen."""
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    copy, building = work / "frozen.img", work / ".frozen.img.tmp"
    started = time.monotonic()
    with frozen(mountpoint):
        try:
            reflink(image, building)
        except FailedPrecondition:
            sparse_copy(image, building)
    held = time.monotonic() - started
    # A pull still streaming the previous copy keeps reading its inode.
    os.replace(building, copy)
    log.info("image copied while frozen", extra={"image": str(image), "frozen_s": round(held, 3)})
    return copy


def thaw_staged(agent: NodeAgent) -> None:
    """Thaw what a capture left frozen when this process was killed mid-copy."""
    for volume_id in agent.staged_volumes():
        mounted = agent.mounted_at(volume_id)
        if mounted is not None and thaw(mounted):
            log.warning(
                "thawed a filesystem a killed capture left frozen", extra={"volume": volume_id}
            )


def export_runner(
    store: CatalogStore,
    agent: NodeAgent,
    exports: Exports,
    endpoint: str,
    *,
    resync_s: float = 60.0,
) -> Runner:
    specs = export_specs_on(agent.node_id)
    thaw_staged(agent)
    return Runner(
        f"exports:{agent.node_id}",
        ExportReconciler(store, agent, exports, endpoint),
        [Source(Informer(store, specs), strip_prefix(specs))],
        workers=2,
        resync_s=resync_s,
    )
