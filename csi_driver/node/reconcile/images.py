"""The node's image reconciler: make this node's pool match its ImageSpecs.

The controller writes ``spec/images/<node>/<volume>``; this reconciler,
running in the node agent, creates, grows or deletes the image and reports
the outcome in ``status/images/<node>/<volume>`` (the node is that key's
only author; see the last point for one it hands to the controller's txn).
Invariants:

- Level-triggered and idempotent: a reconcile reads the current spec and the
  pool and acts on the difference, so a repeat, a restart, a lost watch or a
  resync converges to the same state without redoing finished work.
- A status is written only while the spec it answers is unchanged (the
  write compares the spec's revision), so a status never outlives its spec
  and never claims a generation the node did not act on.
- An image is deleted only when its spec says ``deleted``, and only when
  nothing on this node uses it (the agent's check, under the volume's lock);
  otherwise the status says ``in-use`` and the image is kept. A spec that is
  simply absent never deletes data: a lost catalog is rebuilt from nodes.
- Final refusals (no space, too large, another image there, in use) are
  reported once per generation; host errors are reported and retried with
  backoff until the spec changes or the error clears.
- In the all-in-one (SQLite or etcd), a new empty volume's image is created
  ahead of its records (:meth:`LocalImages.create_ahead`): this node makes
  the image durable, then hands its READY status to the controller's one
  transaction that writes the volume, its name, its spec and the node's
  charge too. The node is still the only author of its statuses; the image
  becomes visible in the pool only once that transaction is committed. One
  whose transaction's outcome is unknown (etcd's answer lost, see
  :class:`OutcomeUnknown`), or left behind by a crash, is kept or dropped by
  :func:`settle_left`, never before the catalog has decided for good:
  nothing is orphaned and no committed volume loses its image.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from csi_driver.chunks.changes import ChangeTracker
from csi_driver.chunks.generations import GenerationStore
from csi_driver.core.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    FerryError,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    StoreError,
    StoreUnavailable,
)
from csi_driver.core.records import (
    SNAPSHOT_ID_PATTERN,
    FailureReason,
    ImagePhase,
    ImageRole,
    ImageSource,
    ImageSpec,
    ImageStatus,
    NodeAccounting,
    answers,
    image_spec_key,
    image_specs_on,
    image_status_key,
    image_statuses_on,
    node_accounting_key,
)
from csi_driver.faults import crash_point
from csi_driver.metrics import observe_provisioned
from csi_driver.node.agent import NodeAgent
from csi_driver.node.clones import SnapshotFetcher
from csi_driver.node.pool import ImageInfo, Pool
from csi_driver.node.reconcile.exports import capture_lineage, forget_captures
from csi_driver.node.snapshots import copy_image
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.report import report
from csi_driver.reconcile.runner import KeyMap, Runner, Source, strip_prefix
from csi_driver.store.base import ABSENT, CatalogStore, Compare, undecided
from csi_driver.store.records import R, Versioned, from_stored, put, read, unchanged_since

log = logging.getLogger(__name__)

#: How long after the caller's thread (LocalImages) settled a spec the runner's
#: passes for that same spec, woken by its events, are skipped.
FRESH_S = 5.0

#: How long a deletion is remembered against passes that hold an older spec of
#: the volume (an informer's cache lags its store by far less).
DELETED_S = 60.0

#: How often :func:`settle_left` reads again after losing a race, before giving up.
_SETTLE_ATTEMPTS = 16

#: Node errors that are final for a generation, and the reason each reports.
_FINAL: tuple[tuple[type[FerryError], FailureReason], ...] = (
    (ResourceExhausted, FailureReason.NO_SPACE),
    (OutOfRange, FailureReason.TOO_LARGE),
    (FailedPrecondition, FailureReason.IN_USE),
    (AlreadyExists, FailureReason.MISMATCH),
    (NotFound, FailureReason.SOURCE_MISSING),
)


class ImageReconciler:
    """Reconciles one volume's image on this node (the work key is the volume id)."""

    def __init__(
        self,
        store: CatalogStore,
        agent: NodeAgent,
        fetcher: SnapshotFetcher | None = None,
        *,
        specs: Informer | None = None,
        statuses: Informer | None = None,
    ) -> None:
        """``specs``/``statuses``: the runner's informers, read instead of the store.

        Their caches are as fresh as the event that queued the work (an
        informer applies a change before it reports it), and a stale spec
        only makes the status write's compare fail, which its newer event
        answers with another pass. The one stale spec whose action could not
        be undone by that pass, an older spec of a volume whose image this
        reconciler deleted (acting on it would make the image again, with
        no record left to delete it), is recognised by :attr:`_deleted`.
        """
        self._store = store
        self._agent = agent
        self._fetcher = fetcher
        self._specs = specs
        self._statuses = statuses
        self.node_id = agent.node_id
        self.pool = agent.pool
        # The status each volume was last reported with, until the status
        # informer shows it: a pass that runs before the watch delivers our own
        # write (one run in the caller's thread, see LocalImages) need not
        # write it again.
        self._lock = threading.Lock()
        self._written: dict[str, Versioned[ImageStatus]] = {}
        # volume -> (spec revision, until when): settled in the caller's thread just now,
        # in the order they expire (each entry lives FRESH_S)
        self._fresh: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # volume -> (revision of the spec that deleted its image, until when): a pass
        # holding an older spec of it (a cache not caught up yet) must not act.
        self._deleted: dict[str, tuple[int, float]] = {}

    @property
    def store(self) -> CatalogStore:
        return self._store

    def _read(self, informer: Informer | None, cls: type[R], key: str) -> Versioned[R] | None:
        if informer is None:
            return read(self._store, cls, key)
        return from_stored(cls, informer.get(key))

    def __call__(self, volume_id: str) -> float | None:
        if self.pool.unsettled(volume_id):
            # Decided by the store itself (the caches may lag); raises while it cannot
            # answer, and the runner tries again with backoff.
            settle_left(self._store, self.pool, self.node_id, volume_id)
        key = image_spec_key(self.node_id, volume_id)
        if self._specs is not None:
            cached = self._specs.get(key)
            # Judged on revisions alone: most passes end here, with nothing decoded.
            if cached is not None and self._just_settled(volume_id, cached.revision):
                return None
        spec_read = self._read(self._specs, ImageSpec, key)
        if spec_read is None:
            if self._fetcher is not None:
                self._fetcher.discard(volume_id)  # a clone or restore given up: no leftovers
            return None  # nothing asked of this node (or the controller finished)
        if self._specs is None and self._just_settled(volume_id, spec_read.revision):
            return None
        self.reconcile(spec_read)
        return None

    def settled_here(self, spec_read: Versioned[ImageSpec]) -> None:
        """The caller's thread has just settled ``spec_read`` (LocalImages): the
        runner's passes that its own events queue have nothing to do."""
        now = time.monotonic()
        volume_id = spec_read.value.volume_id
        with self._lock:
            # The expired ones first in line: each create drops a few, never scans
            # them all (2,000 are fresh at once at 400 creates/s).
            while self._fresh and next(iter(self._fresh.values()))[1] <= now:
                self._fresh.popitem(last=False)
            self._fresh[volume_id] = (spec_read.revision, now + FRESH_S)
            self._fresh.move_to_end(volume_id)

    def wrote(self, spec: ImageSpec, status: ImageStatus, revision: int) -> None:
        """``status`` was stored with ``spec`` at ``revision`` by a caller's txn (an
        image created ahead): the passes their own events queue have nothing to do."""
        with self._lock:
            self._written[spec.volume_id] = Versioned(status, revision)
        self.settled_here(Versioned(spec, revision))

    def _just_settled(self, volume_id: str, spec_revision: int) -> bool:
        """True for a pass on the very spec (at ``spec_revision``) the caller's thread
        settled moments ago, while the stored status is still the one written then,
        at the same revision (anyone else's write, or a later resync, gets a full pass)."""
        with self._lock:
            fresh = self._fresh.get(volume_id)
            written = self._written.get(volume_id)
        if fresh is None or written is None or fresh[0] != spec_revision:
            return False
        if time.monotonic() > fresh[1]:
            with self._lock:
                self._fresh.pop(volume_id, None)
            return False
        key = image_status_key(self.node_id, volume_id)
        stored = self._store.get(key) if self._statuses is None else self._statuses.get(key)
        if stored is None:
            # Skipped only while the cache has not caught up with our write (its event
            # brings another pass); a status removed after it gets a full pass.
            return self._cache_behind(written.revision)
        return stored.revision == written.revision

    def _remember_deleted(self, volume_id: str, spec_revision: int) -> None:
        """Called with ``_lock`` held: the spec at ``spec_revision`` deleted the image."""
        now = time.monotonic()
        if len(self._deleted) > 1024:
            self._deleted = {k: v for k, v in self._deleted.items() if v[1] > now}
        self._deleted[volume_id] = (spec_revision, now + DELETED_S)

    def _deleted_since(self, volume_id: str, spec_revision: int) -> bool:
        """True when a spec newer than ``spec_revision`` deleted the volume's image here
        lately: the pass holds a spec its informer had not replaced yet."""
        with self._lock:
            deleted = self._deleted.get(volume_id)
        return deleted is not None and spec_revision < deleted[0] and time.monotonic() < deleted[1]

    def status_work(self, prefix: str) -> KeyMap:
        """The work key of a status change under ``prefix``, except for our own writes.

        The runner follows statuses so that one removed or rewritten by anyone else
        is corrected from the spec; the event of a status exactly as this reconciler
        wrote it (the same revision) has nothing to correct.
        """
        to_work = strip_prefix(prefix)

        def mapped(key: str) -> str | None:
            volume_id = to_work(key)
            if volume_id is None or self._statuses is None:
                return volume_id
            with self._lock:
                written = self._written.get(volume_id)
            cached = self._statuses.get(key)
            if written is not None and cached is not None and cached.revision == written.revision:
                return None
            return volume_id

        return mapped

    def _cache_behind(self, revision: int) -> bool:
        """True while the status informer has not applied ``revision`` yet (a status
        missing from it then may be our own write on its way, not a removal)."""
        return self._statuses is not None and self._statuses.revision < revision

    def reconcile(self, spec_read: Versioned[ImageSpec]) -> ImageStatus | None:
        """Act on ``spec_read``; return the status now stored for it (None: not stored,
        the spec changed meanwhile). Host errors are reported, then raised."""
        spec = spec_read.value
        if spec.role is ImageRole.REPLICA:
            return None  # the replica reconciler's (node/reconcile/replicas.py)
        volume_id = spec.volume_id
        if self._deleted_since(volume_id, spec_read.revision):
            return None  # an older spec of a volume deleted here: nothing left to do
        current = self._read(self._statuses, ImageStatus, image_status_key(self.node_id, volume_id))
        written = self._written.get(volume_id)
        if written is not None and self._cache_behind(written.revision):
            current = written  # the cache has not caught up with our own last write
        if current is not None and _done(current.value, spec):
            return current.value
        was_ready = (
            current is not None
            and answers(current.value, spec)
            and current.value.phase is ImagePhase.READY
        )
        try:
            status = self._act(spec, was_ready)
        except FerryError as exc:
            reason = next((r for kind, r in _FINAL if isinstance(exc, kind)), None)
            failed = _failed(spec, reason or FailureReason.HOST_ERROR, exc)
            stored = self._report(spec_read, current, failed)
            if reason is None:
                raise  # a host error: the runner retries with backoff
            return stored
        pool = self._agent.pool
        observe_provisioned(pool.provisioned_bytes, pool.image_count)
        return self._report(spec_read, current, status)

    def _act(self, spec: ImageSpec, was_ready: bool) -> ImageStatus:
        if spec.deleted:
            self._agent.delete_image(spec.volume_id)
            # Its captures too (a promotion cut short leaves a seeded one behind).
            forget_captures(self._agent.pool, spec.volume_id)
            if self._fetcher is not None:
                self._fetcher.discard(spec.volume_id)  # what a pull or restore left
            return ImageStatus(spec.volume_id, self.node_id, ImagePhase.DELETED, spec.generation)
        pool = self._agent.pool
        # An image made ahead whose rename failed after its txn: the spec proves it is the volume's.
        info = pool.get(spec.volume_id) or pool.kept_ahead(spec.volume_id)
        if info is None and was_ready:
            # A blank image in its place would be formatted on the next stage
            # and pass for the volume: report the loss instead.
            return _lost(
                spec,
                f"the image of volume {spec.volume_id} disappeared from the pool on "
                f"node {self.node_id} after it was created; restore it, or delete the volume",
            )
        if info is None:
            info = self._promote(spec)  # a replica's generation, whatever the image began as
        if info is None and spec.epoch > 1:
            # A primary at a later epoch took its data from a replica: a blank image
            # in its place would pass for the volume. Never make one.
            return _lost(
                spec,
                f"node {self.node_id} was made primary of volume {spec.volume_id} "
                f"at epoch {spec.epoch} but holds no verified replica of it; promote a node "
                "that does, or restore it",
            )
        if info is None and spec.source is not None:
            info = self._create_from(spec, spec.source)
        elif info is None:
            info = pool.create_image(spec.volume_id, spec.size_bytes, spec.epoch, thin=spec.thin)
        elif (pool.replicas_dir / spec.volume_id).exists():
            # A promotion cut short after its rename: the generations left are stale.
            shutil.rmtree(pool.replicas_dir / spec.volume_id, ignore_errors=True)
        if info.size_bytes < spec.size_bytes:
            info = pool.expand_image(spec.volume_id, spec.size_bytes)
        return ImageStatus(
            spec.volume_id, self.node_id, ImagePhase.READY, spec.generation, info.size_bytes
        )

    def _promote(self, spec: ImageSpec) -> ImageInfo | None:
        """A replica made primary here (a move or a failover): its verified current
        generation becomes the pool image, by rename; None when there is none."""
        root = self._agent.pool.replicas_dir / spec.volume_id
        if not root.is_dir():
            return None
        replica = GenerationStore(root)
        generation = replica.current()
        if generation is None:
            return None
        # The new primary's first capture compares extents with its verified
        # generation instead of reading the whole image (a reflink: no bytes copied).
        ChangeTracker(generation.image, capture_lineage(self._agent.pool, spec.volume_id)).seed(
            generation.image, generation.manifest, generation.blocks
        )
        info = self._agent.pool.adopt_image(
            spec.volume_id, generation.image, spec.epoch, thin=spec.thin
        )
        crash_point("node:image:promoted")
        shutil.rmtree(replica.root, ignore_errors=True)
        log.info(
            "replica promoted to primary",
            extra={"volume": spec.volume_id, "epoch": spec.epoch, "generation": generation.number},
        )
        return info

    def _create_from(self, spec: ImageSpec, source: ImageSource) -> ImageInfo:
        """A clone or restore: the snapshot's bytes, by reflink or copy when it is held
        here, pulled and verified from its node otherwise; then grown to the spec's size."""

        def fill(path: Path) -> None:
            held = (
                self._agent.snapshots.get(source.snapshot_id)
                if SNAPSHOT_ID_PATTERN.match(source.snapshot_id)
                else None  # a backup handle
            )
            if held is not None:  # taken here, or a copy kept with this node's replica
                copy_image(held.path, path)
            elif source.node_id == self.node_id:
                copy_image(self._agent.snapshots.require(source.snapshot_id).path, path)
            elif self._fetcher is None:
                raise FailedPrecondition(
                    f"snapshot {source.snapshot_id} is on node {source.node_id} and this node "
                    "cannot pull chunks from other nodes (no catalog-backed fetcher)"
                )
            else:
                self._fetcher.fetch(source, spec.volume_id, path)

        return self._agent.pool.create_image_from(
            spec.volume_id, spec.size_bytes, spec.epoch, fill, thin=spec.thin
        )

    def _report(
        self,
        spec_read: Versioned[ImageSpec],
        current: Versioned[ImageStatus] | None,
        status: ImageStatus,
    ) -> ImageStatus | None:
        if current is not None and current.value == status:
            return status
        revision = report(self._store, spec_read, current, status)
        if not revision:
            return None  # the spec changed while we worked: its event queues another pass
        with self._lock:
            if status.phase is ImagePhase.DELETED:
                self._written.pop(status.volume_id, None)
                self._remember_deleted(status.volume_id, spec_read.revision)
            else:
                self._written[status.volume_id] = Versioned(status, revision)
        log.info(
            "image status reported",
            extra={
                "volume": status.volume_id,
                "phase": status.phase.value,
                "generation": status.observed_generation,
                "reason": status.reason.value,
            },
        )
        return status


