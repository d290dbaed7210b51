"""The leader's failover reconciler: a volume whose primary node is lost.

A node is lost (controller/readiness.py) when its heartbeat (``nodes/<id>``)
is older than ``node_lost_after_s``, when Kubernetes says it is out of
service (the ``node.kubernetes.io/out-of-service`` taint: at once, without
waiting for the heartbeat) or no longer has the Node, and, for one volume,
when ControllerUnpublishVolume force-detached the volume from it
(``status/fences/<volume>`` at the volume's epoch). Failover time is
counted from that moment (``ferry_failover_duration_seconds``). For each
volume whose primary is on a lost node:

- ``failoverPolicy: wait`` (the default): nothing moves; the volume waits
  for its node (a move to another node says so while it waits), so no
  acknowledged write is ever given up.
- ``failoverPolicy: promote``: the freshest replica (the latest capture it
  committed) on a live node becomes the primary in one txn that bumps the
  epoch, makes the lost primary a replica marked ``keep_divergent``, points
  every other replica at the new primary, drops the lost node's
  publications (the CO's force-detach: recorded, and fenced by the epoch),
  and records the data-loss window in ``status/failovers/<volume>``.

Invariants: nothing is promoted without a verified replica (a replica that
never synced is not a candidate); the old primary cannot stage again (its
epoch and role are stale: node/fencing.py) and, when it returns, keeps what
it holds aside as a snapshot image instead of overwriting it
(node/reconcile/replicas.py). Every write compares what it read plus the
leader's fence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from csi_driver.controller.images import ImageIntents
from csi_driver.controller.primaries import switch_primary
from csi_driver.controller.readiness import NODE_LOST_AFTER_S, NodeReadings
from csi_driver.controller.replication import images_of, ready_volume
from csi_driver.core.errors import Conflict
from csi_driver.core.model import Volume, VolumeState
from csi_driver.core.params import FailoverPolicy, StorageParameters, parse_parameters
from csi_driver.core.records import (
    FENCE_STATUSES,
    FailoverStatus,
    FenceStatus,
    ImageRole,
    ImageStatus,
    fence_status_key,
    image_status_key,
)
from csi_driver.kube.events import LoggingSink, MobilityEvents, VolumeRef
from csi_driver.kube.nodes import Lost
from csi_driver.metrics import observe_failover
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.runner import Runner, Source, strip_prefix
from csi_driver.store.catalog import NODES, VOLUMES, Catalog, node_from_json, volume_from_json
from csi_driver.store.records import Versioned, from_stored, put, read

log = logging.getLogger(__name__)

__all__ = ["NODE_LOST_AFTER_S", "FailoverReconciler", "failover_runner", "lost_for"]


def lost_for(catalog: Catalog, node_id: str, lost_after_s: float, now: float) -> float | None:
    """Seconds since ``node_id`` was last heard of, when that makes it lost; else None."""
    node = catalog.get_node(node_id)
    if node is None:
        return None
    silent = now - node.heartbeat_at
    return silent if silent > lost_after_s else None


class FailoverReconciler:
    """Fails one volume over when its primary's node is lost (work key: its id)."""

    def __init__(
        self,
        catalog: Catalog,
        intents: ImageIntents,
        lost_after_s: float = NODE_LOST_AFTER_S,
        clock: Callable[[], float] = time.time,
        events: MobilityEvents | None = None,
        readings: NodeReadings | None = None,
        fences: Informer | None = None,
        volumes: Informer | None = None,
        nodes: Informer | None = None,
    ) -> None:
        """``fences``, ``volumes``: the runner's informers of fence statuses and
        volumes, read instead of the store (a record the cache does not hold yet
        queues this volume again when it arrives); ``nodes``: an informer of node
        registrations, trusted when it shows a node alive (see :meth:`_node_lost`).
        None reads the store."""
        self._fences = fences
        self._volumes = volumes
        self._nodes = nodes
        self._events = events or MobilityEvents(LoggingSink())
        self._catalog = catalog
        self._intents = intents
        self._lost_after = lost_after_s
        self._clock = clock
        self._readings = readings or NodeReadings(catalog, lost_after_s, clock=clock)

    def __call__(self, volume_id: str) -> float | None:
        found = self._ready(volume_id)
        if found is None:
            return None
        volume_read, params = found
        volume = volume_read.value
        poll = max(1.0, self._lost_after / 3)
        now = self._clock()
        ref = VolumeRef(volume_id, volume.name)
        lost = self._lost(volume)
        if lost is None:
            self._events.primary_reachable(ref, volume.primary_node)
            return poll if params.replicas else None
        if params.failover_policy is not FailoverPolicy.PROMOTE or params.replicas == 0:
            self._events.failover_waiting(ref, volume.primary_node, max(0.0, now - lost.since))
            return poll
        self._promote(volume_read, now, lost)
        return poll

    def _ready(self, volume_id: str) -> tuple[Versioned[Volume], StorageParameters] | None:
        """The volume and its parameters when it is READY, from the cache if there is one.

        From the cache a CREATING volume is not ready yet, even with its image
        READY (the store read would say so): the collector's READY write queues
        it again. A stale cached volume costs nothing: a promotion compares the
        volume's revision, and the newer record queues another pass.
        """
        if self._volumes is None:
            return ready_volume(self._catalog, volume_id)
        record = self._volumes.get(VOLUMES + volume_id)
        if record is None:
            return None
        volume = volume_from_json(record.value)
        if volume.state is not VolumeState.READY:
            return None
        return Versioned(volume, record.revision), parse_parameters(dict(volume.parameters))

    def _node_lost(self, node_id: str) -> Lost | None:
        """Whether ``node_id`` is lost: a cached registration that shows it alive is
        enough (a cache trails the store, and heartbeats only move forward, so the
        stored one is at least as recent); a loss is confirmed by the store."""
        if self._nodes is not None:
            cached = self._nodes.get(NODES + node_id)
            if (
                cached is not None
                and self._readings.lost(node_id, node_from_json(cached.value)) is None
            ):
                return None
        return self._readings.lost(node_id)

    def _lost(self, volume: Volume) -> Lost | None:
        """Whether the volume's primary is lost: its node, or a forced detach from it."""
        key = fence_status_key(volume.volume_id)
        fence = (
            read(self._catalog.store, FenceStatus, key)
            if self._fences is None
            else from_stored(FenceStatus, self._fences.get(key))
        )
        if (
            fence is not None
            and fence.value.node_id == volume.primary_node
            and fence.value.epoch == volume.epoch
        ):
            # Read only with a fence of this primary (most volumes have none): on etcd
            # every read is a round trip, and the readings read the node anyway.
            node = self._catalog.get_node(volume.primary_node)
            # A node heard from since it was declared lost is back: the fence stays
            # (its old attachment can never stage) but is no reason to fail over.
            if node is None or node.heartbeat_at <= fence.value.at:
                return Lost(fence.value.at, f"force-detached from node {fence.value.node_id}")
        return self._node_lost(volume.primary_node)

    def _promote(self, volume_read: Versioned[Volume], now: float, lost_at: Lost) -> None:
        volume = volume_read.value
        images = images_of(self._catalog, volume.volume_id)
        best: tuple[float, str] | None = None
        for node_id, image in images.items():
            if image.value.role is not ImageRole.REPLICA or image.value.deleted:
                continue
            if self._readings.lost(node_id) is not None:
                continue
            status = read(
                self._catalog.store, ImageStatus, image_status_key(node_id, volume.volume_id)
            )
            if status is None or not status.value.manifest_digest:
                continue  # never synced: no data to promote
            candidate = (status.value.synced_captured_at, node_id)
            if best is None or candidate[0] > best[0]:
                best = candidate
        if best is None:
            log.warning(
                "primary lost and no synced replica on a live node: waiting",
                extra={"volume": volume.volume_id, "node": volume.primary_node},
            )
            return
        captured_at, chosen = best
        lost = self._catalog.get_node(volume.primary_node)
        last_seen = lost.heartbeat_at if lost else 0.0
        switch = switch_primary(volume_read, images, chosen, diverged=True)
        epoch = switch.epoch
        record = FailoverStatus(
            volume.volume_id,
            from_node=volume.primary_node,
            to_node=chosen,
            epoch=epoch,
            at=now,
            primary_last_seen=last_seen,
            replica_captured_at=captured_at,
            data_loss_window_s=round(max(0.0, last_seen - captured_at), 3),
        )
        try:
            self._intents.txn(switch.compares, [*switch.ops, put(record)])
        except Conflict:
            return  # something changed: the next pass decides again
        observe_failover(record.data_loss_window_s, max(0.0, now - lost_at.since))
        self._events.failed_over(
            VolumeRef(volume.volume_id, volume.name),
            record.from_node,
            chosen,
            epoch,
            record.data_loss_window_s,
            captured_at,
        )
        log.warning(
            "volume failed over",
            extra={
                "volume": volume.volume_id,
                "from": record.from_node,
                "to": chosen,
                "epoch": epoch,
                "data_loss_window_s": record.data_loss_window_s,
            },
        )


