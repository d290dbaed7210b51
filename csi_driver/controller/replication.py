"""The leader's replication reconciler: every volume has the replicas it asks for.

For each READY volume whose parameters ask for ``replicas: N``, this
reconciler (run by the leading controller only) assigns replicas on N other
nodes (anti-affinity: never two copies on one node) by writing REPLICA
ImageSpecs with their nodes' accounting in one txn, and keeps an ExportSpec
on the primary at the volume's epoch so the replicas have something to pull.
It never calls a node: nodes reconcile the records (node/reconcile/replicas.py,
node/reconcile/exports.py). Invariants:

- Each write compares what it read plus the leader's fence: a concurrent
  RPC, move or newer leader wins, and a deposed leader writes nothing.
- A volume being moved is left to the move reconciler; a deleted volume's
  exports, transfers, move and failover records are removed.
- Background replication (``rpoSeconds``): once every replica holds the
  latest capture and it is ``rpoSeconds`` old, the export's round is bumped
  (a new crash-consistent capture, shipped as a delta). A replica that failed
  on an export gets a fresh round once it is older than :data:`RETRY_AFTER_S`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from csi_driver.controller.images import ImageIntents
from csi_driver.core.errors import Conflict, ResourceExhausted
from csi_driver.core.model import Volume, VolumeState
from csi_driver.core.params import Provisioning, StorageParameters, parse_parameters
from csi_driver.core.placement import NodeView, choose_replicas
from csi_driver.core.records import (
    EXPORT_STATUSES,
    IMAGE_STATUSES,
    ExportSpec,
    ExportStatus,
    ImagePhase,
    ImageRole,
    ImageSpec,
    ImageStatus,
    MoveSpec,
    MoveStatus,
    NodeAccounting,
    TransferPhase,
    TransferStatus,
    answers,
    export_spec_key,
    export_status_key,
    failover_status_key,
    image_spec_key,
    image_status_key,
    move_spec_key,
    move_status_key,
    revise,
    transfer_status_key,
    volume_of_key,
)
from csi_driver.kube.events import LoggingSink, MobilityEvents, VolumeRef
from csi_driver.metrics import forget_volume, observe_replicas, observe_replication
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.runner import Runner, Source, strip_prefix
from csi_driver.store.base import Compare, Delete
from csi_driver.store.catalog import VOLUMES, Catalog
from csi_driver.store.records import Versioned, put, read, unchanged_since

log = logging.getLogger(__name__)

#: Replicated volumes are looked at again this often (failed syncs retried).
POLL_S = 5.0
#: A replica that failed on an export gets a new capture after this long.
RETRY_AFTER_S = 10.0


def images_of(catalog: Catalog, volume_id: str) -> dict[str, Versioned[ImageSpec]]:
    """Every node's image spec of ``volume_id``, by node: one read per registered node."""
    found = {}
    for node in catalog.list_nodes():
        image = read(catalog.store, ImageSpec, image_spec_key(node.node_id, volume_id))
        if image is not None:
            found[node.node_id] = image
    return found


def node_views(
    catalog: Catalog, accounts: Mapping[str, Versioned[NodeAccounting]]
) -> list[NodeView]:
    views = []
    for node in catalog.list_nodes():
        account = accounts.get(node.node_id)
        charged = account.value if account else NodeAccounting(node.node_id)
        views.append(NodeView(node, charged.provisioned_bytes, charged.volume_count))
    return views


