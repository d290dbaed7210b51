"""The leader's replication reconciler: every volume has the replicas it asks for.

For each READY volume whose parameters ask for ``replicas: N``, this
reconciler (run by the leading controller only) brings its replicas to what
:func:`~csi_driver.core.placement.plan_replicas` decides over the nodes'
readiness (controller/readiness.py): it adds REPLICA ImageSpecs with their
nodes' accounting in one txn, retires the ones beyond N or on nodes that
leave (lost past ``--node-lost-after``, drained, out-of-service, deleted
from the catalog) or filled up, and keeps an ExportSpec on the primary at
the volume's epoch so the replicas have something to pull. It never calls a
node: nodes reconcile the records (node/reconcile/replicas.py,
node/reconcile/exports.py). Invariants:

- Each write compares what it read plus the leader's fence: a concurrent
  RPC, move or newer leader wins, and a deposed leader writes nothing.
- A volume being moved is left to the move reconciler; a deleted volume's
  exports, transfers, move, failover and fence records are removed.
- Retiring is two steps: the spec is marked ``deleted`` (the node removes
  the copy; a failed-over primary's own data is kept aside first), then,
  once the node reports DELETED, one txn removes the spec, its status and
  transfer and releases the node's charge. A retirement waits until every
  replica kept has synced once, so adding a replacement never starts by
  dropping the copy it replaces; the volume never loses its primary's copy.
- A replica pinned for a move (``pinned_for``: ``ferry drain``) is never
  retired while the volume's primary is still on that node; the pin is
  released once it is not, and the replica then counts like any other.
  After a move the old primary's copy is a replica like the others: kept
  while the count wants it, retired beyond it.
- Background replication (``rpoSeconds``): once every replica holds the
  latest capture and it is ``rpoSeconds`` old, the export's round is bumped
  (a new crash-consistent capture, shipped as a delta). A replica that failed
  on an export gets a fresh round once it is older than :data:`RETRY_AFTER_S`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from csi_driver.controller.images import ImageIntents
from csi_driver.controller.readiness import NodeReadings, readiness_runner
from csi_driver.core.errors import Conflict, ResourceExhausted
from csi_driver.core.model import Volume, VolumeState
from csi_driver.core.params import Provisioning, StorageParameters, parse_parameters
from csi_driver.core.placement import (
    NodeReadiness,
    NodeView,
    ReplicaPlan,
    accessible_segment,
    choose_replicas,
    plan_replicas,
)
from csi_driver.core.records import (
    EXPORT_STATUSES,
    IMAGE_SPECS,
    IMAGE_STATUSES,
    ExportSpec,
    ExportStatus,
    FailureReason,
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
    decode,
    export_spec_key,
    export_status_key,
    failover_status_key,
    fence_status_key,
    image_spec_key,
    image_specs_on,
    image_status_key,
    move_spec_key,
    move_status_key,
    node_accounting_key,
    revise,
    transfer_status_key,
    volume_of_key,
)
from csi_driver.kube.events import LoggingSink, MobilityEvents, VolumeRef
from csi_driver.metrics import (
    ReplicaChange,
    count_replica_changes,
    forget_replica,
    forget_volume,
    observe_replicas,
    observe_replication,
)
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.queue import WorkQueue
from csi_driver.reconcile.runner import Runner, Source, strip_prefix
from csi_driver.store.base import Compare, Delete, Put
from csi_driver.store.catalog import VOLUMES, Catalog, volume_from_json
from csi_driver.store.records import Versioned, put, read, unchanged_since

log = logging.getLogger(__name__)

#: Replicated volumes are looked at again this often (failed syncs retried).
POLL_S = 5.0
#: A replica that failed on an export gets a new capture after this long.
RETRY_AFTER_S = 10.0
#: How long a pass waits when the volumes cache does not hold the volume yet (see
#: ReplicationReconciler._cache_lags).
CACHE_LAG_S = 0.05


def images_of(catalog: Catalog, volume_id: str) -> dict[str, Versioned[ImageSpec]]:
    """Every node's image spec of ``volume_id``, by node: one read per node registered or
    charged (a node whose record was deleted keeps its accounting, and its copies are
    found to be retired)."""
    found = {}
    for node_id in catalog.node_ids():
        image = read(catalog.store, ImageSpec, image_spec_key(node_id, volume_id))
        if image is not None:
            found[node_id] = image
    return found


def assign_replicas(
    intents: ImageIntents,
    volume: Volume,
    views: Sequence[NodeView],
    accounts: Mapping[str, Versioned[NodeAccounting]],
    holders: set[str],
    count: int,
    *,
    pinned_for: str = "",
) -> tuple[str, ...]:
    """One txn: ``count`` REPLICA image specs on nodes placement picks (none among
    ``holders``), each with its node's charge. Conflict when an accounting moved."""
    chosen = choose_replicas(views, volume.capacity_bytes, sorted(holders), count)
    if not chosen:
        raise ResourceExhausted(
            f"no node without a copy of volume {volume.volume_id} has "
            f"{volume.capacity_bytes} bytes free for a replica; add nodes or free space"
        )
    return add_replicas(intents, volume, accounts, chosen, pinned_for=pinned_for)