def _done(status: ImageStatus, spec: ImageSpec) -> bool:
    """True when nothing is left to do for ``spec``'s generation.

    READY is re-checked on resync only through the pool's in-memory sizes;
    a final refusal waits for the spec to change.
    """
    if not answers(status, spec):
        return False
    if status.phase is ImagePhase.FAILED:
        return status.reason.final
    return status.phase is ImagePhase.DELETED


def _lost(spec: ImageSpec, message: str) -> ImageStatus:
    return ImageStatus(
        spec.volume_id,
        spec.node_id,
        ImagePhase.FAILED,
        spec.generation,
        reason=FailureReason.LOST,
        message=message,
    )


def _failed(spec: ImageSpec, reason: FailureReason, exc: FerryError) -> ImageStatus:
    return ImageStatus(
        spec.volume_id,
        spec.node_id,
        ImagePhase.FAILED,
        spec.generation,
        reason=reason,
        message=exc.message,
    )


class LocalImages:
    """The image reconciler of a node in the controller's own process (all-in-one).

    The controller, having just written a spec for this node, runs the
    reconcile in its own thread (:meth:`Runner.run_now`: never beside a worker
    on the same volume) instead of waiting for the node's watch to deliver the
    spec, a worker to pick it up and its own watch to deliver the status. The
    catalog stays the contract: the node acts on the spec as written and
    stores its status with the same compare as always; the spec's event
    still reaches the runner, whose pass then finds nothing to do.
    """

    def __init__(self, runner: Runner, reconciler: ImageReconciler) -> None:
        self._runner = runner
        self._reconciler = reconciler
        self.node_id = reconciler.node_id

    def __call__(self, spec_read: Versioned[ImageSpec]) -> ImageStatus | None:
        """The status stored for ``spec_read``; None when another node owns it, when it
        copies data (a clone or restore: the runner's workers do that, so the RPC's
        wait stays bounded by its deadline) or when the work failed here (the runner
        retries it): then wait for the runner's status."""
        if spec_read.value.node_id != self.node_id or spec_read.value.source is not None:
            return None

        def settle() -> ImageStatus | None:
            status = self._reconciler.reconcile(spec_read)
            if status is not None and answers(status, spec_read.value) and status.settled:
                # Still holding the volume's key: a worker's pass queued by our own
                # writes meanwhile runs after this and finds it settled.
                self._reconciler.settled_here(spec_read)
            return status

        try:
            return self._runner.run_now(spec_read.value.volume_id, settle)
        except Exception as exc:
            log.warning(
                "image reconcile in the caller's thread failed; the runner retries it",
                exc_info=not isinstance(exc, FerryError),
                extra={"volume": spec_read.value.volume_id, "error": str(exc)},
            )
            return None

    def create_ahead(self, spec: ImageSpec, commit: Callable[[ImageStatus], int]) -> ImageStatus:
        """Create ``spec``'s new empty image ahead of its records, then ``commit(status)``
        (the controller's one txn that stores them with the READY ``status``, returning
        its revision); the image is kept once that txn is committed, dropped if it
        provably failed (:func:`undecided`), and otherwise left for :func:`settle_left`,
        which a pass of the runner queued here runs once the store answers. Runs with
        the volume's key held: no worker's pass sees the volume's records before its
        image is in place.

        Raises what the image's creation raised (nothing was written then), or what
        the commit raised.
        """
        pool = self._reconciler.pool

        def create() -> ImageStatus:
            info = pool.create_ahead(spec.volume_id, spec.size_bytes, spec.epoch, thin=spec.thin)
            status = ImageStatus(
                spec.volume_id, self.node_id, ImagePhase.READY, spec.generation, info.size_bytes
            )
            try:
                crash_point("node:image:created-ahead")
                revision = commit(status)
            except BaseException as exc:
                if undecided(exc):
                    pool.leave_ahead(spec.volume_id)
                    self._runner.queue.add(spec.volume_id)  # runs once this call lets go
                else:
                    pool.drop_ahead(spec.volume_id)
                raise
            crash_point("node:image:ahead-committed")
            pool.keep_ahead(spec.volume_id)
            self._reconciler.wrote(spec, status, revision)
            observe_provisioned(pool.provisioned_bytes, pool.image_count)
            return status

        return self._runner.run_now(spec.volume_id, create)

    def settle(self, volume_id: str) -> None:
        """Settle at once the image created ahead for ``volume_id`` if it awaits it
        (a retried create found the volume its undecided txn committed: the image must
        be in place before the volume is handed out); nothing otherwise."""
        pool, store = self._reconciler.pool, self._reconciler.store

        def settle() -> None:
            if pool.unsettled(volume_id):  # again, holding the key: a worker may have
                settle_left(store, pool, self.node_id, volume_id)

        if pool.unsettled(volume_id):
            self._runner.run_now(volume_id, settle)