def assign_replicas(
    intents: ImageIntents,
    volume: Volume,
    views: Sequence[NodeView],
    accounts: Mapping[str, Versioned[NodeAccounting]],
    holders: set[str],
    count: int,
) -> tuple[str, ...]:
    """One txn: ``count`` REPLICA image specs on nodes placement picks (none among
    ``holders``), each with its node's charge. Conflict when an accounting moved."""
    chosen = choose_replicas(views, volume.capacity_bytes, sorted(holders), count)
    if not chosen:
        raise ResourceExhausted(
            f"no node without a copy of volume {volume.volume_id} has "
            f"{volume.capacity_bytes} bytes free for a replica; add nodes or free space"
        )
    compares: list[Compare] = []
    ops = []
    thin = parse_parameters(dict(volume.parameters)).provisioning is Provisioning.THIN
    for node_id in chosen:
        spec = ImageSpec(
            volume.volume_id,
            node_id,
            volume.capacity_bytes,
            volume.epoch,
            role=ImageRole.REPLICA,
            thin=thin,
            source_node=volume.primary_node,
        )
        account = accounts.get(node_id)
        charged = (account.value if account else NodeAccounting(node_id)).charge(
            volume.capacity_bytes
        )
        compares += [Compare(spec.key, 0), unchanged_since(charged.key, account)]
        ops += [put(spec), put(charged)]
    intents.txn(compares, ops)
    log.info(
        "replicas assigned",
        extra={"volume": volume.volume_id, "nodes": chosen, "primary": volume.primary_node},
    )
    return chosen


def ready_volume(
    catalog: Catalog, volume_id: str
) -> tuple[Versioned[Volume], StorageParameters] | None:
    """The volume and its parameters when it is READY (nothing to do otherwise)."""
    volume_read = catalog.read_volume(volume_id)
    if volume_read is None or volume_read.value.state is not VolumeState.READY:
        return None
    return volume_read, parse_parameters(dict(volume_read.value.parameters))


def moving(catalog: Catalog, volume_id: str) -> MoveSpec | None:
    """The volume's move in flight, if any."""
    spec = read(catalog.store, MoveSpec, move_spec_key(volume_id))
    if spec is None:
        return None
    status = read(catalog.store, MoveStatus, move_status_key(volume_id))
    if status is not None and answers(status.value, spec.value) and status.value.step.finished:
        return None
    return spec.value


