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
- An image spec with no volume (written by no current flow, but a catalog
  restored or edited by hand can hold one) is marked deleted, and once its
  node reports DELETED its records go and its node's charge is released.

Invariants: the collector acts only on an outcome the node has settled for
the spec's current generation (an intent still pending is the node's or a
retry's to finish); each step is a compare-and-swap on what it read plus the
leader's fence, so a concurrent RPC or a newer leader wins over it, and a
deposed leader writes nothing.

Its cost follows what changes, not what exists: while running it follows
volumes, image specs and image statuses with informers (one list at start,
then watches), looks only at the volumes whose records changed since its
last pass, and decides from the informers' caches; the store is read only
to act. A volume a node finished is made READY with others in one txn
(:data:`READY_BATCH` at a time), not one txn each. Every ``resync_s`` it
looks at every cached record again, from memory. :meth:`Collector.sweep`
is the same pass over everything read from the store (tests, tools).
Snapshot intents orphaned the same way are settled by :mod:`.snapshot_collector`:
in every full sweep, and at each resync of the informer-driven passes (their grace
is minutes, so the resync's cadence is enough).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from csi_driver.controller.images import ImageIntents
from csi_driver.controller.snapshot_collector import DEFAULT_GRACE_S, collect_snapshots
from csi_driver.core.errors import Conflict
from csi_driver.core.model import Volume, VolumeState
from csi_driver.core.records import (
    IMAGE_SPECS,
    IMAGE_STATUSES,
    FailureReason,
    ImagePhase,
    ImageSpec,
    ImageStatus,
    answers,
    image_spec_key,
    node_accounting_key,
    revise,
)
from csi_driver.metrics import COLLECTED
from csi_driver.reconcile.informer import Informer
from csi_driver.store.base import Compare, Delete, Put, Record
from csi_driver.store.catalog import VOLUMES, Catalog, volume_from_json
from csi_driver.store.records import Versioned, from_stored, put, unchanged_since

log = logging.getLogger(__name__)

#: How often a running collector looks at every cached record again.
RESYNC_S = 60.0


@dataclass(frozen=True)
class Sweep:
    """What one sweep did, by action."""

    finished: int = 0  # CREATING made READY
    rolled_back: int = 0  # a refused create removed, or a refused delete kept
    deleted: int = 0  # DELETING volumes removed
    orphans: int = 0  # image specs without a volume marked deleted or removed
    #: volumes and image specs looked at (what the pass cost, not what it did)
    examined: int = field(default=0, compare=False)
    snapshots: int = 0  # orphaned snapshot intents marked deleted or removed

    @property
    def total(self) -> int:
        return self.finished + self.rolled_back + self.deleted + self.orphans + self.snapshots


#: Volumes made READY per txn (each is a compare and a put; etcd allows 128 ops).
READY_BATCH = 50


class _View(Protocol):
    """Where a pass reads records: the store itself, or the informers' caches."""

    def get(self, key: str) -> Record | None: ...


class _StoreView:
    def __init__(self, catalog: Catalog) -> None:
        self._store = catalog.store

    def get(self, key: str) -> Record | None:
        return self._store.get(key)


class _CacheView:
    def __init__(self, informers: Sequence[Informer]) -> None:
        self._informers = informers

    def get(self, key: str) -> Record | None:
        for informer in self._informers:
            if key.startswith(informer.prefix):
                return informer.get(key)
        return None


class Collector:
    """Settles orphaned intents; every write is fenced by ``fence`` (the leader's)."""

    def __init__(
        self,
        catalog: Catalog,
        fence: Callable[[], Compare],
        *,
        resync_s: float = RESYNC_S,
        clock: Callable[[], float] = time.time,
        snapshot_grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self._clock = clock
        self._snapshot_grace = snapshot_grace_s
        self._snapshots_due = False
        self._catalog = catalog
        self._fence = fence
        self._intents = ImageIntents(catalog, fence=fence)
        self._resync_s = resync_s
        self._volumes = Informer(catalog.store, VOLUMES)
        self._specs = Informer(catalog.store, IMAGE_SPECS)
        self._statuses = Informer(catalog.store, IMAGE_STATUSES)
        self._cache = _CacheView([self._volumes, self._specs, self._statuses])
        self._lock = threading.Lock()
        self._changed_volumes: set[str] = set()
        self._changed_specs: set[str] = set()
        self._resynced_at = 0.0
        self._volumes.subscribe(self._volume_changed)
        self._specs.subscribe(self._image_changed)
        self._statuses.subscribe(self._image_changed)

    # -- following the catalog -------------------------------------------------

    def start(self) -> None:
        for informer in (self._volumes, self._specs, self._statuses):
            informer.start()

    def stop(self, timeout: float = 10.0) -> None:
        for informer in (self._volumes, self._specs, self._statuses):
            informer.stop(timeout)
        self._intents.close()

    def wait_synced(self, timeout: float) -> bool:
        """True once every informer's first list is in."""
        ends = time.monotonic() + timeout
        return all(
            i.wait_synced(max(0.0, ends - time.monotonic()))
            for i in (self._volumes, self._specs, self._statuses)
        )

    def _volume_changed(self, key: str) -> None:
        with self._lock:
            self._changed_volumes.add(key[len(VOLUMES) :])

    def _image_changed(self, key: str) -> None:
        spec_key = IMAGE_SPECS + key.split("/", 2)[2]  # status/images/n/v -> spec/images/n/v
        with self._lock:
            self._changed_specs.add(spec_key)
            self._changed_volumes.add(spec_key.rsplit("/", 1)[1])

    def resync(self) -> None:
        """Look at every cached volume and image spec at the next :meth:`settle_changed`."""
        volumes = [k[len(VOLUMES) :] for k in self._volumes.cached_keys()]
        specs = self._specs.cached_keys()
        with self._lock:
            self._changed_volumes.update(volumes)
            self._changed_specs.update(specs)
            self._resynced_at = time.monotonic()

    def settle_changed(self) -> Sweep:
        """One pass over what changed since the last (everything, once per resync)."""
        resynced = time.monotonic() - self._resynced_at >= self._resync_s
        if resynced:
            self.resync()
        with self._lock:
            volumes, self._changed_volumes = self._changed_volumes, set()
            specs, self._changed_specs = self._changed_specs, set()
        try:
            snapshots = resynced or self._snapshots_due
            self._snapshots_due = False
            every_spec = self._specs.cached_keys() if snapshots else None
            return self._pass(self._cache, sorted(volumes), sorted(specs), every_spec)
        except BaseException:
            with self._lock:  # not settled: look again next time
                self._changed_volumes.update(volumes)
                self._changed_specs.update(specs)
            self._snapshots_due = self._snapshots_due or snapshots
            raise

    # -- passes ------------------------------------------------------------------

    def sweep(self) -> Sweep:
        """One pass over every intent, read from the store; raises Deposed once
        leadership is lost."""
        store = self._catalog.store
        volumes = [r.key[len(VOLUMES) :] for r in store.list(VOLUMES)]
        specs = [r.key for r in store.list(IMAGE_SPECS)]
        return self._pass(_StoreView(self._catalog), volumes, specs, specs)

    def _pass(
        self,
        view: _View,
        volume_ids: Sequence[str],
        spec_keys: Sequence[str],
        every_spec: Sequence[str] | None,
    ) -> Sweep:
        """``every_spec``: every image spec's key, to settle orphaned snapshot
        intents too (None: not in this pass)."""
        done = Sweep(examined=len(volume_ids) + len(spec_keys))
        ready: list[Versioned[Volume]] = []
        for volume_id in volume_ids:
            record = view.get(VOLUMES + volume_id)
            if record is None:
                continue
            volume = Versioned(volume_from_json(record.value), record.revision)
            if volume.value.state in (VolumeState.CREATING, VolumeState.DELETING):
                done = self._settle(view, volume, done, ready)
        done = replace(done, finished=done.finished + self._mark_ready(ready))
        for key in spec_keys:
            spec = from_stored(ImageSpec, view.get(key))
            if spec is not None and view.get(VOLUMES + spec.value.volume_id) is None:
                done = self._collect_orphan(view, spec.value, spec.revision, done)
        if every_spec is not None:
            done = self._collect_snapshots(view, every_spec, done)
        if done.total:
            log.info("garbage collected", extra={**done.__dict__})
        return done

    def _collect_snapshots(self, view: _View, spec_keys: Sequence[str], done: Sweep) -> Sweep:
        """Settle orphaned snapshot intents; ``spec_keys`` must be every image spec
        (a snapshot an image is being built from is never collected)."""
        images = [
            spec.value
            for spec in (from_stored(ImageSpec, view.get(key)) for key in spec_keys)
            if spec is not None
        ]
        count = collect_snapshots(
            self._catalog, self._intents.txn, images, self._clock(), self._snapshot_grace
        )
        if count:
            COLLECTED.labels("snapshot").inc(count)
        return replace(done, snapshots=count)

    def _status_of(self, view: _View, spec: ImageSpec) -> ImageStatus | None:
        record = view.get(spec.status_key)
        status = self._catalog.image_status(record.value) if record else None
        return status if status is not None and answers(status, spec) and status.settled else None

    def _settle(
        self, view: _View, read_as: Versioned[Volume], done: Sweep, ready: list[Versioned[Volume]]
    ) -> Sweep:
        volume = read_as.value
        image = from_stored(
            ImageSpec, view.get(image_spec_key(volume.primary_node, volume.volume_id))
        )
        if image is None:
            return done  # older than image records: its RPC's retry writes one
        status = self._status_of(view, image.value)
        if status is None:
            return done  # the node has not settled it: nothing to decide yet
        where = {"volume": volume.volume_id, "node": volume.primary_node}
        if volume.state is VolumeState.CREATING:
            if status.phase is ImagePhase.READY:
                ready.append(read_as)
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

    def _mark_ready(self, ready: Sequence[Versioned[Volume]]) -> int:
        """Store READY for creates their node finished, a batch per txn; how many."""
        marked = 0
        for start in range(0, len(ready), READY_BATCH):
            batch = ready[start : start + READY_BATCH]
            try:
                self._write_ready(batch)
            except Conflict:
                # One of them moved (its RPC, a publish): the others one by one.
                batch = [v for v in batch if self._write_ready_alone(v)]
            marked += len(batch)
            if batch:
                COLLECTED.labels("finished").inc(len(batch))
                log.info(
                    "creates finished: stored READY",
                    extra={"volumes": [v.value.volume_id for v in batch]},
                )
        return marked

    def _write_ready(self, batch: Sequence[Versioned[Volume]]) -> None:
        self._intents.txn(
            [self._catalog.volume_unchanged(v) for v in batch],
            [self._catalog.volume_op(replace(v.value, state=VolumeState.READY)) for v in batch],
        )

    def _write_ready_alone(self, read_as: Versioned[Volume]) -> bool:
        current = self._catalog.read_volume(read_as.value.volume_id, stored=True)
        if current is None or current.value.state is not VolumeState.CREATING:
            return False
        try:
            self._write_ready([current])
        except Conflict:
            return False  # its RPC (or a retry) moved it first: the next pass looks again
        return True

    def _collect_orphan(self, view: _View, spec: ImageSpec, revision: int, done: Sweep) -> Sweep:
        absent = self._catalog.volume_absent(spec.volume_id)
        same = Compare(spec.key, revision)
        where = {"volume": spec.volume_id, "node": spec.node_id}
        try:
            if not spec.deleted:
                self._intents.txn([absent, same], [put(revise(spec, deleted=True))])
                log.info("orphaned image spec marked deleted", extra=where)
            else:
                status = self._status_of(view, spec)
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