def settle_left(store: CatalogStore, pool: Pool, node_id: str, volume_id: str) -> bool:
    """Keep or drop the image created ahead for ``volume_id`` whose txn is undecided
    (see :meth:`Pool.leave_ahead`); True when kept. Raises the store's error while it
    cannot answer (nothing is decided then).

    The image spec's presence says the txn was committed: kept. Its absence alone
    proves nothing (etcd may still apply a txn whose answer was lost), so before
    dropping, one txn requires the spec still absent and rewrites the node's
    accounting as it is. The create's txn compared that accounting at the revision
    it read (or absent), accountings are never deleted, and each write gives a
    greater revision: once this txn is committed, the create's can never be, and the
    image is nothing's.
    """
    spec_key, account_key = image_spec_key(node_id, volume_id), node_accounting_key(node_id)
    for _ in range(_SETTLE_ATTEMPTS):
        if store.get(spec_key) is not None:
            pool.keep_ahead(volume_id)
            return True
        account = read(store, NodeAccounting, account_key)
        fence = put(account.value if account is not None else NodeAccounting(node_id))
        try:
            store.txn([Compare(spec_key, ABSENT), unchanged_since(account_key, account)], [fence])
        except Conflict:
            continue  # the spec appeared (committed) or the accounting moved: look again
        pool.drop_ahead(volume_id)
        log.warning(
            "an image created ahead of records never written was removed",
            extra={"volume": volume_id},
        )
        return False
    raise StoreError(f"the image created ahead for {volume_id} kept losing races; retry")


