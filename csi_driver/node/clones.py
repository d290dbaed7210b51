"""Snapshots travelling between nodes: served as chunk streams, pulled and verified.

A clone or restore whose snapshot lives on another node is built from that
node's chunks (DESIGN.md, "restore and clone = pull a manifest and its
chunks onto any node"):

- The holding node serves every snapshot in its pool under the snapshot's
  id as transfer id (:class:`SnapshotExports`). A snapshot is never written
  again, so the export is immutable while served; its manifest is computed
  once, on first demand, and kept next to it.
- The receiving node pulls it into a generation store under its pool
  (:class:`SnapshotFetcher`): every chunk is checked against the manifest
  as it lands, and the image is committed only when it verifies whole;
  then the verified image becomes the new volume's image. A pull cut short
  resumes from what landed. When the node the source names cannot serve it
  (unreachable, gone), the pull goes on from another node reporting a
  READY copy (the replicas' nodes hold them): the same bytes, the same
  manifest.
- A snapshot of a volume this node holds a replica of is copied here
  (:meth:`SnapshotFetcher.copy`): the pull is staged against a reflink of
  the replica's current generation, so only the chunks in which the
  snapshot differs from the replica travel, each verified; the committed
  image is kept as the snapshot's copy.
- A snapshot that was backed up (its source names a backup id) is restored
  from the backup target instead, when this node has one: that needs
  nothing of the node that took it (which may be gone, or in another
  cluster), and every chunk is authenticated and hash-checked as it lands.
- Whatever a pull or a restore leaves half done (a partial generation, a
  restore's ``.part`` file) lives under ``incoming/<id>/`` only: a retry
  resumes it, success removes it, and so does the deletion of the volume
  or snapshot copy it was for (:meth:`SnapshotFetcher.discard`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from csi_driver.backup.snapshots import NOT_CONFIGURED, SnapshotBackups
from csi_driver.chunks.durable import write_atomic
from csi_driver.chunks.generations import GenerationStore
from csi_driver.chunks.manifest import decode, encode
from csi_driver.chunks.scan import scan_image
from csi_driver.core.errors import FailedPrecondition, NotFound, Unavailable
from csi_driver.core.model import VOLUME_ID_PATTERN
from csi_driver.core.records import (
    SNAPSHOT_ID_PATTERN,
    ImagePhase,
    ImageSource,
    SnapshotSpec,
    SnapshotStatus,
    snapshot_status_key,
)
from csi_driver.node.snapshots import SnapshotInfo, SnapshotStore
from csi_driver.pki import Identity
from csi_driver.store.base import CatalogStore
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import read
from csi_driver.transfer.receiver import CHANNEL_OPTIONS, Receiver
from csi_driver.transfer.source import Export, Exports
from csi_driver.transport import AgentSecurity, open_channel

log = logging.getLogger(__name__)


class SnapshotExports(Exports):
    """The snapshots of one pool, exported on demand under their ids."""

    def __init__(self, snapshots: SnapshotStore) -> None:
        super().__init__()
        self._snapshots = snapshots
        # One manifest computed at a time: a receiver that timed out waiting for a
        # large snapshot's asks again, and must find that work, not start it twice.
        self._scanning = threading.Lock()

    def require(self, transfer_id: str) -> Export:
        try:
            export = super().require(transfer_id)
        except NotFound:
            if not SNAPSHOT_ID_PATTERN.match(transfer_id):
                raise
        else:
            if export.image.exists() or not SNAPSHOT_ID_PATTERN.match(transfer_id):
                return export
            self.remove(transfer_id)  # the snapshot was deleted since it was exported
        with self._scanning:
            try:
                return super().require(transfer_id)
            except NotFound:
                pass
            info = self._snapshots.get(transfer_id)
            if info is None:
                raise NotFound(f"this node holds no snapshot {transfer_id}")
            cached = info.path.with_suffix(".manifest")
            try:
                manifest = decode(cached.read_bytes())
            except FileNotFoundError:
                manifest = scan_image(info.path).manifest
                write_atomic(cached, encode(manifest))
            return self.add(transfer_id, info.path, manifest)


class SnapshotFetcher:
    """Pulls snapshots held by other nodes into this node's pool."""

    def __init__(
        self,
        store: CatalogStore,
        security: AgentSecurity,
        pool_root: Path,
        backups: SnapshotBackups | None = None,
        node_id: str = "",
    ) -> None:
        self._backups = backups
        self._node_id = node_id
        self._catalog = Catalog(store)
        self._security = security
        self._work = Path(pool_root) / "incoming"

    def _receiver(self, node_id: str, snapshot_id: str) -> Receiver:
        node = self._catalog.get_node(node_id)
        if node is None or not node.chunk_endpoint:
            raise FailedPrecondition(
                f"node {node_id} holding snapshot {snapshot_id} serves no "
                "chunks (start its node service with --chunk-endpoint), or is not registered"
            )
        endpoint, server = node.chunk_endpoint, Identity.node(node_id)
        return Receiver(lambda: open_channel(endpoint, self._security, server, CHANNEL_OPTIONS))

    def copy(
        self, spec: SnapshotSpec, taken_at: float, snapshots: SnapshotStore, replica: Path
    ) -> SnapshotInfo:
        """Keep in ``snapshots`` a verified copy of the snapshot ``spec`` names (taken on
        node ``spec.copy_from`` at ``taken_at``), pulled as a delta against the replica
        whose generations are under ``replica`` (whole when there is none)."""
        snapshot_id, home = spec.snapshot_id, spec.copy_from
        existing = snapshots.get(snapshot_id)
        if existing is not None:
            self.discard(snapshot_id)
            return existing
        receiver = self._receiver(home, snapshot_id)
        root = self._work / snapshot_id
        generations = GenerationStore(root)
        if generations.current() is None and not generations.staging_dir.exists():
            base = GenerationStore(replica).current() if replica.is_dir() else None
            if base is not None:
                generations.seed(base)
        result = receiver.pull(snapshot_id, generations)
        info = snapshots.install(
            snapshot_id,
            spec.source_volume_id,
            result.generation.image,
            taken_at,
            result.generation.manifest,
        )
        self.discard(snapshot_id)
        log.info(
            "snapshot copied from its node",
            extra={
                "snapshot": snapshot_id,
                "node": home,
                "bytes": result.progress.bytes_this_session,
            },
        )
        return info

    def discard(self, work_id: str) -> None:
        """Remove what a pull or restore for ``work_id`` (a snapshot copy's id, or the
        volume a clone or restore was for) left in ``incoming/``: its partial image and
        the restore's ``.part`` file (kept until then, so that a retry resumes it)."""
        if SNAPSHOT_ID_PATTERN.match(work_id) or VOLUME_ID_PATTERN.match(work_id):
            shutil.rmtree(self._work / work_id, ignore_errors=True)

    def fetch(self, source: ImageSource, volume_id: str, destination: Path) -> None:
        """``destination`` as a verified copy of snapshot ``source``, pulled from its node
        for volume ``volume_id`` (one pull per volume at a time: its reconcile key)."""
        if source.backup_id and (self._backups is not None or not source.node_id):
            self._restore(source, volume_id, destination)
            return
        root = self._work / volume_id
        done = GenerationStore(root).current()
        if done is not None and not done.image.exists():
            # Handed over to an image by an attempt that crashed before cleaning up:
            # that image was never committed to the pool, so pull again.
            shutil.rmtree(root)
        generations = GenerationStore(root)
        failures = []
        for node_id in self._holders(source):
            try:
                receiver = self._receiver(node_id, source.snapshot_id)
                result = receiver.pull(source.snapshot_id, generations)
            except (Unavailable, FailedPrecondition, NotFound) as exc:
                # Every copy is the same point in time with the same manifest: the
                # next holder resumes what this one's pull landed.
                failures.append(exc.message)
                continue
            os.replace(result.generation.image, destination)
            shutil.rmtree(generations.root, ignore_errors=True)
            log.info(
                "snapshot pulled from another node",
                extra={
                    "snapshot": source.snapshot_id,
                    "node": node_id,
                    "bytes": result.progress.bytes_this_session,
                },
            )
            return
        raise Unavailable(
            f"no node holding snapshot {source.snapshot_id} could serve it "
            f"({'; '.join(failures)}); retrying"
        )

    def _holders(self, source: ImageSource) -> list[str]:
        """The node the source names, then every other node reporting a READY copy."""
        holders = [source.node_id]
        for node in self._catalog.list_nodes():
            status = read(
                self._catalog.store,
                SnapshotStatus,
                snapshot_status_key(node.node_id, source.snapshot_id),
            )
            held = status is not None and status.value.phase is ImagePhase.READY
            if held and node.node_id not in holders and node.node_id != self._node_id:
                holders.append(node.node_id)
        return holders

    def _restore(self, source: ImageSource, volume_id: str, destination: Path) -> None:
        """Restored under ``incoming/<volume>/`` (where an interrupted restore's ``.part``
        waits for the retry, and goes with the rest if the volume is abandoned), then
        moved to ``destination``."""
        if self._backups is None:
            raise FailedPrecondition(
                NOT_CONFIGURED.format(
                    node_id=self._node_id, what=f"restore backup {source.backup_id}"
                )
            )
        work = self._work / volume_id
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        restored = work / "restored.img"
        if not restored.exists():  # else whole: restore_image renames its .part there last
            self._backups.restore(source.backup_id, restored)
        os.replace(restored, destination)
        self.discard(volume_id)
        log.info(
            "snapshot restored from its backup",
            extra={"snapshot": source.snapshot_id, "backup": source.backup_id},
        )