def _no_work(key: str) -> str | None:
    return None


def any_node_lost(catalog: Catalog, lost_after_s: float, now: float) -> bool:
    """True when some registered node has been silent longer than ``lost_after_s``."""
    return any(now - node.heartbeat_at > lost_after_s for node in catalog.list_nodes())


def failover_runner(
    catalog: Catalog,
    intents: ImageIntents,
    lost_after_s: float,
    events: MobilityEvents | None = None,
    readings: NodeReadings | None = None,
) -> Runner:
    """Volumes are looked at as they change, and all of them again every third of
    ``lost_after_s`` while some node is lost (a node falling silent writes nothing,
    so only the clock tells; while every node beats, that look would find nothing
    to do, at the cost of reading every volume)."""
    fences = Informer(catalog.store, FENCE_STATUSES)
    volumes = Informer(catalog.store, VOLUMES)
    nodes = Informer(catalog.store, NODES)
    return Runner(
        "failover",
        FailoverReconciler(
            catalog,
            intents,
            lost_after_s,
            events=events,
            readings=readings,
            fences=fences,
            volumes=volumes,
            nodes=nodes,
        ),
        [
            Source(volumes, strip_prefix(VOLUMES)),
            # A forced detach (a fence) is a loss at once: act on it without a poll.
            Source(fences, strip_prefix(FENCE_STATUSES)),
            # Read only: a heartbeat is no reason to look at a volume (the resync is).
            Source(nodes, _no_work),
        ],
        workers=1,
        resync_s=max(1.0, lost_after_s / 3),
        resync_when=lambda: any_node_lost(catalog, lost_after_s, time.time()),
    )