def settle_ahead(store: CatalogStore, pool: Pool, node_id: str) -> list[str]:
    """Settle the images a crashed process created ahead of their records
    (:func:`settle_left`); return those the store could not settle now (it does not
    answer): the runner's passes settle them once it does."""
    pending = []
    for volume_id in pool.ahead():
        try:
            settle_left(store, pool, node_id, volume_id)
        except StoreUnavailable as exc:
            log.warning(
                "image created ahead not settled yet: the catalog does not answer",
                extra={"volume": volume_id, "error": str(exc)},
            )
            pending.append(volume_id)
    return pending


def image_runner(
    store: CatalogStore,
    agent: NodeAgent,
    *,
    resync_s: float = 60.0,
    workers: int = 2,
    fetcher: SnapshotFetcher | None = None,
) -> tuple[Runner, LocalImages]:
    """A runner of this node's image reconciler over its spec and status prefixes,
    and the same reconciler for a controller in this process.

    Status changes are watched too, so a status removed or rewritten by
    anyone else is corrected from the spec.
    """
    specs, statuses = image_specs_on(agent.node_id), image_statuses_on(agent.node_id)
    spec_cache, status_cache = Informer(store, specs), Informer(store, statuses)
    reconciler = ImageReconciler(store, agent, fetcher, specs=spec_cache, statuses=status_cache)
    runner = Runner(
        f"images:{agent.node_id}",
        reconciler,
        [
            Source(spec_cache, strip_prefix(specs)),
            Source(status_cache, reconciler.status_work(statuses)),
        ],
        workers=workers,
        resync_s=resync_s,
    )
    return runner, LocalImages(runner, reconciler)