def add_replicas(
    intents: ImageIntents,
    volume: Volume,
    accounts: Mapping[str, Versioned[NodeAccounting]],
    chosen: Sequence[str],
    *,
    pinned_for: str = "",
) -> tuple[str, ...]:
    """One txn: a REPLICA image spec on each of ``chosen``, each with its node's charge."""
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
            pinned_for=pinned_for,
        )
        account = accounts.get(node_id)
        charged = (account.value if account else NodeAccounting(node_id)).charge(
            volume.capacity_bytes
        )
        compares += [Compare(spec.key, 0), unchanged_since(charged.key, account)]
        ops += [put(spec), put(charged)]
    intents.txn(compares, ops)
    count_replica_changes(ReplicaChange.ADDED, len(chosen))
    log.info(
        "replicas assigned",
        extra={"volume": volume.volume_id, "nodes": chosen, "primary": volume.primary_node},
    )
    return tuple(chosen)


def remove_retired(
    intents: ImageIntents,
    catalog: Catalog,
    image: Versioned[ImageSpec],
) -> bool:
    """One txn, once the node reported the retired copy DELETED (or the node is no
    longer registered: nobody will ever report): its spec, status and transfer gone
    and its node's charge released. False while the node has not."""
    spec = image.value
    status = read(catalog.store, ImageStatus, spec.status_key)
    reported = (
        status is not None
        and answers(status.value, spec)
        and status.value.phase is ImagePhase.DELETED
    )
    if not reported and catalog.get_node(spec.node_id) is not None:
        return False
    key = node_accounting_key(spec.node_id)
    account = catalog.accounts().get(spec.node_id)
    ops: list[Put | Delete] = [
        Delete(spec.key),
        Delete(spec.status_key),
        Delete(transfer_status_key(spec.node_id, spec.volume_id)),
    ]
    if account is not None:
        ops.append(put(account.value.charge(-spec.size_bytes, -1)))
    intents.txn([unchanged_since(spec.key, image), unchanged_since(key, account)], ops)
    forget_replica(spec.volume_id, spec.node_id)
    log.info("retired replica removed", extra={"volume": spec.volume_id, "node": spec.node_id})
    return True


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


@dataclass(frozen=True)
class Caches:
    """The replication runner's informers, read to find the volumes with nothing to do.

    Each is one of the runner's sources: a cache behind the store has an event
    on its way, which queues another pass once the cache holds it.
    """

    volumes: Informer
    statuses: Informer
    #: every node's image specs, indexed by volume id
    specs: Informer


