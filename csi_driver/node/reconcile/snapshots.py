"""The node's snapshot reconciler: take and delete the snapshots assigned to it.

The controller writes ``spec/snapshots/<node>/<snapshot>`` (and, for a
group, ``spec/groups/<node>/<group>``); this reconciler, in the node agent
that holds the volumes' primary images, takes or deletes the snapshots and
reports in the matching ``status/`` keys (the node is their only writer).
Invariants:

- A snapshot is a point in time: it is taken while the volume is quiesced
  (its filesystem frozen when staged here, see :meth:`NodeAgent.quiesced`);
  a block volume in use is snapshotted only by reflink (atomic with respect
  to its writes), never by a copy that its writes could tear.
- Every member of a group is taken inside one quiesce of all the group's
  volumes: one freeze point. A group found half-taken after a crash is taken
  again whole, never completed from two points in time.
- READY is reported only once the snapshot's bytes and metadata are durable
  in the pool (``SnapshotStore.take``), so ``ready_to_use`` is never early.
- A status is written only while the spec it answers is unchanged (compare
  on the spec's revision), as for images; final refusals are reported once
  per generation, host errors are reported and retried with backoff.
- Deleting a snapshot never touches its volume, and deleting the volume
  never touches its snapshots.
- A snapshot whose spec asks for a backup is READY only once the backup is
  committed in the target, its id in the status; the backup id is derived
  from the snapshot, so a crash between commit and report ships nothing
  twice. A node without a backup target refuses it (FAILED_PRECONDITION) and
  keeps no snapshot file for it. A group whose spec asks for a backup backs
  up every member (from its file, taken at the group's freeze point) before
  the group is READY. A backup that fails is reported ``backup-failed`` (the
  snapshot stays; the controller answers UNAVAILABLE) and retried.
- A copy (``copy_from``: this node holds a replica of the volume) is pulled
  from the home node once the home reports READY, as a delta against this
  node's replica, and reported READY with the home's point in time only
  once it is whole and verified in the pool. Deleting it deletes the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from csi_driver.backup.snapshots import NOT_CONFIGURED, SnapshotBackups
from csi_driver.core.errors import (
    BackupFailed,
    Conflict,
    FailedPrecondition,
    FerryError,
    NotFound,
)
from csi_driver.core.records import (
    GROUP_ID_PATTERN,
    FailureReason,
    GroupSnapshotSpec,
    GroupSnapshotStatus,
    ImagePhase,
    SnapshotMethod,
    SnapshotSpec,
    SnapshotStatus,
    answers,
    group_spec_key,
    group_specs_on,
    group_status_key,
    group_statuses_on,
    snapshot_spec_key,
    snapshot_specs_on,
    snapshot_status_key,
    snapshot_statuses_on,
)
from csi_driver.node.agent import NodeAgent, Quiesced
from csi_driver.node.clones import SnapshotFetcher
from csi_driver.node.snapshots import SnapshotInfo, SnapshotStore
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.runner import Runner, Source, strip_prefix
from csi_driver.store.base import CatalogStore, Compare, Put
from csi_driver.store.records import Versioned, put, read, unchanged_since

log = logging.getLogger(__name__)

#: Node errors and the reason each reports (final for a generation unless the
#: reason says otherwise; anything else is a host error, retried).
_REASONS: tuple[tuple[type[FerryError], FailureReason], ...] = (
    (NotFound, FailureReason.SOURCE_MISSING),
    (FailedPrecondition, FailureReason.IN_USE),
    (BackupFailed, FailureReason.BACKUP_FAILED),
)

#: How often a copy looks again for its home's snapshot, until it is taken.
COPY_POLL_S = 1.0


def _reason(exc: FerryError) -> FailureReason:
    return next((r for kind, r in _REASONS if isinstance(exc, kind)), FailureReason.HOST_ERROR)


#: Why a copy (not a reflink) of a block volume in use is refused.
TORN_COPY = (
    "volume {volume_id} is a block volume in use on node {node_id}, whose pool cannot "
    "reflink: a copy taken while it is written would not be a point in time. Snapshot it "
    "when its pod is stopped, or put the pool on xfs (reflink=1) or btrfs"
)


def _take(store: SnapshotStore, snapshot_id: str, held: Quiesced, node_id: str) -> SnapshotInfo:
    existing = store.get(snapshot_id)
    if existing is not None:
        return existing
    info = store.take(snapshot_id, held.volume_id, held.image)
    if held.in_use and info.method is not SnapshotMethod.REFLINK:
        store.delete(snapshot_id)
        raise FailedPrecondition(TORN_COPY.format(volume_id=held.volume_id, node_id=node_id))
    return info


def _ready(spec: SnapshotSpec, info: SnapshotInfo) -> SnapshotStatus:
    return SnapshotStatus(
        spec.snapshot_id,
        spec.node_id,
        ImagePhase.READY,
        spec.generation,
        size_bytes=info.size_bytes,
        taken_at=info.taken_at,
        method=info.method,
    )


class SnapshotReconciler:
    """Reconciles this node's snapshots and group snapshots (work key: their id)."""

    def __init__(
        self,
        store: CatalogStore,
        agent: NodeAgent,
        backups: SnapshotBackups | None = None,
        fetcher: SnapshotFetcher | None = None,
    ) -> None:
        self._backups = backups
        self._fetcher = fetcher
        self._store = store
        self._agent = agent
        self._snapshots = agent.snapshots
        self.node_id = agent.node_id

    def __call__(self, key: str) -> float | None:
        if GROUP_ID_PATTERN.match(key):
            self._group(key)
            return None
        return self._snapshot(key)

    # -- one snapshot ------------------------------------------------------------

    def _snapshot(self, snapshot_id: str) -> float | None:
        spec_read = read(self._store, SnapshotSpec, snapshot_spec_key(self.node_id, snapshot_id))
        if spec_read is None:
            return None
        spec = spec_read.value
        current = read(self._store, SnapshotStatus, snapshot_status_key(self.node_id, snapshot_id))
        if current is not None and _done(current.value, spec):
            ready = current.value.phase is ImagePhase.READY
            if not (ready and self._lost(spec)):
                return None
        if spec.group_id and not spec.deleted and not spec.copy_from:
            # Taken by its group, at the group's freeze point: READY only once the
            # whole group is (a member file of a half-taken group is taken again).
            # A member backed up gets its status (with the backup) from its group.
            info = self._snapshots.get(snapshot_id)
            if info is not None and not spec.backup and self._group_ready(spec.group_id):
                self._report([(spec_read, current, _ready(spec, info))])
            return None
        try:
            status = self._copy(spec) if spec.copy_from else self._act(spec)
        except FerryError as exc:
            # A copy's failures are the home's or the link's, not final: retried.
            reason = FailureReason.HOST_ERROR if spec.copy_from else _reason(exc)
            self._report([(spec_read, current, _failed_snapshot(spec, reason, exc))])
            if not reason.final:
                raise
            return None
        if status is None:
            return COPY_POLL_S
        self._report([(spec_read, current, status)])
        return None

    def _copy(self, spec: SnapshotSpec) -> SnapshotStatus | None:
        """This node's copy of a snapshot taken on ``spec.copy_from``; None while the
        home has not taken it yet."""
        if spec.deleted:
            self._snapshots.delete(spec.snapshot_id)
            if self._fetcher is not None:
                self._fetcher.discard(spec.snapshot_id)
            return SnapshotStatus(
                spec.snapshot_id, self.node_id, ImagePhase.DELETED, spec.generation
            )
        info = self._snapshots.get(spec.snapshot_id)
        if info is None:
            home = read(
                self._store, SnapshotStatus, snapshot_status_key(spec.copy_from, spec.snapshot_id)
            )
            if home is None or home.value.phase is not ImagePhase.READY:
                return None
            if self._fetcher is None:
                raise FailedPrecondition(
                    f"node {self.node_id} cannot pull snapshot {spec.snapshot_id} from node "
                    f"{spec.copy_from}: it serves no chunks to other nodes"
                )
            replica = self._agent.pool.replicas_dir / spec.source_volume_id
            info = self._fetcher.copy(spec, home.value.taken_at, self._snapshots, replica)
        return _ready(spec, info)

    def _group_ready(self, group_id: str) -> bool:
        group = read(self._store, GroupSnapshotSpec, group_spec_key(self.node_id, group_id))
        status = read(self._store, GroupSnapshotStatus, group_status_key(self.node_id, group_id))
        return (
            group is not None
            and status is not None
            and answers(status.value, group.value)
            and status.value.phase is ImagePhase.READY
        )

    def _lost(self, spec: SnapshotSpec) -> bool:
        """A READY snapshot whose bytes vanished (reported, never retaken: the point
        in time is gone)."""
        return False if spec.deleted else self._snapshots.get(spec.snapshot_id) is None

    def _act(self, spec: SnapshotSpec) -> SnapshotStatus:
        if spec.deleted:
            self._snapshots.delete(spec.snapshot_id)
            return SnapshotStatus(
                spec.snapshot_id, self.node_id, ImagePhase.DELETED, spec.generation
            )
        existing = self._snapshots.get(spec.snapshot_id)
        if existing is not None:
            return self._finished(spec, existing)
        current = read(
            self._store, SnapshotStatus, snapshot_status_key(self.node_id, spec.snapshot_id)
        )
        if current is not None and current.value.phase is ImagePhase.READY:
            raise NotFound(
                f"snapshot {spec.snapshot_id} disappeared from node {self.node_id}'s pool "
                "after it was taken; delete it"
            )
        if spec.backup and self._backups is None:
            raise FailedPrecondition(self._no_target(spec))
        with self._agent.quiesced([spec.source_volume_id]) as (held,):
            info = _take(self._snapshots, spec.snapshot_id, held, self.node_id)
        return self._finished(spec, info)

    def _no_target(self, spec: SnapshotSpec) -> str:
        return NOT_CONFIGURED.format(
            node_id=self.node_id, what=f"back up snapshot {spec.snapshot_id}"
        )

    def _finished(self, spec: SnapshotSpec, info: SnapshotInfo) -> SnapshotStatus:
        """READY, after shipping the snapshot into the backup target when asked to
        (outside the quiesce: the snapshot file is never written again)."""
        if not spec.backup:
            return _ready(spec, info)
        if self._backups is None:
            self._snapshots.delete(spec.snapshot_id)
            raise FailedPrecondition(self._no_target(spec))
        try:
            backup_id = self._backups.ship(
                spec.snapshot_id,
                spec.created_at,
                info.path,
                volume_id=spec.source_volume_id,
                volume_name=spec.volume_name or spec.source_volume_id,
                fs_type=spec.fs_type.value if spec.fs_type else None,
                encrypted=spec.encrypted,
            )
        except (FerryError, OSError) as exc:
            why = exc.message if isinstance(exc, FerryError) else str(exc)
            raise BackupFailed(
                f"snapshot {spec.snapshot_id} is taken but its backup failed ({why}); "
                "the node retries it: check the backup target"
            ) from exc
        log.info("snapshot backed up", extra={"snapshot": spec.snapshot_id, "backup": backup_id})
        return replace(_ready(spec, info), backup_id=backup_id)

    # -- a group -------------------------------------------------------------------

    def _group(self, group_id: str) -> None:
        group_read = read(self._store, GroupSnapshotSpec, group_spec_key(self.node_id, group_id))
        if group_read is None:
            return
        group = group_read.value
        current = read(self._store, GroupSnapshotStatus, group_status_key(self.node_id, group_id))
        if current is not None and _done(current.value, group):
            return
        member_specs = [
            read(self._store, SnapshotSpec, snapshot_spec_key(self.node_id, m.snapshot_id))
            for m in group.members
        ]
        if group.deleted:
            for member in group.members:
                self._snapshots.delete(member.snapshot_id)
            deleted = GroupSnapshotStatus(
                group_id, self.node_id, ImagePhase.DELETED, group.generation
            )
            self._report_group(group_read, current, deleted, [])
            return
        try:
            if group.backup and self._backups is None:
                raise FailedPrecondition(
                    NOT_CONFIGURED.format(
                        node_id=self.node_id, what=f"back up group snapshot {group_id}"
                    )
                )
            taken = self._take_group(group)
            statuses = []
            for member_read, info in zip(member_specs, taken, strict=True):
                if member_read is None:
                    continue  # the controller writes members with their group: gone: deleted
                member_status = read(self._store, SnapshotStatus, member_read.value.status_key)
                # Backed up (when asked) from the files taken at the group's freeze point.
                done = self._finished(member_read.value, info)
                statuses.append((member_read, member_status, done))
        except FerryError as exc:
            reason = _reason(exc)
            failed = GroupSnapshotStatus(
                group_id,
                self.node_id,
                ImagePhase.FAILED,
                group.generation,
                reason=reason,
                message=exc.message,
            )
            self._report_group(group_read, current, failed, [])
            if not reason.final:
                raise
            return
        ready = GroupSnapshotStatus(
            group_id,
            self.node_id,
            ImagePhase.READY,
            group.generation,
            taken_at=min((i.taken_at for i in taken), default=0.0),
        )
        self._report_group(group_read, current, ready, statuses)

    def _take_group(self, group: GroupSnapshotSpec) -> list[SnapshotInfo]:
        ids = [m.snapshot_id for m in group.members]
        have = [self._snapshots.get(i) for i in ids]
        if all(have):
            return [h for h in have if h is not None]
        for snapshot_id in ids:  # a half-taken group: take it again, whole
            self._snapshots.delete(snapshot_id)
        with self._agent.quiesced([m.volume_id for m in group.members]) as held:
            return [
                _take(self._snapshots, m.snapshot_id, h, self.node_id)
                for m, h in zip(group.members, held, strict=True)
            ]

    # -- reporting -----------------------------------------------------------------

    def _report(
        self,
        changes: Sequence[
            tuple[Versioned[SnapshotSpec], Versioned[SnapshotStatus] | None, SnapshotStatus]
        ],
        compares: Sequence[Compare] = (),
        ops: Sequence[Put] = (),
    ) -> None:
        writes = [(s, status) for s, c, status in changes if c is None or c.value != status]
        if not writes and not ops:
            return
        try:
            self._store.txn(
                [*compares, *(unchanged_since(s.value.key, s) for s, _ in writes)],
                [*ops, *(put(status) for _, status in writes)],
            )
        except Conflict:
            log.info("snapshot spec changed during reconcile; reconciling again")
            return
        for _, status in writes:
            log.info(
                "snapshot status reported",
                extra={
                    "snapshot": status.snapshot_id,
                    "phase": status.phase.value,
                    "method": status.method.value,
                    "reason": status.reason.value,
                },
            )

    def _report_group(
        self,
        group_read: Versioned[GroupSnapshotSpec],
        current: Versioned[GroupSnapshotStatus] | None,
        status: GroupSnapshotStatus,
        members: Sequence[
            tuple[Versioned[SnapshotSpec], Versioned[SnapshotStatus] | None, SnapshotStatus]
        ],
    ) -> None:
        same = current is not None and current.value == status
        self._report(
            members,
            [unchanged_since(group_read.value.key, group_read)],
            [] if same else [put(status)],
        )


