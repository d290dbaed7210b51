"""Moves: a volume's primary follows its pod to another node, verified and fenced.

ControllerPublishVolume to a node that is not the volume's primary writes a
:class:`MoveSpec` (``spec/moves/<volume>``) and waits, within its deadline,
for the move to finish; past the deadline it answers ABORTED with the
move's progress and the attacher retries. The leading controller's
:class:`MoveReconciler` drives the move through its steps, each persisted
in ``status/moves/<volume>`` before the next begins:

1. ``source-released``: the volume is published nowhere (RWO: the CO
   detached it from the old node before attaching it to the new one).
2. ``target-assigned``: the target holds a REPLICA image spec (written with
   its node's accounting if it had none).
3. ``final-captured``: the source's export is ``final`` and READY: its node
   captured the image under the volume's lock while nothing used it there
   (the quiescent image: every write acknowledged before the unstage).
4. ``verified``: the target committed that very export (same transfer id,
   same manifest digest); it committed only because the whole manifest
   verified.
5. ``switched``: one txn bumps the volume's epoch, makes the target the
   primary and the source (and every other replica) a replica of it.
6. ``done``: the target reports its primary image READY (the replica's
   generation adopted by rename).

Invariants: each step is level-triggered from the records, so a crash of the
controller, the source or the target at any step resumes from what the
catalog says (a restarted node serves or pulls again; a restarted leader
reads the step). A move whose volume changed under it (deleted, or its
epoch or primary moved by something else) is ``abandoned`` and the volume
keeps its primary: nothing is switched before the target verified, so a
rollback never loses data. The switch txn compares every record it read
plus the leader's fence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from csi_driver.controller.failover import NODE_LOST_AFTER_S, lost_for
from csi_driver.controller.images import REPLY_MARGIN_S, ImageIntents
from csi_driver.controller.primaries import switch_primary
from csi_driver.controller.replication import images_of
from csi_driver.core import deadline
from csi_driver.core.errors import (
    Aborted,
    Conflict,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from csi_driver.core.model import Volume, VolumeState
from csi_driver.core.params import Provisioning, parse_parameters
from csi_driver.core.records import (
    EXPORT_STATUSES,
    IMAGE_STATUSES,
    MOVE_SPECS,
    ExportPhase,
    ExportSpec,
    ExportStatus,
    ImagePhase,
    ImageRole,
    ImageSpec,
    ImageStatus,
    MoveSpec,
    MoveStatus,
    MoveStep,
    NodeAccounting,
    TransferStatus,
    answers,
    decode,
    export_spec_key,
    export_status_key,
    image_status_key,
    move_spec_key,
    move_status_key,
    revise,
    transfer_status_key,
    volume_of_key,
)
from csi_driver.faults import crash_point
from csi_driver.kube.events import LoggingSink, MobilityEvents, VolumeRef
from csi_driver.metrics import observe_move
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.runner import KeyMap, Runner, Source, strip_prefix
from csi_driver.reconcile.wait import wait_for
from csi_driver.store.base import ABSENT, Compare, Record
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import Versioned, put, read, unchanged_since

log = logging.getLogger(__name__)

#: A move in flight is looked at again this often (besides the events that wake it).
POLL_S = 0.5


class MoveObserver:
    """What a move tells the outside world: logs, metrics and the PVC's Events.

    Each hook is called by the leader once per transition it made.
    """

    def __init__(self, catalog: Catalog, events: MobilityEvents | None = None) -> None:
        self._catalog = catalog
        self._events = events or MobilityEvents(LoggingSink())

    def _ref(self, volume_id: str) -> VolumeRef:
        volume = self._catalog.get_volume(volume_id)
        return VolumeRef(volume_id, volume.name if volume else "")

    def started(self, move: MoveSpec) -> None:
        target = read(
            self._catalog.store, ImageStatus, image_status_key(move.target_node, move.volume_id)
        )
        warm = target is not None and bool(target.value.manifest_digest)
        volume = self._catalog.get_volume(move.volume_id)
        size = volume.capacity_bytes if volume else 0
        self._events.move_started(
            self._ref(move.volume_id), move.source_node, move.target_node, size, warm
        )

    def stepped(self, move: MoveSpec, status: MoveStatus, waiting: bool) -> None:
        """A step done, or (``waiting``) a new reason the step waits."""
        log.info(
            "move step",
            extra={"volume": move.volume_id, "step": status.step.value, "detail": status.message},
        )
        if waiting and status.message:
            self._events.move_waiting(
                self._ref(move.volume_id), move.target_node, status.message, 0, 0
            )

    def finished(self, move: MoveSpec, status: MoveStatus, seconds: float) -> None:
        observe_move(status.step.value, seconds, status.final_bytes)
        ref = self._ref(move.volume_id)
        if status.step is MoveStep.DONE:
            self._events.move_finished(
                ref,
                move.source_node,
                move.target_node,
                seconds,
                status.final_bytes,
                move.from_epoch + 1,
            )
        else:
            self._events.move_failed(ref, move.target_node, status.message)


class MoveReconciler:
    """Drives one volume's move (the work key is the volume id); leader only."""

    def __init__(
        self,
        catalog: Catalog,
        intents: ImageIntents,
        observer: MoveObserver | None = None,
        clock: Callable[[], float] = time.time,
        *,
        lost_after_s: float = NODE_LOST_AFTER_S,
    ) -> None:
        self._lost_after = lost_after_s
        self._catalog = catalog
        self._store = catalog.store
        self._intents = intents
        self._observer = observer or MoveObserver(catalog)
        self._clock = clock

    def __call__(self, volume_id: str) -> float | None:
        spec_read = read(self._store, MoveSpec, move_spec_key(volume_id))
        if spec_read is None:
            return None
        move = spec_read.value
        status_read = read(self._store, MoveStatus, move_status_key(volume_id))
        if status_read is not None and answers(status_read.value, move):
            status = status_read.value
        else:
            status = MoveStatus(volume_id, move.generation, MoveStep.REQUESTED)
            self._observer.started(move)
        while not status.step.finished:
            volume = self._catalog.read_volume(volume_id)
            outcome = self._step(move, status, volume)
            if outcome is None:
                return POLL_S  # waiting on a node
            if outcome == status:
                return 0.0
            outcome = replace(outcome, updated_at=self._clock())
            if outcome.step.finished:
                outcome = replace(outcome, finished_at=self._clock())
            try:
                self._intents.txn([unchanged_since(move.key, spec_read)], [put(outcome)])
            except Conflict:
                return 0.0  # a new request replaced the move: start over with it
            advanced = outcome.step is not status.step
            self._observer.stepped(move, outcome, waiting=not advanced)
            crash_point(f"controller:move:{outcome.step.value}")
            if outcome.step.finished:
                self._observer.finished(move, outcome, self._clock() - move.requested_at)
                return None
            if not advanced:
                return 0.0
            # A step done (and persisted): take the next one now, not after a trip
            # through the queue. The pod waits for every hop of the chain.
            status = outcome
        return None

    # -- the steps ---------------------------------------------------------------

    def _step(
        self, move: MoveSpec, status: MoveStatus, volume: Versioned[Volume] | None
    ) -> MoveStatus | None:
        """The next status, or None to wait; each branch checks one step's condition."""
        if volume is None or volume.value.state is VolumeState.DELETING:
            return self._abandon(status, "the volume is being deleted or is gone")
        v = volume.value
        if status.step is MoveStep.SWITCHED:
            return self._finish(move, status)
        if v.primary_node != move.source_node or v.epoch != move.from_epoch:
            if v.primary_node == move.target_node and v.epoch > move.from_epoch:
                return replace(status, step=MoveStep.SWITCHED)  # the switch landed
            return self._abandon(
                status,
                f"the volume's primary changed under the move (now {v.primary_node} at "
                f"epoch {v.epoch})",
            )
        if status.step is MoveStep.REQUESTED:
            if v.publications:
                nodes = ", ".join(p.node_id for p in v.publications)
                return self._waiting(
                    status, f"waiting for the volume to be unpublished from {nodes}"
                )
            return replace(status, step=MoveStep.SOURCE_RELEASED, message="")
        if status.step is MoveStep.SOURCE_RELEASED:
            return self._assign_target(move, status, v)
        if status.step is MoveStep.TARGET_ASSIGNED:
            return self._final_capture(move, status)
        if status.step is MoveStep.FINAL_CAPTURED:
            return self._verify(move, status)
        if status.step is MoveStep.VERIFIED:
            return self._switch(move, status, volume)
        return None

    def _waiting(self, status: MoveStatus, message: str) -> MoveStatus | None:
        if status.message == message:
            return None
        return replace(status, message=message)

    def _abandon(self, status: MoveStatus, why: str) -> MoveStatus:
        return replace(status, step=MoveStep.ABANDONED, message=f"abandoned: {why}")

    def _assign_target(self, move: MoveSpec, status: MoveStatus, volume: Volume) -> MoveStatus:
        key = ImageSpec(move.volume_id, move.target_node, 0, 0).key
        image = read(self._store, ImageSpec, key)
        if image is not None and image.value.role is ImageRole.REPLICA and not image.value.deleted:
            return replace(status, step=MoveStep.TARGET_ASSIGNED, message="")
        if image is not None:
            return self._abandon(
                status, f"node {move.target_node} holds a {image.value.role.value} image already"
            )
        account = self._catalog.accounts().get(move.target_node)
        node = self._catalog.get_node(move.target_node)
        charged = (account.value if account else NodeAccounting(move.target_node)).charge(
            volume.capacity_bytes
        )
        if node is None:
            return self._abandon(status, f"node {move.target_node} is not registered")
        if charged.promised_bytes > node.capacity_bytes:
            error = ResourceExhausted(
                f"node {move.target_node} has no room for volume {move.volume_id}'s "
                f"{volume.capacity_bytes} bytes"
            )
            return self._abandon(status, error.message)
        spec = ImageSpec(
            move.volume_id,
            move.target_node,
            volume.capacity_bytes,
            volume.epoch,
            role=ImageRole.REPLICA,
            thin=parse_parameters(dict(volume.parameters)).provisioning is Provisioning.THIN,
            source_node=volume.primary_node,
        )
        self._intents.txn(
            [Compare(spec.key, ABSENT), unchanged_since(charged.key, account)],
            [put(spec), put(charged)],
        )
        return replace(status, step=MoveStep.TARGET_ASSIGNED, message="")

    def _final_capture(self, move: MoveSpec, status: MoveStatus) -> MoveStatus | None:
        key = export_spec_key(move.source_node, move.volume_id)
        export = read(self._store, ExportSpec, key)
        # A final round asked for by this move (a final export left by an abandoned
        # move was captured before the volume was used again: never trust it).
        if export is None or not export.value.final or not status.final_started_at:
            if export is None:
                wanted = ExportSpec(move.volume_id, move.source_node, move.from_epoch, final=True)
            else:
                wanted = revise(
                    export.value,
                    epoch=move.from_epoch,
                    round=export.value.round + 1,
                    final=True,
                )
            self._intents.txn([unchanged_since(key, export)], [put(wanted)])
            return replace(
                status,
                message="final sync: waiting for the source to capture its quiescent image",
                final_started_at=self._clock(),
            )
        served = read(
            self._store, ExportStatus, export_status_key(move.source_node, move.volume_id)
        )
        if served is None or not answers(served.value, export.value):
            silent = lost_for(self._catalog, move.source_node, self._lost_after, self._clock())
            if silent is not None:
                return self._waiting(
                    status,
                    f"node {move.source_node} holding the data is unreachable (silent "
                    f"{silent:.0f}s): with failoverPolicy promote its freshest replica takes "
                    "over; with wait the volume waits for the node",
                )
            return None
        if served.value.phase is ExportPhase.WAITING:
            return self._waiting(status, f"source: {served.value.message}")
        if served.value.phase is not ExportPhase.READY:
            return self._waiting(status, f"source failed to export: {served.value.message}")
        return replace(
            status,
            step=MoveStep.FINAL_CAPTURED,
            message=f"final sync of {served.value.data_bytes} data bytes to {move.target_node}",
        )

    def _verify(self, move: MoveSpec, status: MoveStatus) -> MoveStatus | None:
        served = read(
            self._store, ExportStatus, export_status_key(move.source_node, move.volume_id)
        )
        replica = read(self._store, ImageStatus, image_status_key(move.target_node, move.volume_id))
        if served is None or not served.value.final:
            return replace(status, step=MoveStep.TARGET_ASSIGNED)  # the export went: again
        if replica is None or replica.value.synced_transfer != served.value.transfer_id:
            return self._waiting(status, self._progress(move))
        if replica.value.manifest_digest != served.value.manifest_digest:
            return self._waiting(
                status, "the target's image does not match the source's; resyncing"
            )
        return replace(
            status,
            step=MoveStep.VERIFIED,
            message=f"target verified manifest {served.value.manifest_digest[:12]}",
            final_bytes=replica.value.synced_bytes,
        )

    def _progress(self, move: MoveSpec) -> str:
        raw = self._store.get(transfer_status_key(move.target_node, move.volume_id))
        if raw is None:
            return f"final sync: waiting for node {move.target_node} to pull"
        transfer = decode(TransferStatus, raw.value)
        eta = f", ETA {transfer.eta_s:.0f}s" if transfer.eta_s >= 0 else ""
        return (
            f"final sync to {move.target_node}: {transfer.bytes_done} of "
            f"{transfer.bytes_total} bytes ({transfer.phase.value}{eta})"
        )

    def _switch(self, move: MoveSpec, status: MoveStatus, volume: Versioned[Volume]) -> MoveStatus:
        """One txn: the epoch bumped, the target primary, every other copy its replica.

        The status follows in its own txn: a crash between the two is read back
        from the volume (its primary is the target at a later epoch)."""
        images = images_of(self._catalog, move.volume_id)
        switch = switch_primary(volume, images, move.target_node, diverged=False)
        self._intents.txn(switch.compares, switch.ops)
        return replace(
            status,
            step=MoveStep.SWITCHED,
            message=f"node {move.target_node} is primary at epoch {switch.epoch}",
        )

    def _finish(self, move: MoveSpec, status: MoveStatus) -> MoveStatus | None:
        image = read(self._store, ImageSpec, ImageSpec(move.volume_id, move.target_node, 0, 0).key)
        report = read(self._store, ImageStatus, image_status_key(move.target_node, move.volume_id))
        if image is None or report is None or not answers(report.value, image.value):
            return self._waiting(status, f"waiting for node {move.target_node} to take over")
        if report.value.phase is ImagePhase.READY:
            return replace(status, step=MoveStep.DONE, message=f"{move.target_node} is primary")
        return self._waiting(status, f"node {move.target_node}: {report.value.message}")