class ReplicationReconciler:
    """Replica assignment, retirement and exports for one volume (the work key is its id)."""

    def __init__(
        self,
        catalog: Catalog,
        intents: ImageIntents,
        clock: Callable[[], float] = time.time,
        events: MobilityEvents | None = None,
        readings: NodeReadings | None = None,
        caches: Caches | None = None,
    ) -> None:
        """``caches``: the runner's informers; without them every pass reads the store."""
        self._caches = caches
        self._catalog = catalog
        self._intents = intents
        self._clock = clock
        self._events = events or MobilityEvents(LoggingSink())
        self._readings = readings or NodeReadings(catalog, clock=clock)
        # Volumes whose last plan found no node for some wanted replica: a node
        # becoming ready wakes them (replication_runners), without a scan.
        self._degraded: set[str] = set()
        self._degraded_lock = threading.Lock()
        # volume -> (in sync, wanted, rpo) as last given to the gauges: most passes
        # change none of them, and a gauge's ``labels()`` costs more than the check
        self._observed: dict[str, tuple[int, int, int]] = {}
        # volume -> the revisions of its cached volume and image specs when they
        # last showed a READY volume with nothing to do (see _idle)
        self._idle_at: dict[str, tuple[int, ...]] = {}
        # volumes a pass found missing from the volumes cache and put off once
        self._put_off: set[str] = set()

    def degraded(self) -> list[str]:
        """The volumes whose last plan left wanted replicas without a node."""
        with self._degraded_lock:
            return sorted(self._degraded)

    def _mark_degraded(self, volume_id: str, missing: int) -> None:
        with self._degraded_lock:
            if missing > 0:
                self._degraded.add(volume_id)
            else:
                self._degraded.discard(volume_id)

    def __call__(self, volume_id: str) -> float | None:
        if self._cache_lags(volume_id):
            return CACHE_LAG_S
        if self._idle(volume_id):
            self._mark_degraded(volume_id, 0)  # not READY, or asking for no replica
            return None
        volume_read = self._catalog.read_volume(volume_id)
        if volume_read is None:
            self._mark_degraded(volume_id, 0)
            self._forget(volume_id)
            forget_volume(volume_id)
            self._observed.pop(volume_id, None)
            self._events.forget(volume_id)
            return None
        if volume_read.value.state is not VolumeState.READY:
            self._mark_degraded(volume_id, 0)
            return None
        volume = volume_read.value
        params = parse_parameters(dict(volume.parameters))
        wanted = params.replicas
        if moving(self._catalog, volume_id) is not None:
            return POLL_S
        images = images_of(self._catalog, volume_id)
        replicas = {
            node: image
            for node, image in images.items()
            if image.value.role is ImageRole.REPLICA and not image.value.deleted
        }
        retiring = [
            image
            for image in images.values()
            if image.value.role is ImageRole.REPLICA and image.value.deleted
        ]
        if not replicas and not retiring and not wanted:
            self._mark_degraded(volume_id, 0)
            self._report(volume, replicas, wanted, params.rpo_seconds)
            return None  # nothing to place, retire or export: no node or accounting read
        for image in retiring:
            self._try_remove(image)
        replicas = self._unpin(volume, replicas)
        self._report(volume, replicas, wanted, params.rpo_seconds)
        plan = self._plan(volume, replicas, wanted, busy={i.value.node_id for i in retiring})
        self._mark_degraded(volume_id, plan.missing)
        if plan.add:
            self._add(volume, plan.add)
            return 0.0  # look again at once: the export comes next
        if plan.retire and self._all_synced(volume.volume_id, plan.keep):
            self._retire(volume, [replicas[n] for n in plan.retire])
            return 0.0  # the node's report of each retirement wakes this again
        if not replicas:
            return POLL_S if retiring else None
        return self._export(volume, replicas, params.rpo_seconds)

    def _cache_lags(self, volume_id: str) -> bool:
        """True, once, when the volumes cache does not hold the volume: put the pass off.

        A create writes the volume and its image spec and status in one txn, and
        the three informers apply it each in its own thread: a pass woken by the
        spec or the status often comes before the volumes cache has the volume,
        and deciding then meant reading the volume and its images from the store
        (a third of all creates' passes). The volume's own event wakes this
        runner again when it is applied. Still absent a moment later, the volume
        is gone (or not cached for another reason): the pass goes on, and the
        store says.
        """
        caches = self._caches
        if caches is None or caches.volumes.get(VOLUMES + volume_id) is not None:
            self._put_off.discard(volume_id)
            return False
        if volume_id in self._put_off:
            self._put_off.discard(volume_id)
            return False
        self._put_off.add(volume_id)
        return True

    def _idle(self, volume_id: str) -> bool:
        """True when the caches show nothing to do: a volume not READY, or one that asks
        for no replicas and has no replica copy (placed or retiring) on any node.

        Most volumes are such, and most passes come from their own create; deciding
        them from memory costs no store read. Anything else (a volume the cache
        does not hold, or one that asks for or has replicas) is read from the store.
        """
        caches = self._caches
        if caches is None:
            return False
        record = caches.volumes.get(VOLUMES + volume_id)
        if record is None:
            self._idle_at.pop(volume_id, None)
            return False  # deleted, perhaps: the store says (and the records go)
        specs = caches.specs.indexed(volume_id)
        # What the decision below reads, by revision: a pass on the same records
        # (the create's own events, one after another) decides the same.
        seen = (record.revision, *(spec.revision for spec in specs))
        if self._idle_at.get(volume_id) == seen:
            return True
        volume = volume_from_json(record.value)
        if volume.state is VolumeState.CREATING:
            status = caches.statuses.get(image_status_key(volume.primary_node, volume_id))
            if status is None or self._catalog.image_status(status.value).phase is not (
                ImagePhase.READY
            ):
                return True  # not READY yet (see Catalog.observed): nothing to do
        elif volume.state is not VolumeState.READY:
            return True
        params = parse_parameters(dict(volume.parameters))
        if params.replicas:
            return False
        for spec in specs:
            if decode(ImageSpec, spec.value).role is ImageRole.REPLICA:
                return False
        self._report(volume, {}, 0, params.rpo_seconds)
        self._idle_at[volume.volume_id] = seen
        return True

    def _plan(
        self,
        volume: Volume,
        replicas: Mapping[str, Versioned[ImageSpec]],
        wanted: int,
        busy: set[str],
    ) -> ReplicaPlan:
        """What placement decides for the unpinned replicas (pinned ones count as kept).

        ``busy`` nodes still hold a retiring copy: no new one goes there until it is gone.
        """
        accounts = self._catalog.accounts()
        views = [v for v in self._readings.views(accounts) if v.node.node_id not in busy]
        pinned = [n for n, i in replicas.items() if i.value.pinned_for]
        free = sorted(n for n in replicas if n not in pinned)
        primary = next((v for v in views if v.node.node_id == volume.primary_node), None)
        within = [accessible_segment(primary.node)] if primary is not None else []
        no_room = [n for n in free if self._no_room(replicas[n].value)]
        return plan_replicas(
            [v for v in views if v.node.node_id not in pinned],
            volume.capacity_bytes,
            volume.primary_node,
            free,
            max(0, wanted - len(pinned)),
            within,
            no_room=no_room,
        )

    def _no_room(self, spec: ImageSpec) -> bool:
        """The replica's node reported it has no room for this copy (its pool filled up)."""
        status = read(self._catalog.store, ImageStatus, spec.status_key)
        return (
            status is not None
            and answers(status.value, spec)
            and status.value.phase is ImagePhase.FAILED
            and status.value.reason is FailureReason.NO_SPACE
        )

    def _all_synced(self, volume_id: str, nodes: Sequence[str]) -> bool:
        """Every replica on ``nodes`` has committed at least one verified sync."""
        for node_id in nodes:
            status = read(self._catalog.store, ImageStatus, image_status_key(node_id, volume_id))
            if status is None or not status.value.manifest_digest:
                return False
        return True

    def _unpin(
        self, volume: Volume, replicas: dict[str, Versioned[ImageSpec]]
    ) -> dict[str, Versioned[ImageSpec]]:
        """Release the pins of replicas whose move happened (the primary left that node)."""
        for node_id, image in list(replicas.items()):
            pin = image.value.pinned_for
            if not pin or pin == volume.primary_node:
                continue
            released = revise(image.value, pinned_for="")
            try:
                revision = self._intents.txn(
                    [unchanged_since(released.key, image)], [put(released)]
                )
            except Conflict:
                continue  # changed meanwhile: the next pass looks again
            replicas[node_id] = Versioned(released, revision)
            log.info(
                "replica pin released: the move it prepared happened",
                extra={"volume": volume.volume_id, "node": node_id, "pinned_for": pin},
            )
        return replicas

    def _add(self, volume: Volume, nodes: Sequence[str]) -> None:
        accounts = self._catalog.accounts()
        try:
            add_replicas(self._intents, volume, accounts, nodes)
        except Conflict:
            return  # an accounting moved: the next pass places again

    def _retire(self, volume: Volume, images: Sequence[Versioned[ImageSpec]]) -> None:
        """Mark each copy deleted (its node removes it; the records go once it did)."""
        for image in images:
            retired = revise(image.value, deleted=True)
            try:
                self._intents.txn([unchanged_since(retired.key, image)], [put(retired)])
            except Conflict:
                continue
            count_replica_changes(ReplicaChange.RETIRED)
            log.info(
                "replica retired",
                extra={"volume": volume.volume_id, "node": image.value.node_id},
            )

    def _try_remove(self, image: Versioned[ImageSpec]) -> None:
        try:
            remove_retired(self._intents, self._catalog, image)
        except Conflict:
            return  # the spec or the accounting moved: the next pass looks again

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
        observed = (in_sync, wanted, rpo_s)
        if self._observed.get(volume.volume_id) != observed:
            observe_replicas(volume.volume_id, in_sync, wanted, rpo_s)
            self._observed[volume.volume_id] = observed
        if wanted:
            why = "replicas are being placed or have not synced yet"
            self._events.replica_count(ref, in_sync, wanted, why)

    def _forget(self, volume_id: str) -> None:
        """A deleted volume's mobility records go too (its images go by the collector)."""
        keys = [move_spec_key(volume_id), move_status_key(volume_id)]
        keys += [failover_status_key(volume_id), fence_status_key(volume_id)]
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