def _done(
    status: SnapshotStatus | GroupSnapshotStatus, spec: SnapshotSpec | GroupSnapshotSpec
) -> bool:
    if not answers(status, spec):
        return False
    if status.phase is ImagePhase.FAILED:
        return status.reason.final
    return status.phase in (ImagePhase.READY, ImagePhase.DELETED)


def _failed_snapshot(spec: SnapshotSpec, reason: FailureReason, exc: FerryError) -> SnapshotStatus:
    return SnapshotStatus(
        spec.snapshot_id,
        spec.node_id,
        ImagePhase.FAILED,
        spec.generation,
        reason=reason,
        message=exc.message,
    )


def snapshot_runner(
    store: CatalogStore,
    agent: NodeAgent,
    *,
    resync_s: float = 60.0,
    workers: int = 2,
    backups: SnapshotBackups | None = None,
    fetcher: SnapshotFetcher | None = None,
) -> Runner:
    """A runner of this node's snapshot reconciler over its snapshot and group prefixes."""
    node = agent.node_id
    prefixes = (
        snapshot_specs_on(node),
        snapshot_statuses_on(node),
        group_specs_on(node),
        group_statuses_on(node),
    )
    return Runner(
        f"snapshots:{node}",
        SnapshotReconciler(store, agent, backups, fetcher),
        [Source(Informer(store, p), strip_prefix(p)) for p in prefixes],
        workers=workers,
        resync_s=resync_s,
    )