# -- the publish side ------------------------------------------------------------


class MoveRequests:
    """What ControllerPublishVolume does about a volume that lives elsewhere."""

    def __init__(
        self, catalog: Catalog, wait_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._catalog = catalog
        self._wait_s = wait_s
        self._clock = clock

    def in_flight(self, volume_id: str) -> tuple[MoveSpec, MoveStatus | None] | None:
        spec = read(self._catalog.store, MoveSpec, move_spec_key(volume_id))
        if spec is None:
            return None
        status = read(self._catalog.store, MoveStatus, move_status_key(volume_id))
        current = status.value if status and answers(status.value, spec.value) else None
        if current is not None and current.step.finished:
            return None
        return spec.value, current

    def bring(self, volume_read: Versioned[Volume], target: str) -> None:
        """Return once ``target`` is the volume's primary; start or await the move.

        Raises ABORTED with the move's progress when the deadline comes first
        (the attacher retries and finds the move further on), FAILED_PRECONDITION
        when the move was abandoned.
        """
        volume = volume_read.value
        spec = self._request(volume_read, target)
        ends = time.monotonic() + max(0.0, deadline.clamp(self._wait_s) - REPLY_MARGIN_S)

        def finished(record: Record | None) -> bool:
            if record is None:
                return False
            status = decode(MoveStatus, record.value)
            return answers(status, spec) and status.step.finished

        try:
            record = wait_for(
                self._catalog.store,
                spec.status_key,
                finished,
                ends,
                waiting_for=f"the move of volume {volume.volume_id} to node {target}",
            )
        except Unavailable:
            raise Aborted(self._pending_message(spec)) from None
        assert record is not None
        status = decode(MoveStatus, record.value)
        if status.step is MoveStep.ABANDONED:
            raise FailedPrecondition(
                f"the move of volume {volume.volume_id} from {spec.source_node} to {target} was "
                f"{status.message}; it stays on {spec.source_node}"
            )

    def _request(self, volume_read: Versioned[Volume], target: str) -> MoveSpec:
        """The move to ``target``: the one in flight, or a new one written now."""
        volume = volume_read.value
        store = self._catalog.store
        existing = read(store, MoveSpec, move_spec_key(volume.volume_id))
        if volume.primary_node == target:
            # Switched already: the move that did it finishes (or finished) by itself.
            if existing is not None and existing.value.target_node == target:
                return existing.value
            raise Aborted(f"volume {volume.volume_id} just changed its primary; retry")
        if existing is not None:
            move = existing.value
            if self.in_flight(volume.volume_id) is not None:
                if move.target_node != target:
                    raise Aborted(
                        f"volume {volume.volume_id} is moving to node {move.target_node}; "
                        "retry once that move is done"
                    )
                return move
            if (
                move.target_node == target
                and move.source_node == volume.primary_node
                and move.from_epoch == volume.epoch
            ):
                return move  # finished (abandoned): the caller reads its outcome
        fresh = MoveSpec(volume.volume_id, volume.primary_node, target, volume.epoch, self._clock())
        if existing is not None:
            fresh = replace(fresh, generation=existing.value.generation + 1)
        try:
            store.txn(
                [
                    unchanged_since(fresh.key, existing),
                    self._catalog.volume_unchanged(volume_read),
                ],
                [put(fresh)],
            )
        except Conflict:
            raise Aborted(
                f"volume {volume.volume_id} changed while its move was requested; retry"
            ) from None
        log.info(
            "move requested",
            extra={"volume": volume.volume_id, "source": volume.primary_node, "target": target},
        )
        return fresh

    def _pending_message(self, spec: MoveSpec) -> str:
        status = read(self._catalog.store, MoveStatus, spec.status_key)
        step = status.value.step.value if status else MoveStep.REQUESTED.value
        detail = f": {status.value.message}" if status and status.value.message else ""
        return (
            f"volume {spec.volume_id} is moving from node {spec.source_node} to "
            f"{spec.target_node} (step {step}{detail}); retry to pick it up when done"
        )


def move_work(specs: Informer) -> KeyMap:
    """The volume a node's status concerns, when ``specs`` (the move specs' informer)
    holds a move of it.

    Every other volume's status change, and the resync over every cached
    status, then costs no catalog read: with 10,000 volumes that resync alone
    read 1,000 keys a second. A move requested after its status was reported
    is still seen: its spec's own event queues the volume.
    """

    def to_work(key: str) -> str | None:
        volume_id = volume_of_key(key)
        if volume_id is None or specs.get(move_spec_key(volume_id)) is None:
            return None
        return volume_id

    return to_work


def move_runner(
    catalog: Catalog,
    intents: ImageIntents,
    lost_after_s: float = NODE_LOST_AFTER_S,
    events: MobilityEvents | None = None,
) -> Runner:
    specs = Informer(catalog.store, MOVE_SPECS)
    return Runner(
        "moves",
        MoveReconciler(catalog, intents, MoveObserver(catalog, events), lost_after_s=lost_after_s),
        [
            Source(specs, strip_prefix(MOVE_SPECS)),
            Source(Informer(catalog.store, IMAGE_STATUSES), move_work(specs)),
            Source(Informer(catalog.store, EXPORT_STATUSES), move_work(specs)),
        ],
        workers=2,
        resync_s=10.0,
    )