class ReplicationReconciler:
    """Replica assignment and exports for one volume (the work key is its id)."""

    def __init__(
        self,
        catalog: Catalog,
        intents: ImageIntents,
        clock: Callable[[], float] = time.time,
        events: MobilityEvents | None = None,
    ) -> None:
        self._catalog = catalog
        self._intents = intents
        self._clock = clock
        self._events = events or MobilityEvents(LoggingSink())

    def __call__(self, volume_id: str) -> float | None:
        found = ready_volume(self._catalog, volume_id)
        if found is None:
            if self._catalog.read_volume(volume_id) is None:
                self._forget(volume_id)
                forget_volume(volume_id)
                self._events.forget(volume_id)
            return None
        volume, params = found[0].value, found[1]
        wanted = params.replicas
        if moving(self._catalog, volume_id) is not None:
            return POLL_S
        images = images_of(self._catalog, volume_id)
        replicas = {
            node: image
            for node, image in images.items()
            if image.value.role is ImageRole.REPLICA and not image.value.deleted
        }
        self._report(volume, replicas, wanted, params.rpo_seconds)
        if len(replicas) < wanted:
            self._assign(volume, set(images), wanted - len(replicas))
            return 0.0  # look again at once: the export comes next
        if not replicas:
            return None
        return self._export(volume, replicas, params.rpo_seconds)

    def _report(
        self,
        volume: Volume,
        replicas: Mapping[str, Versioned[ImageSpec]],
        wanted: int,
        rpo_s: int,
    ) -> None:
        """Lag per replica and replicas in sync, as metrics and (on a change) Events."""
        ref = VolumeRef(volume.volume_id, volume.name)
        now, in_sync = self._clock(), 0
        for node_id in replicas:
            status = read(
                self._catalog.store, ImageStatus, image_status_key(node_id, volume.volume_id)
            )
            captured = status.value.synced_captured_at if status else 0.0
            if not captured:
                continue
            in_sync += 1
            running = read(
                self._catalog.store, TransferStatus, transfer_status_key(node_id, volume.volume_id)
            )
            behind = 0
            if running is not None and running.value.phase is TransferPhase.RUNNING:
                behind = max(0, running.value.bytes_total - running.value.bytes_done)
            observe_replication(volume.volume_id, node_id, now - captured, behind)
            self._events.replication_lag(ref, node_id, now - captured, behind, rpo_s)
        observe_replicas(volume.volume_id, in_sync, wanted, rpo_s)
        if wanted:
            why = "replicas are being placed or have not synced yet"
            self._events.replica_count(ref, in_sync, wanted, why)

    def _forget(self, volume_id: str) -> None:
        """A deleted volume's mobility records go too (its images go by the collector)."""
        keys = [move_spec_key(volume_id), move_status_key(volume_id)]
        keys.append(failover_status_key(volume_id))
        for node in self._catalog.list_nodes():
            keys += [
                export_spec_key(node.node_id, volume_id),
                export_status_key(node.node_id, volume_id),
                transfer_status_key(node.node_id, volume_id),
            ]
        present = [key for key in keys if self._catalog.store.get(key) is not None]
        if present:
            self._intents.txn([], [Delete(key) for key in present])
            log.info("records of a deleted volume removed", extra={"volume": volume_id})

    def _assign(self, volume: Volume, holders: set[str], count: int) -> None:
        accounts = self._catalog.accounts()
        views = node_views(self._catalog, accounts)
        try:
            assign_replicas(self._intents, volume, views, accounts, holders, count)
        except Conflict:
            return  # an accounting moved: the next pass places again

    def _export(
        self, volume: Volume, replicas: Mapping[str, Versioned[ImageSpec]], rpo_s: int
    ) -> float:
        """Keep the primary's export current; return when to look again."""
        key = export_spec_key(volume.primary_node, volume.volume_id)
        export = read(self._catalog.store, ExportSpec, key)
        if export is None:
            spec = ExportSpec(volume.volume_id, volume.primary_node, volume.epoch)
            self._try([Compare(key, 0)], spec)
            return POLL_S
        if export.value.epoch != volume.epoch or export.value.final:
            # A new epoch, or a move's final round left by a move that ended: a
            # fresh capture of the volume as it is now.
            changed = revise(
                export.value, epoch=volume.epoch, round=export.value.round + 1, final=False
            )
            self._try([unchanged_since(key, export)], changed)
            return POLL_S
        served = read(
            self._catalog.store,
            ExportStatus,
            export_status_key(volume.primary_node, volume.volume_id),
        )
        if served is None or not answers(served.value, export.value):
            return POLL_S
        age = self._clock() - served.value.captured_at
        statuses = [
            read(self._catalog.store, ImageStatus, image_status_key(node_id, volume.volume_id))
            for node_id in replicas
        ]
        synced = all(
            s is not None and s.value.synced_transfer == served.value.transfer_id for s in statuses
        )
        failed = any(
            s is not None
            and answers(s.value, replicas[s.value.node_id].value)
            and s.value.phase is ImagePhase.FAILED
            for s in statuses
        )
        # The schedule: a new capture once the last one reached every replica and
        # is rpoSeconds old; a retry once a replica failed on it and it is stale.
        due = bool(rpo_s) and synced and age >= rpo_s
        if due or (failed and age >= RETRY_AFTER_S):
            self._try(
                [unchanged_since(key, export)], revise(export.value, round=export.value.round + 1)
            )
            return POLL_S
        if rpo_s and synced:
            return max(0.1, rpo_s - age)
        return POLL_S

    def _try(self, compares: list[Compare], spec: ExportSpec) -> None:
        try:
            self._intents.txn(compares, [put(spec)])
        except Conflict:
            return  # changed meanwhile: the next pass looks again


def replication_runner(
    catalog: Catalog, intents: ImageIntents, events: MobilityEvents | None = None
) -> Runner:
    return Runner(
        "replication",
        ReplicationReconciler(catalog, intents, events=events),
        [
            Source(Informer(catalog.store, VOLUMES), strip_prefix(VOLUMES)),
            Source(Informer(catalog.store, IMAGE_STATUSES), volume_of_key),
            Source(Informer(catalog.store, EXPORT_STATUSES), volume_of_key),
        ],
        workers=1,
        resync_s=30.0,
    )
