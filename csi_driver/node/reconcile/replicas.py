"""The node's replica reconciler: keep each REPLICA image in step with its primary.

For every ``spec/images/<node>/<volume>`` whose role is REPLICA, this
reconciler (in the node agent) pulls the export its ``source_node``
serves (``status/exports/<source>/<volume>``) into the replica's
generation store under ``<pool>/replicas/<volume>/``, and reports in
``status/images/<node>/<volume>`` the transfer it synced, its manifest
digest, when, and how many bytes it received. While a pull runs,
``status/transfers/<node>/<volume>`` shows its progress (bytes done,
rate, ETA). Invariants:

- A replica pulls only an export of its own epoch: a stale primary (an
  older epoch) is never a source.
- A generation is committed only when the whole staged image verifies
  against the export's manifest (:meth:`Staging.commit`); the previous
  generation stays readable until then, and a crash or a dropped link
  resumes without fetching again what landed.
- A primary demoted to a replica keeps its image as the replica's first
  generation (moved, never copied, and only while nothing uses it), so the
  first sync from the new primary sends only what differs.
- A retired replica (``deleted``) is removed with its generations; a
  demoted primary's pool image still here is first kept aside when the
  spec says ``keep_divergent`` (a failover), and nothing is removed while
  the volume is in use here (reported ``in-use``, retried).
- A pull that finds no room on the pool reports ``no-space``, so the
  leader re-places the replica on a node that has room.
- The image reconciler owns PRIMARY specs and this one REPLICA specs; each
  writes a status only while the spec it answers is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from csi_driver.chunks.generations import Generation, GenerationStore
from csi_driver.core.errors import FailedPrecondition, FerryError, ResourceExhausted
from csi_driver.core.records import (
    EXPORT_STATUSES,
    ExportPhase,
    ExportStatus,
    FailureReason,
    ImagePhase,
    ImageRole,
    ImageSpec,
    ImageStatus,
    TransferPhase,
    TransferStatus,
    decode,
    export_status_key,
    image_spec_key,
    image_specs_on,
    image_status_key,
    volume_of_key,
)
from csi_driver.faults import crash_point
from csi_driver.metrics import DataFlow, count_moved, observe_sync, transfer_in_flight
from csi_driver.node.agent import NodeAgent
from csi_driver.node.reconcile.exports import (
    capture_lineage,
    forget_captures,
    manifest_digest,
)
from csi_driver.pki import Identity
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.report import report
from csi_driver.reconcile.runner import KeyMap, Runner, Source, strip_prefix
from csi_driver.store.base import CatalogStore
from csi_driver.store.records import Versioned, put, read
from csi_driver.transfer.progress import Progress
from csi_driver.transfer.receiver import CHANNEL_OPTIONS, Receiver
from csi_driver.transport import AgentSecurity, open_channel

log = logging.getLogger(__name__)

#: How often a running pull's TransferStatus is rewritten.
PROGRESS_EVERY_S = 1.0
#: Poll while a demoted primary's image is still in use here.
IN_USE_POLL_S = 1.0


class ReplicaReconciler:
    """Reconciles one volume's replica on this node (the work key is the volume id)."""

    def __init__(
        self,
        store: CatalogStore,
        agent: NodeAgent,
        security: AgentSecurity,
        receiver: Callable[..., Receiver] = Receiver,
    ) -> None:
        self._store = store
        self._agent = agent
        self._security = security
        self._receiver = receiver
        self.node_id = agent.node_id

    def store_of(self, volume_id: str) -> GenerationStore:
        return GenerationStore(self._agent.pool.replicas_dir / volume_id)

    def __call__(self, volume_id: str) -> float | None:
        spec_read = read(self._store, ImageSpec, image_spec_key(self.node_id, volume_id))
        if spec_read is None or spec_read.value.role is not ImageRole.REPLICA:
            return None
        spec = spec_read.value
        current = read(self._store, ImageStatus, image_status_key(self.node_id, volume_id))
        if spec.deleted:
            try:
                self._discard_demoted(volume_id, keep_aside=spec.keep_divergent)
            except FailedPrecondition as exc:
                return self._in_use(spec_read, current, exc)
            shutil.rmtree(self._agent.pool.replicas_dir / volume_id, ignore_errors=True)
            forget_captures(self._agent.pool, volume_id)  # a demoted primary's, if any
            gone = ImageStatus(volume_id, self.node_id, ImagePhase.DELETED, spec.generation)
            self._report(spec_read, current, gone)
            return None
        try:
            generation = self._adopt_demoted(volume_id, keep_aside=spec.keep_divergent)
        except FailedPrecondition as exc:
            return self._in_use(spec_read, current, exc)
        export = read(self._store, ExportStatus, export_status_key(spec.source_node, volume_id))
        if not _usable(export, spec):
            phase = ImagePhase.READY if generation is not None else ImagePhase.PENDING
            self._report(spec_read, current, self._status(spec, phase, current))
            return None
        assert export is not None
        if (
            current is not None
            and current.value.synced_transfer == export.value.transfer_id
            and current.value.manifest_digest == export.value.manifest_digest
        ):
            # Synced already: answer this generation of the spec, if not yet.
            self._report(spec_read, current, self._status(spec, ImagePhase.READY, current))
            return None
        try:
            status = self._pull(spec, export.value)
        except FerryError as exc:
            failed = self._status(spec, ImagePhase.FAILED, current)
            reason = (
                FailureReason.NO_SPACE
                if isinstance(exc, ResourceExhausted)
                else FailureReason.HOST_ERROR
            )
            self._report(spec_read, current, replace(failed, reason=reason, message=exc.message))
            raise
        crash_point("node:replica:committed")
        self._report(spec_read, current, status)
        # Reported first: freeing the older generation's extents takes a while.
        self.store_of(volume_id).retire_older()
        return None

    def _in_use(
        self,
        spec_read: Versioned[ImageSpec],
        current: Versioned[ImageStatus] | None,
        exc: FailedPrecondition,
    ) -> float:
        """Report that the volume is in use here (a demoted primary not yet unstaged)."""
        failed = self._status(spec_read.value, ImagePhase.FAILED, current)
        self._report(
            spec_read, current, replace(failed, reason=FailureReason.IN_USE, message=exc.message)
        )
        return IN_USE_POLL_S

    def _discard_demoted(self, volume_id: str, *, keep_aside: bool) -> None:
        """A retired replica's demoted pool image, if still here: a failed-over one is
        kept aside (it may hold writes nobody else has), any other deleted once unused."""
        if keep_aside:
            self._adopt_demoted(volume_id, keep_aside=True)
            return
        pool = self._agent.pool
        if pool.get(volume_id) is None:
            return
        with self._agent.unused(volume_id):
            pool.delete_image(volume_id)
        log.info("retired replica's demoted image deleted", extra={"volume": volume_id})

    def _adopt_demoted(self, volume_id: str, *, keep_aside: bool) -> Generation | None:
        """The replica's current generation; a pool image here (a demoted primary's)
        becomes it first, or, demoted by a failover (``keep_aside``), is kept as a
        snapshot image: it may hold writes the new primary never got."""
        generations = self.store_of(volume_id)
        pool = self._agent.pool
        image = pool.get(volume_id)
        if image is None:
            return generations.current()
        if keep_aside:
            with self._agent.unused(volume_id):
                kept = pool.preserved_dir / f"{volume_id}-{int(time.time())}.img"
                pool.release_image(volume_id, kept)
                forget_captures(pool, volume_id)
            log.warning(
                "a failed-over primary's own data kept as a snapshot image",
                extra={"volume": volume_id, "path": str(kept)},
            )
            return generations.current()
        with self._agent.unused(volume_id):
            pool.require(volume_id)
            # The pool image was the primary: newer than any older replica data here.
            shutil.rmtree(generations.root, ignore_errors=True)
            generations = self.store_of(volume_id)
            parked = generations.root / ".demoted.img"
            pool.release_image(volume_id, parked)
            # Unused and out of the pool: nothing writes it any more. Its last
            # capture (a move's final one) describes it but for what changed since.
            adopted = generations.adopt(parked, capture_lineage(pool, volume_id))
            forget_captures(pool, volume_id)
        log.info("demoted primary's image kept as the replica's base", extra={"volume": volume_id})
        return adopted

    def _pull(self, spec: ImageSpec, export: ExportStatus) -> ImageStatus:
        started = time.time()
        transfer = TransferStatus(
            volume_id=spec.volume_id,
            node_id=self.node_id,
            transfer_id=export.transfer_id,
            source_node=export.node_id,
            phase=TransferPhase.RUNNING,
            bytes_total=export.data_bytes,
            started_at=started,
            updated_at=started,
        )
        self._store.put(transfer.key, _encode(transfer))
        last = [0.0]
        lock = threading.Lock()

        def landed(index: int, progress: Progress) -> None:
            now = time.monotonic()
            with lock:
                if now - last[0] < PROGRESS_EVERY_S:
                    return
                last[0] = now
            update = _progressed(transfer, progress)
            with contextlib.suppress(FerryError):  # progress is informative: pull on
                self._store.put(update.key, _encode(update))
            crash_point("node:replica:landed")

        source = Identity.node(export.node_id)
        receiver = self._receiver(
            lambda: open_channel(export.endpoint, self._security, source, CHANNEL_OPTIONS),
            on_landed=landed,
        )
        generations = self.store_of(spec.volume_id)
        if export.final:
            flow = DataFlow.MOVE
        elif generations.current() is None:
            flow = DataFlow.RESYNC
        else:
            flow = DataFlow.REPLICATION
        try:
            with transfer_in_flight(flow):
                result = receiver.pull(export.transfer_id, generations)
        except FerryError as exc:
            failed = replace(transfer, phase=TransferPhase.FAILED, message=exc.message)
            self._store.put(failed.key, _encode(failed))
            raise
        digest = manifest_digest(result.generation.manifest)
        if digest != export.manifest_digest:
            # The sender's manifest moved under us (a new round): the next pass pulls it.
            raise FailedPrecondition(
                f"replica of {spec.volume_id} synced manifest {digest[:12]}, not the export's "
                f"{export.manifest_digest[:12]}; syncing again"
            )
        done = _progressed(transfer, result.progress)
        done = replace(done, phase=TransferPhase.DONE, eta_s=0.0)
        self._store.put(done.key, _encode(done))
        observe_sync(spec.volume_id, result.progress.bytes_this_session)
        count_moved(flow, result.progress.bytes_this_session)
        log.info(
            "replica synced",
            extra={
                "volume": spec.volume_id,
                "transfer": export.transfer_id,
                "generation": result.generation.number,
                "bytes": result.progress.bytes_this_session,
            },
        )
        return ImageStatus(
            spec.volume_id,
            self.node_id,
            ImagePhase.READY,
            spec.generation,
            size_bytes=result.generation.manifest.size,
            synced_transfer=export.transfer_id,
            manifest_digest=digest,
            synced_at=time.time(),
            synced_bytes=result.progress.bytes_this_session,
            synced_captured_at=export.captured_at,
        )

    def _status(
        self, spec: ImageSpec, phase: ImagePhase, current: Versioned[ImageStatus] | None
    ) -> ImageStatus:
        """A status for ``spec`` that keeps what was last synced."""
        before = current.value if current is not None else None
        generation = self.store_of(spec.volume_id).current()
        return ImageStatus(
            spec.volume_id,
            self.node_id,
            phase,
            spec.generation,
            size_bytes=generation.manifest.size if generation else 0,
            synced_transfer=before.synced_transfer if before else "",
            manifest_digest=manifest_digest(generation.manifest) if generation else "",
            synced_at=before.synced_at if before else 0.0,
            synced_bytes=before.synced_bytes if before else 0,
            synced_captured_at=before.synced_captured_at if before else 0.0,
        )

    def _report(
        self,
        spec_read: Versioned[ImageSpec],
        current: Versioned[ImageStatus] | None,
        status: ImageStatus,
    ) -> None:
        report(self._store, spec_read, current, status)


