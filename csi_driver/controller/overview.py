"""What ``ferry volumes`` and ``ferry drain`` see and do, over the catalog's records.

:func:`overview` reads, for every volume, its primary and epoch, each
replica with its lag (how old the capture it holds is), the transfers in
flight into each replica, and the volume's move; it only reads. :func:`drain`
prepares a node's departure: it records the drain (``spec/drains/<node>``:
the node is leaving, so the leader re-places the replicas it holds and puts
no new copy there), and every volume whose primary is on it gets a replica
elsewhere (assigned the way the leader assigns them, with its node's
accounting) and a fresh capture shipped to its replicas, so the moves that
follow ship only what changed since. The replicas a drain relies on are
pinned for the node (``pinned_for``): the leader does not retire them
before the move they prepare, whatever the volume's replica count.
:func:`undrain` forgets the drain. They write intent records only, like an
RPC; the nodes do the work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from csi_driver.controller.images import ImageIntents
from csi_driver.controller.readiness import NodeReadings
from csi_driver.controller.replication import assign_replicas, images_of
from csi_driver.core.errors import Conflict, FailedPrecondition, NotFound, Unavailable
from csi_driver.core.model import Volume
from csi_driver.core.records import (
    DrainSpec,
    ExportSpec,
    FailoverStatus,
    FenceStatus,
    ImageRole,
    ImageStatus,
    MoveStatus,
    TransferPhase,
    TransferStatus,
    drain_spec_key,
    export_spec_key,
    failover_status_key,
    fence_status_key,
    image_status_key,
    move_status_key,
    revise,
    transfer_status_key,
)
from csi_driver.store.base import ABSENT, Compare, Delete
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import put, read, unchanged_since


@dataclass(frozen=True)
class ReplicaView:
    node_id: str
    synced: bool  # holds a verified capture
    lag_s: float | None  # age of the capture it holds; None before its first sync
    phase: str


@dataclass(frozen=True)
class TransferView:
    volume_id: str
    node_id: str
    source_node: str
    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float
    eta_s: float

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass(frozen=True)
class VolumeView:
    volume: Volume
    replicas: tuple[ReplicaView, ...]
    transfers: tuple[TransferView, ...]
    move: str  # the move's step and message, or ""
    last_move: MoveStatus | None = None
    last_failover: FailoverStatus | None = None
    #: The last forced detach from a lost node (ControllerUnpublishVolume, fenced).
    last_fence: FenceStatus | None = None


def overview(catalog: Catalog, now: float | None = None) -> list[VolumeView]:
    """Every volume as ``ferry volumes`` shows it."""
    now = time.time() if now is None else now
    store = catalog.store
    views = []
    for volume in catalog.list_volumes():
        replicas, transfers = [], []
        for node_id, image in sorted(images_of(catalog, volume.volume_id).items()):
            if image.value.role is not ImageRole.REPLICA or image.value.deleted:
                continue
            status = read(store, ImageStatus, image_status_key(node_id, volume.volume_id))
            captured = status.value.synced_captured_at if status else 0.0
            replicas.append(
                ReplicaView(
                    node_id,
                    synced=bool(status and status.value.manifest_digest),
                    lag_s=round(now - captured, 1) if captured else None,
                    phase=status.value.phase.value if status else "pending",
                )
            )
            running = read(store, TransferStatus, transfer_status_key(node_id, volume.volume_id))
            if running is not None and running.value.phase is TransferPhase.RUNNING:
                t = running.value
                transfers.append(
                    TransferView(
                        volume.volume_id,
                        node_id,
                        t.source_node,
                        t.bytes_done,
                        t.bytes_total,
                        t.rate_bytes_per_s,
                        t.eta_s,
                    )
                )
        move = read(store, MoveStatus, move_status_key(volume.volume_id))
        described = ""
        if move is not None:
            detail = f": {move.value.message}" if move.value.message else ""
            described = f"{move.value.step.value}{detail}"
        failover = read(store, FailoverStatus, failover_status_key(volume.volume_id))
        fence = read(store, FenceStatus, fence_status_key(volume.volume_id))
        views.append(
            VolumeView(
                volume,
                tuple(replicas),
                tuple(transfers),
                described,
                move.value if move else None,
                failover.value if failover else None,
                fence.value if fence else None,
            )
        )
    return views


#: Reads and writes of a drained volume's export before the drain gives up.
_EXPORT_ATTEMPTS = 5


def drain(
    catalog: Catalog,
    node_id: str,
    clock: Callable[[], float] = time.time,
) -> dict[str, str]:
    """Ask for a fresh replica elsewhere of every volume whose primary is ``node_id``;
    return, per volume, the transfer its replicas must reach."""
    if catalog.get_node(node_id) is None:
        raise NotFound(f"node {node_id} is not a Ferry node")
    intents = ImageIntents(catalog)
    if read(catalog.store, DrainSpec, drain_spec_key(node_id)) is None:
        # Drained meanwhile by another caller: the same record.
        with contextlib.suppress(Conflict):
            intents.txn(
                [Compare(drain_spec_key(node_id), ABSENT)], [put(DrainSpec(node_id, clock()))]
            )
    readings = NodeReadings(catalog)
    wanted: dict[str, str] = {}
    for volume in catalog.list_volumes():
        if volume.primary_node != node_id:
            continue
        images = images_of(catalog, volume.volume_id)
        others = {n: i for n, i in images.items() if n != node_id and not i.value.deleted}
        if not others:
            accounts = catalog.accounts()
            assign_replicas(
                intents,
                volume,
                readings.views(accounts),
                accounts,
                set(images),
                1,
                pinned_for=node_id,
            )
        for image in others.values():
            pinned = revise(image.value, pinned_for=node_id)
            try:
                intents.txn([unchanged_since(pinned.key, image)], [put(pinned)])
            except Conflict as exc:
                raise Unavailable(
                    f"volume {volume.volume_id} changed meanwhile; drain again"
                ) from exc
        wanted[volume.volume_id] = _export_round(intents, catalog, volume, node_id)
    return wanted


def _export_round(intents: ImageIntents, catalog: Catalog, volume: Volume, node_id: str) -> str:
    """A fresh capture round of the volume's export on ``node_id``; its transfer id.

    The leader's replication reconciler writes the same export as soon as it
    sees the pinned replica: a lost race is read again, not handed to the caller.
    """
    key = export_spec_key(node_id, volume.volume_id)
    for _ in range(_EXPORT_ATTEMPTS):
        export = read(catalog.store, ExportSpec, key)
        if export is None:
            spec = ExportSpec(volume.volume_id, node_id, volume.epoch)
            compare = Compare(key, ABSENT)
        elif export.value.final:
            raise FailedPrecondition(
                f"volume {volume.volume_id} is moving off node {node_id} already; "
                "drain again once the move is done"
            )
        else:
            spec = revise(export.value, round=export.value.round + 1, epoch=volume.epoch)
            compare = unchanged_since(key, export)
        try:
            intents.txn([compare], [put(spec)])
        except Conflict:
            continue
        return spec.transfer_id
    raise Unavailable(f"volume {volume.volume_id} changed meanwhile; drain again")


def undrain(catalog: Catalog, node_id: str) -> bool:
    """Forget ``ferry drain NODE``: the node takes copies again. False if it was not drained.

    Replicas pinned for the node stay pinned until its volumes move or the
    pin's move happens; they are released like any pin (replication.py)."""
    key = drain_spec_key(node_id)
    found = catalog.store.get(key)
    if found is None:
        return False
    try:
        ImageIntents(catalog).txn([Compare(key, found.revision)], [Delete(key)])
    except Conflict:
        return catalog.store.get(key) is None
    return True


def drained(catalog: Catalog, node_id: str, wanted: dict[str, str]) -> dict[str, bool]:
    """Whether each volume's replicas (all but ``node_id``) hold its drain capture."""
    done = {}
    for volume_id, transfer_id in wanted.items():
        replicas = [
            n
            for n, image in images_of(catalog, volume_id).items()
            if n != node_id and image.value.role is ImageRole.REPLICA
        ]
        statuses = [
            read(catalog.store, ImageStatus, image_status_key(n, volume_id)) for n in replicas
        ]
        done[volume_id] = bool(statuses) and all(
            s is not None and s.value.synced_transfer == transfer_id for s in statuses
        )
    return done