class NodeWakeups:
    """What a node's readiness change wakes in the replication runner's ``queue``.

    The volumes with a copy on the node (one list of its image specs) and, when
    it became ready, the volumes ``reconciler`` left short of replicas: never a
    scan of every volume. A node seen for the first time (a new leader, or a
    node just registered) holds nothing that is not looked at already.
    """

    def __init__(
        self, catalog: Catalog, reconciler: ReplicationReconciler, queue: WorkQueue
    ) -> None:
        self._catalog = catalog
        self._reconciler = reconciler
        self._queue = queue

    def __call__(self, node_id: str, before: NodeReadiness | None, now: NodeReadiness) -> None:
        woken: set[str] = set()
        if before is not None:
            found = self._catalog.store.list(image_specs_on(node_id))
            woken.update(v for v in map(volume_of_key, (r.key for r in found)) if v)
        if now is NodeReadiness.READY:
            woken.update(self._reconciler.degraded())
        if not woken:
            return
        log.info(
            "node readiness changed: replicas re-planned",
            extra={
                "node": node_id,
                "before": before.value if before else "unknown",
                "readiness": now.value,
                "volumes": len(woken),
            },
        )
        for volume_id in sorted(woken):
            self._queue.add(volume_id)


def replication_runners(
    catalog: Catalog,
    intents: ImageIntents,
    events: MobilityEvents | None = None,
    readings: NodeReadings | None = None,
) -> list[Runner]:
    """The replication runner, and the one that wakes it when a node's readiness
    changes (drained or undrained, silent, lost, back, registered, removed): see
    :class:`NodeWakeups`."""
    readings = readings or NodeReadings(catalog)
    caches = Caches(
        volumes=Informer(catalog.store, VOLUMES),
        statuses=Informer(catalog.store, IMAGE_STATUSES),
        specs=Informer(catalog.store, IMAGE_SPECS, index=volume_of_key),
    )
    reconciler = ReplicationReconciler(
        catalog, intents, events=events, readings=readings, caches=caches
    )
    runner = Runner(
        "replication",
        reconciler,
        [
            Source(caches.volumes, strip_prefix(VOLUMES)),
            Source(caches.statuses, volume_of_key),
            Source(Informer(catalog.store, EXPORT_STATUSES), volume_of_key),
            # A replica spec written without its volume changing (a drain's pinned
            # copy) must be seen here before its node reports on it.
            Source(caches.specs, volume_of_key),
        ],
        workers=1,
        resync_s=30.0,
    )
    return [runner, readiness_runner(readings, NodeWakeups(catalog, reconciler, runner.queue))]