def _usable(export: Versioned[ExportStatus] | None, spec: ImageSpec) -> bool:
    return (
        export is not None
        and export.value.phase is ExportPhase.READY
        and export.value.epoch == spec.epoch
        and bool(export.value.endpoint)
    )


def _progressed(transfer: TransferStatus, progress: Progress) -> TransferStatus:
    eta = progress.eta_s
    return replace(
        transfer,
        bytes_total=progress.bytes_total,
        bytes_done=progress.bytes_done,
        rate_bytes_per_s=round(progress.rate_bytes_per_s, 1),
        eta_s=round(eta, 1) if eta is not None else -1.0,
        updated_at=time.time(),
    )


def _encode(record: TransferStatus) -> bytes:
    return put(record).value


def replica_work(specs: Informer, node_id: str, to_volume: KeyMap = volume_of_key) -> KeyMap:
    """The volume a key concerns, when this node's cached spec of it is a replica.

    The reconciler does nothing for any other volume, so their changes, and
    the resync over every spec of the node (10,000 of them on a full node),
    cost no catalog read. A spec that becomes a replica later is queued by its
    own change; a spec that does not decode is queued, for the reconciler to
    meet the error.
    """

    def to_work(key: str) -> str | None:
        volume_id = to_volume(key)
        if volume_id is None:
            return None
        cached = specs.get(image_spec_key(node_id, volume_id))
        if cached is None:
            return None
        try:
            role = decode(ImageSpec, cached.value).role
        except FerryError:
            return volume_id
        return volume_id if role is ImageRole.REPLICA else None

    return to_work


def replica_runner(
    store: CatalogStore,
    agent: NodeAgent,
    security: AgentSecurity,
    *,
    resync_s: float = 60.0,
    workers: int = 2,
) -> Runner:
    """A runner over this node's image specs and every node's export statuses."""
    specs = image_specs_on(agent.node_id)
    cache = Informer(store, specs)
    return Runner(
        f"replicas:{agent.node_id}",
        ReplicaReconciler(store, agent, security),
        [
            Source(cache, replica_work(cache, agent.node_id, strip_prefix(specs))),
            Source(Informer(store, EXPORT_STATUSES), replica_work(cache, agent.node_id)),
        ],
        workers=workers,
        resync_s=resync_s,
    )
