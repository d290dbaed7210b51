"""The leader's garbage collector: finish or roll back intents whose RPC died.

A CreateVolume or DeleteVolume writes its intent, then waits for the node.
When the controller serving it dies mid-call (or the caller gives up), the
intent stays: a volume CREATING or DELETING that nobody waits for. The
collector, run by the leading controller only, settles each one by what its
node reported, exactly as the RPC would have:

- CREATING, image READY at the spec's generation: the volume becomes READY.
- CREATING, a final refusal: the volume, its name, its image records and
  its node's charge go in one txn (nothing is left behind).
- DELETING, image DELETED: the same removal; ``in-use``: the volume goes
  back to READY and its image spec back to kept.
- Snapshot intents orphaned the same way are settled by
  :mod:`.snapshot_collector` in the same sweep.
- An image spec with no volume (written by no current flow, but a catalog
  restored or edited by hand can hold one) is marked deleted, and once its
  node reports DELETED its records go and its node's charge is released.

Invariants: the collector acts only on an outcome the node has settled for
the spec's current generation (an intent still pending is the node's or a
retry's to finish); each step is a compare-and-swap on what it read plus the
leader's fence, so a concurrent RPC or a newer leader wins over it, and a
deposed leader writes nothing. A sweep reads every volume and image spec: it
is background work, never on an RPC's path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from csi_driver.controller.images import ImageIntents
from csi_driver.controller.snapshot_collector import DEFAULT_GRACE_S, collect_snapshots
from csi_driver.core.errors import Conflict
from csi_driver.core.model import Volume, VolumeState
from csi_driver.core.records import (
    SPEC,
    FailureReason,
    ImagePhase,
    ImageSpec,
    ImageStatus,
    answers,
    node_accounting_key,
    revise,
)
from csi_driver.metrics import COLLECTED
from csi_driver.store.base import Compare, Delete, Put
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import from_stored, put, unchanged_since

log = logging.getLogger(__name__)

IMAGE_SPECS = SPEC + "images/"


@dataclass(frozen=True)
class Sweep:
    """What one sweep did, by action."""

    finished: int = 0  # CREATING made READY
    rolled_back: int = 0  # a refused create removed, or a refused delete kept
    deleted: int = 0  # DELETING volumes removed
    orphans: int = 0  # image specs without a volume marked deleted or removed
    snapshots: int = 0  # orphaned snapshot intents marked deleted or removed

    @property
    def total(self) -> int:
        return self.finished + self.rolled_back + self.deleted + self.orphans + self.snapshots


class Collector:
    """Settles orphaned intents; every write is fenced by ``fence`` (the leader's)."""

    def __init__(
        self,
        catalog: Catalog,
        fence: Callable[[], Compare],
        *,
        clock: Callable[[], float] = time.time,
        snapshot_grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self._clock = clock
        self._snapshot_grace = snapshot_grace_s
        self._catalog = catalog
        self._fence = fence
        self._intents = ImageIntents(catalog, fence=fence)

    def sweep(self) -> Sweep:
        """One pass over every intent; raises Deposed once leadership is lost."""
        done = Sweep()
        for volume in self._catalog.list_volumes():
            if volume.state in (VolumeState.CREATING, VolumeState.DELETING):
                done = self._settle(volume, done)
        images = []
        for record in self._catalog.store.list(IMAGE_SPECS):
            spec = from_stored(ImageSpec, record)
            if spec is not None:
                images.append(spec.value)
            if spec is not None and self._catalog.get_volume(spec.value.volume_id) is None:
                done = self._collect_orphan(spec.value, record.revision, done)
        snapshots = collect_snapshots(
            self._catalog, self._intents.txn, images, self._clock(), self._snapshot_grace
        )
        if snapshots:
            COLLECTED.labels("snapshot").inc(snapshots)
            done = replace(done, snapshots=snapshots)
        if done.total:
            log.info("garbage collected", extra=done.__dict__)
        return done

    def _status_of(self, spec: ImageSpec) -> ImageStatus | None:
        record = self._catalog.store.get(spec.status_key)
        status = self._catalog.image_status(record.value) if record else None
        return status if status is not None and answers(status, spec) and status.settled else None

    def _settle(self, volume: Volume, done: Sweep) -> Sweep:
        image = self._catalog.read_image(volume.primary_node, volume.volume_id)
        if image is None:
            return done  # older than image records: its RPC's retry writes one
        status = self._status_of(image.value)
        if status is None:
            return done  # the node has not settled it: nothing to decide yet
        where = {"volume": volume.volume_id, "node": volume.primary_node}
        if volume.state is VolumeState.CREATING:
            if status.phase is ImagePhase.READY:
                if self._mark_ready(volume):
                    COLLECTED.labels("finished").inc()
                    log.info("orphaned create finished", extra=where)
                    return replace(done, finished=done.finished + 1)
            elif status.reason.final:
                self._intents.forget(volume)
                COLLECTED.labels("rolled_back").inc()
                log.info("orphaned create rolled back", extra={**where, "reason": status.message})
                return replace(done, rolled_back=done.rolled_back + 1)
            return done
        if not image.value.deleted:
            return done
        if status.phase is ImagePhase.DELETED:
            self._intents.forget(volume)
            COLLECTED.labels("deleted").inc()
            log.info("orphaned delete finished", extra=where)
            return replace(done, deleted=done.deleted + 1)
        if status.reason is FailureReason.IN_USE:
            self._intents.keep_after_refused_delete(volume.volume_id, image.value)
            COLLECTED.labels("rolled_back").inc()
            log.info("orphaned delete rolled back: image in use", extra=where)
            return replace(done, rolled_back=done.rolled_back + 1)
        return done

    def _mark_ready(self, volume: Volume) -> bool:
        current = self._catalog.read_volume(volume.volume_id)
        if current is None or current.value.state is not VolumeState.CREATING:
            return False
        try:
            self._intents.txn(
                [self._catalog.volume_unchanged(current)],
                [self._catalog.volume_op(replace(current.value, state=VolumeState.READY))],
            )
        except Conflict:
            return False  # its RPC (or a retry) moved it first: next sweep looks again
        return True

    def _collect_orphan(self, spec: ImageSpec, revision: int, done: Sweep) -> Sweep:
        absent = self._catalog.volume_absent(spec.volume_id)
        same = Compare(spec.key, revision)
        where = {"volume": spec.volume_id, "node": spec.node_id}
        try:
            if not spec.deleted:
                self._intents.txn([absent, same], [put(revise(spec, deleted=True))])
                log.info("orphaned image spec marked deleted", extra=where)
            else:
                status = self._status_of(spec)
                if status is None or status.phase is not ImagePhase.DELETED:
                    return done
                key = node_accounting_key(spec.node_id)
                account = self._catalog.accounts().get(spec.node_id)
                ops: list[Put | Delete] = [Delete(spec.key), Delete(spec.status_key)]
                compares = [absent, same, unchanged_since(key, account)]
                if account is not None:
                    ops.append(put(account.value.charge(-spec.size_bytes, -1)))
                self._intents.txn(compares, ops)
                log.info("orphaned image removed", extra=where)
        except Conflict:
            return done  # a volume or a newer spec appeared: not an orphan any more
        COLLECTED.labels("orphan").inc()
        return replace(done, orphans=done.orphans + 1)
