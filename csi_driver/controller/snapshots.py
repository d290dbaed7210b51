"""The controller's snapshots: CreateSnapshot and friends, group snapshots, clone sources.

Each change is one store transaction writing intent (a
:class:`SnapshotSpec`, or a :class:`GroupSnapshotSpec` with its members,
plus the name and id index keys), followed by a wait, bounded by the RPC's
deadline, for the status the node holding the volumes reports. Invariants:

- Idempotent by name: ``snapshot-names/<name>`` is claimed in the txn that
  writes the spec (compare absent), so two callers never get two snapshots
  for one name; a repeat for the same source finds the intent and waits, a
  repeat for another source is ALREADY_EXISTS.
- ``ready_to_use`` is true only when the node reported READY for the
  spec's generation, i.e. the snapshot's bytes are durable in its pool.
  When the deadline comes first, CreateSnapshot answers ``ready_to_use:
  false`` with the intent kept: the snapshotter calls again and finds it.
- A node's final refusal removes the intent in one txn (spec, status, name,
  index) and maps to the code its reason names; a host error keeps it.
- A snapshot lives on its own: deleting its source volume leaves it, and a
  restore from it needs nothing of the volume.
- A group's snapshots are taken at one freeze point on one node: every
  source volume of a group must have its primary on the same node.
- A snapshot whose class asks for a backup is ready only once its backup is
  committed (the node reports its id); so is a group whose class asks for
  one, each member backed up from its file taken at the group's freeze
  point. A backup that fails answers UNAVAILABLE (the node retries it).
  ``backup-<backup id>`` handles name backups in the target, restorable
  here even when this catalog never held them (see
  :mod:`csi_driver.backup.snapshots`).
- A snapshot of a volume with replicas is copied to every node holding a
  replica when it is taken (one spec per node, written in the same txn as
  the home spec; each copy is pulled from the home node as a delta against
  that node's replica), so it survives the loss of the primary's node: a
  restore reads a live node that holds it. ``ready_to_use`` answers for the
  home copy; a view lists every node holding a READY copy. Deleting a
  snapshot deletes every copy: a copy on a lost node stays marked deleted
  (its node deletes it when it returns, and the collector then drops it).
  A node is lost here as failover declares it (:class:`NodeReadings`): a
  catalog outage is not its silence.
- Every copy is charged to its node's accounting in the txn that writes its
  spec and released in the one that removes it (:mod:`.snapshot_space`).
- A clone or restore has its source's encryption: an encrypted snapshot or
  backup restores only into an encrypted class, and a plain one only into a
  plain class (INVALID_ARGUMENT otherwise).
- A snapshot whose id no CreateSnapshot returned stays ``awaiting_caller``:
  the leader's collector removes it once it is older than its grace.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from csi_driver.backup.snapshots import SnapshotBackups, handle_backup_id
from csi_driver.controller.readiness import NodeReadings
from csi_driver.controller.replication import images_of
from csi_driver.controller.snapshot_space import charge_snapshots, snapshot_sizes
from csi_driver.core import deadline
from csi_driver.core.errors import (
    GROUP_MEMBERS_MISMATCH,
    SNAPSHOT_IN_GROUP,
    SNAPSHOT_NAME_CONFLICT,
    UNKNOWN_SNAPSHOT_TOKEN,
    Aborted,
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    FerryError,
    InternalError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from csi_driver.core.locks import KeyedLocks
from csi_driver.core.model import VOLUME_ID_PATTERN, AccessType, FsType, Volume, VolumeState
from csi_driver.core.params import parse_parameters
from csi_driver.core.records import (
    GROUP_ID_PATTERN,
    SNAPSHOT_ID_PATTERN,
    SNAPSHOT_SPECS,
    SNAPSHOT_STATUSES,
    FailureReason,
    GroupMember,
    GroupSnapshotSpec,
    GroupSnapshotStatus,
    ImagePhase,
    ImageRole,
    ImageSource,
    SnapshotSpec,
    SnapshotStatus,
    answers,
    decode,
    group_index_key,
    group_spec_key,
    revise,
    snapshot_index_key,
    snapshot_name_key,
    snapshot_spec_key,
)
from csi_driver.core.snapshot_class import parse_snapshot_parameters
from csi_driver.reconcile.wait import wait_for
from csi_driver.store.base import ABSENT, Compare, Delete, Put, Record
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import Versioned, put, read, unchanged_since

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 60.0
REPLY_MARGIN_S = 0.2
_CAS_ATTEMPTS = 16

_REFUSALS: dict[FailureReason, Callable[[str], FerryError]] = {
    FailureReason.IN_USE: FailedPrecondition,
    FailureReason.SOURCE_MISSING: FailedPrecondition,
    # The snapshot is taken and the node retries its backup: the caller's retry
    # finds it committed.
    FailureReason.BACKUP_FAILED: Unavailable,
}

St = TypeVar("St", SnapshotStatus, GroupSnapshotStatus)


@dataclass(frozen=True)
class SnapshotView:
    """A snapshot as CSI reports it."""

    snapshot_id: str
    source_volume_id: str
    size_bytes: int
    created_at: float
    ready: bool
    group_id: str = ""
    backup_id: str = ""  # the committed backup of a snapshot whose class asked for one
    #: The nodes holding a READY copy: the home node and the volume's replicas' nodes.
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupView:
    group_id: str
    created_at: float
    ready: bool
    snapshots: tuple[SnapshotView, ...]


@dataclass(frozen=True)
class CloneSource:
    """What a new volume starts as (CreateVolume's volume_content_source), resolved."""

    image: ImageSource
    size_bytes: int
    access_type: AccessType
    fs_type: FsType | None
    #: How the volume records its source ("snapshot:<id>" or "volume:<id>").
    described: str
    #: The source's files are encrypted (fscrypt): so must the new volume's be.
    encrypted: bool = False


def _is_ready(spec: SnapshotSpec, status: SnapshotStatus | None) -> bool:
    return status is not None and answers(status, spec) and status.phase is ImagePhase.READY


def _view(
    spec: SnapshotSpec,
    status: SnapshotStatus | None,
    copies: Sequence[tuple[SnapshotSpec, SnapshotStatus | None]] = (),
) -> SnapshotView:
    """The snapshot as CSI sees it: ready once its home copy is (or, that node lost
    with its status, once any copy is)."""
    held = [s for c, s in [(spec, status), *copies] if s is not None and _is_ready(c, s)]
    first = held[0] if held else None
    return SnapshotView(
        snapshot_id=spec.snapshot_id,
        source_volume_id=spec.source_volume_id,
        size_bytes=first.size_bytes if first is not None else spec.size_bytes,
        created_at=first.taken_at if first is not None else spec.created_at,
        ready=first is not None,
        group_id=spec.group_id,
        backup_id=next((s.backup_id for s in held if s.backup_id), ""),
        nodes=tuple(sorted(s.node_id for s in held)),
    )


def _refusal(node_id: str, reason: FailureReason, message: str) -> FerryError:
    return _REFUSALS.get(reason, InternalError)(f"node {node_id}: {message}")


class SnapshotService:
    """Domain logic behind the CSI snapshot RPCs and the GroupController service."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        clock: Callable[[], float] = time.time,
        wait_s: float = DEFAULT_WAIT_S,
        lock_timeout_s: float = 30.0,
        backups: SnapshotBackups | None = None,
        readings: NodeReadings | None = None,
    ) -> None:
        """``readings``: which nodes are lost, as failover decides it (default: by
        heartbeats alone, with no catalog outage to take off a node's silence)."""
        self._backups = backups
        self._readings = readings or NodeReadings(catalog, clock=clock)
        self._catalog = catalog
        self._store = catalog.store
        self._clock = clock
        self._wait_s = wait_s
        self._lock_timeout = lock_timeout_s
        self._names = KeyedLocks()

    # -- create ----------------------------------------------------------------

    def create(
        self,
        name: str,
        source_volume_id: str,
        parameters: Mapping[str, str] | None = None,
        *,
        acknowledge: bool = False,
        copies: bool = True,
    ) -> SnapshotView:
        """Take (or return the already taken) snapshot called ``name`` of a volume.

        ``parameters`` are the VolumeSnapshotClass's; ``acknowledge`` records
        that the caller (CreateSnapshot) receives the id, so the collector
        keeps the snapshot. ``copies``: copy it to the volume's replica nodes (not for
        the transient snapshot a clone of a volume is made through).
        """
        if not name:
            raise InvalidArgument("name is required")
        backup = parse_snapshot_parameters(parameters or {}).backup
        with self._names.hold(name, timeout=self._lock_timeout):
            spec = self._claimed(name)
            if spec is None:
                volume = self._source_volume(source_volume_id)
                spec = self._write_snapshot(name, volume, backup, copies)
            elif (
                not isinstance(spec, SnapshotSpec)
                or spec.source_volume_id != source_volume_id
                or spec.backup != backup
            ):
                raise AlreadyExists(self._conflict(name, spec))
            elif spec.deleted:
                raise Aborted(f"snapshot {name!r} is being deleted; retry once it is gone")
            view = self._settle(spec)
            if acknowledge and spec.awaiting_caller:
                self._acknowledge(spec)
            return view

    def _acknowledge(self, spec: SnapshotSpec) -> None:
        """Mark the snapshot as handed out (best effort: a lost race leaves it for the
        caller's repeat; no generation bump, so the node has nothing to redo)."""
        found = self._spec(spec.snapshot_id)
        if found is None or not found.value.awaiting_caller:
            return
        try:
            self._store.txn(
                [unchanged_since(found.value.key, found)],
                [put(replace(found.value, awaiting_caller=False))],
            )
        except Conflict:
            log.info("snapshot changed while acknowledged", extra={"snapshot": spec.snapshot_id})

    def _claimed(self, name: str) -> SnapshotSpec | GroupSnapshotSpec | None:
        """The snapshot or group already called ``name``, if any."""
        owner = self._store.get(snapshot_name_key(name))
        if owner is None:
            return None
        owner_id = owner.value.decode()
        if GROUP_ID_PATTERN.match(owner_id):
            group = self._group_spec(owner_id)
            return group.value if group else None
        found = self._spec(owner_id)
        return found.value if found else None

    @staticmethod
    def _conflict(name: str, spec: SnapshotSpec | GroupSnapshotSpec) -> str:
        if isinstance(spec, SnapshotSpec):
            return SNAPSHOT_NAME_CONFLICT.format(
                name=name, snapshot_id=spec.snapshot_id, source=f"volume {spec.source_volume_id}"
            )
        members = ", ".join(m.volume_id for m in spec.members)
        return SNAPSHOT_NAME_CONFLICT.format(
            name=name, snapshot_id=spec.group_id, source=f"volumes {members}"
        )

    def _source_volume(self, volume_id: str) -> Volume:
        volume = self._catalog.get_volume(volume_id) if VOLUME_ID_PATTERN.match(volume_id) else None
        if volume is None:
            raise NotFound(f"source volume {volume_id} does not exist")
        if volume.state is not VolumeState.READY:
            raise Unavailable(f"volume {volume_id} is {volume.state.value}; retry when it is ready")
        return volume

    def _new_spec(
        self, name: str, volume: Volume, group_id: str = "", backup: bool = False
    ) -> SnapshotSpec:
        return SnapshotSpec(
            snapshot_id=f"snap-{uuid.uuid4().hex}",
            name=name,
            node_id=volume.primary_node,
            source_volume_id=volume.volume_id,
            size_bytes=volume.capacity_bytes,
            access_type=volume.access_type,
            fs_type=volume.fs_type,
            created_at=self._clock(),
            group_id=group_id,
            backup=backup,
            volume_name=volume.name,
            encrypted=parse_parameters(dict(volume.parameters)).encrypted,
            awaiting_caller=not group_id,
        )

    def _replica_nodes(self, volume: Volume) -> list[str]:
        """The nodes holding a replica of ``volume``: each gets a copy of its snapshots."""
        return sorted(
            node
            for node, image in images_of(self._catalog, volume.volume_id).items()
            if image.value.role is ImageRole.REPLICA
            and not image.value.deleted
            and node != volume.primary_node
        )

    def _copies(self, spec: SnapshotSpec, volume: Volume) -> list[SnapshotSpec]:
        return [
            replace(spec, node_id=node, copy_from=spec.node_id, awaiting_caller=False)
            for node in self._replica_nodes(volume)
        ]

    def _write_specs(
        self, specs: Sequence[SnapshotSpec], compares: Sequence[Compare], ops: Sequence[Put]
    ) -> None:
        """One txn: ``specs`` (absent until now), their index keys (home specs) and the
        charge of every copy; a lost race on an accounting record reads it again."""
        for _ in range(_CAS_ATTEMPTS):
            charges, charged = charge_snapshots(self._store, snapshot_sizes(specs))
            try:
                self._store.txn(
                    [*compares, *charges, *(Compare(s.key, ABSENT) for s in specs)],
                    [
                        *ops,
                        *charged,
                        *(
                            Put(snapshot_index_key(s.snapshot_id), s.node_id.encode())
                            for s in specs
                            if not s.copy_from
                        ),
                        *(put(s) for s in specs),
                    ],
                )
                return
            except Conflict:
                if not all(self._holds(c) for c in compares):
                    raise
        raise Aborted("node accounting kept changing while the snapshot was recorded; retry")

    def _holds(self, compare: Compare) -> bool:
        """Whether ``compare`` would still pass."""
        found = self._store.get(compare.key)
        if compare.revision == ABSENT:
            return found is None
        return found is not None and found.revision == compare.revision

    def _write_snapshot(
        self, name: str, volume: Volume, backup: bool = False, copied: bool = True
    ) -> SnapshotSpec:
        spec = self._new_spec(name, volume, backup=backup)
        copies = self._copies(spec, volume) if copied else []
        try:
            self._write_specs(
                [spec, *copies],
                [
                    Compare(snapshot_name_key(name), ABSENT),
                    Compare(snapshot_index_key(spec.snapshot_id), ABSENT),
                ],
                [Put(snapshot_name_key(name), spec.snapshot_id.encode())],
            )
        except Conflict as exc:
            raise Aborted(f"snapshot {name!r} is being created by another call; retry") from exc
        log.info(
            "snapshot requested",
            extra={
                "snapshot": spec.snapshot_id,
                "volume": volume.volume_id,
                "node": spec.node_id,
                "copies": [c.node_id for c in copies],
            },
        )
        return spec

    def _settle(self, spec: SnapshotSpec) -> SnapshotView:
        """Wait for the node's answer; READY or still pending (not ready) is returned."""
        try:
            status = self._await(SnapshotStatus, spec.status_key, spec, "take the snapshot")
        except Unavailable:
            return _view(spec, None)  # not ready yet: the snapshotter asks again
        if status.phase is ImagePhase.READY:
            return _view(spec, status)
        if status.reason.final:
            self._forget_snapshots([spec])
        raise _refusal(spec.node_id, status.reason, status.message)

    # -- delete ----------------------------------------------------------------

    def delete(self, snapshot_id: str) -> None:
        """Delete a snapshot and every copy of it; unknown ids succeed (CSI idempotency)."""
        found = self._spec(snapshot_id)
        if found is None:
            return
        spec = found.value
        if spec.group_id and self._group_spec(spec.group_id) is not None:
            raise FailedPrecondition(
                SNAPSHOT_IN_GROUP.format(snapshot_id=snapshot_id, group_id=spec.group_id)
            )
        holders = self._holders(snapshot_id, spec.node_id)
        self._doom(holders)
        self._await_deleted([h.value.node_id for h in holders], snapshot_id)
        self._forget_snapshots([spec], keep=self._undeleted)
        log.info("snapshot deleted", extra={"snapshot": snapshot_id})

    def _doom(self, holders: Sequence[Versioned[SnapshotSpec]]) -> None:
        """One txn marking every copy in ``holders`` deleted (those not marked yet)."""
        compares, ops = [], []
        for held in holders:
            doomed = revise(held.value, deleted=True)
            if doomed is not held.value:
                compares.append(unchanged_since(held.value.key, held))
                ops.append(put(doomed))
        if ops:
            self._txn(compares, ops)

    def _await_deleted(self, nodes: Sequence[str], snapshot_id: str) -> None:
        """Wait for each node's copy to be deleted; a lost node's stays marked deleted
        (it deletes the file when it returns, and the collector then drops the records)."""
        for node in nodes:
            held = read(self._store, SnapshotSpec, snapshot_spec_key(node, snapshot_id))
            if held is None or self._lost(node):
                continue
            status = self._await(SnapshotStatus, held.value.status_key, held.value, "delete it")
            if status.phase is not ImagePhase.DELETED:
                raise _refusal(node, status.reason, status.message)

    def _lost(self, node_id: str) -> bool:
        """A node failover would declare lost: silent past the loss delay (a catalog
        outage is not its silence), out of service, or never registered."""
        return self._readings.lost(node_id) is not None

    def _holders(self, snapshot_id: str, home: str) -> list[Versioned[SnapshotSpec]]:
        """Every node's spec for ``snapshot_id``, the home first: one read per node."""
        nodes = [home, *sorted({n.node_id for n in self._catalog.list_nodes()} - {home})]
        found = (read(self._store, SnapshotSpec, snapshot_spec_key(n, snapshot_id)) for n in nodes)
        return [f for f in found if f is not None]

    def _copy_statuses(
        self, holders: Sequence[Versioned[SnapshotSpec]]
    ) -> list[tuple[SnapshotSpec, SnapshotStatus | None]]:
        copies = []
        for held in holders:
            if held.value.copy_from:
                status = read(self._store, SnapshotStatus, held.value.status_key)
                copies.append((held.value, status.value if status else None))
        return copies

    def _forget_snapshots(
        self,
        specs: Sequence[SnapshotSpec],
        extra: Sequence[Delete] = (),
        *,
        keep: Callable[[SnapshotSpec], bool] = lambda spec: False,
    ) -> None:
        """One txn: the snapshots' index keys and names (still theirs) gone, and every
        copy's spec and status with its charge, but for the copies ``keep`` names (a
        lost node's, left marked deleted for that node to delete)."""
        for _ in range(_CAS_ATTEMPTS):
            ops: list[Put | Delete] = list(extra)
            compares: list[Compare] = []
            released: list[SnapshotSpec] = []
            for spec in specs:
                for held in self._holders(spec.snapshot_id, spec.node_id):
                    if keep(held.value):
                        continue
                    compares.append(unchanged_since(held.value.key, held))
                    ops += [Delete(held.value.key), Delete(held.value.status_key)]
                    released.append(held.value)
                ops.append(Delete(snapshot_index_key(spec.snapshot_id)))
                owner = self._store.get(snapshot_name_key(spec.name))
                if owner is not None and owner.value.decode() == spec.snapshot_id:
                    compares.append(Compare(snapshot_name_key(spec.name), owner.revision))
                    ops.append(Delete(snapshot_name_key(spec.name)))
            charges, charged = charge_snapshots(self._store, snapshot_sizes(released), release=True)
            try:
                self._store.txn([*compares, *charges], [*ops, *charged])
                return
            except Conflict:
                continue  # a copy or an accounting record changed: read them again
        raise Aborted("a snapshot kept changing while its records were removed; retry")

    def _undeleted(self, spec: SnapshotSpec) -> bool:
        """Whether ``spec``'s node has not reported its copy deleted yet."""
        status = read(self._store, SnapshotStatus, spec.status_key)
        return not (
            spec.deleted
            and status is not None
            and answers(status.value, spec)
            and status.value.phase is ImagePhase.DELETED
        )

    # -- queries ---------------------------------------------------------------

    def get(self, snapshot_id: str) -> SnapshotView:
        if (backed := self._backup_view(snapshot_id)) is not None:
            return backed
        found = self._spec(snapshot_id)
        if found is None or found.value.deleted:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        status = read(self._store, SnapshotStatus, found.value.status_key)
        copies = self._copy_statuses(self._holders(snapshot_id, found.value.node_id))
        return _view(found.value, status.value if status else None, copies)

    def list(
        self, snapshot_id: str, source_volume_id: str, max_entries: int, starting_token: str
    ) -> tuple[list[SnapshotView], str]:
        """A page of snapshots in id order and the token for the next page ("" at the end)."""
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        if starting_token and not SNAPSHOT_ID_PATTERN.match(starting_token):
            raise Aborted(UNKNOWN_SNAPSHOT_TOKEN.format(token=starting_token))
        if snapshot_id and (backed := self._backup_view(snapshot_id)) is not None:
            wanted = not source_volume_id or source_volume_id == backed.source_volume_id
            return ([backed] if wanted and not starting_token else []), ""
        if snapshot_id:
            found = self._spec(snapshot_id)
            holders = self._holders(snapshot_id, found.value.node_id) if found else []
            specs = [h.value for h in holders]
        else:
            specs = [decode(SnapshotSpec, r.value) for r in self._store.list(SNAPSHOT_SPECS)]
        statuses = {
            (s.snapshot_id, s.node_id): s
            for s in (decode(SnapshotStatus, r.value) for r in self._store.list(SNAPSHOT_STATUSES))
        }
        copies: dict[str, list[tuple[SnapshotSpec, SnapshotStatus | None]]] = {}
        for spec in specs:
            if spec.copy_from:
                status = statuses.get((spec.snapshot_id, spec.node_id))
                copies.setdefault(spec.snapshot_id, []).append((spec, status))
        views = sorted(
            (
                _view(s, statuses.get((s.snapshot_id, s.node_id)), copies.get(s.snapshot_id, ()))
                for s in specs
                if not s.deleted
                and not s.copy_from
                and (not source_volume_id or s.source_volume_id == source_volume_id)
            ),
            key=lambda v: v.snapshot_id,
        )
        if starting_token:
            views = [v for v in views if v.snapshot_id > starting_token]
        if max_entries and len(views) > max_entries:
            views = views[:max_entries]
            return views, views[-1].snapshot_id
        return views, ""

    # -- groups ----------------------------------------------------------------

    def create_group(
        self, name: str, volume_ids: Sequence[str], parameters: Mapping[str, str] | None = None
    ) -> GroupView:
        """Snapshot ``volume_ids`` at one point in time, as the group called ``name``."""
        if not name:
            raise InvalidArgument("name is required")
        backup = parse_snapshot_parameters(parameters or {}).backup
        wanted = tuple(dict.fromkeys(volume_ids))
        with self._names.hold(name, timeout=self._lock_timeout):
            spec = self._claimed(name)
            if spec is None:
                spec = self._write_group(name, wanted, backup)
            elif (
                not isinstance(spec, GroupSnapshotSpec)
                or sorted(m.volume_id for m in spec.members) != sorted(wanted)
                or spec.backup != backup
            ):
                raise AlreadyExists(self._conflict(name, spec))
            return self._settle_group(spec)

    def _write_group(
        self, name: str, volume_ids: Sequence[str], backup: bool = False
    ) -> GroupSnapshotSpec:
        volumes = [self._source_volume(v) for v in volume_ids]
        nodes = sorted({v.primary_node for v in volumes})
        if len(nodes) > 1:
            raise FailedPrecondition(
                f"the volumes of a group snapshot are frozen together on one node, and these "
                f"live on nodes {', '.join(nodes)}; schedule the app's pods on one node, or "
                "snapshot the volumes one by one"
            )
        group_id = f"group-{uuid.uuid4().hex}"
        members = [self._new_spec(f"{name}/{v.volume_id}", v, group_id, backup) for v in volumes]
        group = GroupSnapshotSpec(
            group_id,
            name,
            nodes[0],
            tuple(GroupMember(m.snapshot_id, m.source_volume_id) for m in members),
            created_at=self._clock(),
            backup=backup,
        )
        copies = [c for m, v in zip(members, volumes, strict=True) for c in self._copies(m, v)]
        try:
            self._write_specs(
                [*members, *copies],
                [Compare(snapshot_name_key(name), ABSENT), Compare(group.key, ABSENT)],
                [
                    Put(snapshot_name_key(name), group_id.encode()),
                    Put(group_index_key(group_id), group.node_id.encode()),
                    put(group),
                ],
            )
        except Conflict as exc:
            raise Aborted(f"group snapshot {name!r} is being created by another call") from exc
        log.info("group snapshot requested", extra={"group": group_id, "node": group.node_id})
        return group

    def _settle_group(self, group: GroupSnapshotSpec) -> GroupView:
        try:
            status = self._await(GroupSnapshotStatus, group.status_key, group, "take the group")
        except Unavailable:
            return self._group_view(group, None)
        if status.phase is ImagePhase.READY:
            return self._group_view(group, status)
        if status.reason.final:
            self._forget_group(group)
        raise _refusal(group.node_id, status.reason, status.message)

    def _group_view(
        self, group: GroupSnapshotSpec, status: GroupSnapshotStatus | None
    ) -> GroupView:
        members = []
        for member in group.members:
            spec = self._spec(member.snapshot_id)
            if spec is not None:
                found = read(self._store, SnapshotStatus, spec.value.status_key)
                holders = self._holders(member.snapshot_id, spec.value.node_id)
                copies = self._copy_statuses(holders)
                members.append(_view(spec.value, found.value if found else None, copies))
        ready = (
            status is not None
            and answers(status, group)
            and status.phase is ImagePhase.READY
            and all(m.ready for m in members)
        )
        created = status.taken_at if status is not None and ready else group.created_at
        return GroupView(group.group_id, created, ready, tuple(members))

    def get_group(self, group_id: str, snapshot_ids: Sequence[str]) -> GroupView:
        found = self._group_spec(group_id)
        if found is None or found.value.deleted:
            raise NotFound(f"group snapshot {group_id} does not exist")
        _check_members(found.value, snapshot_ids)
        status = read(self._store, GroupSnapshotStatus, found.value.status_key)
        return self._group_view(found.value, status.value if status else None)

    def delete_group(self, group_id: str, snapshot_ids: Sequence[str]) -> None:
        """Delete a group snapshot and its members; unknown ids succeed."""
        found = self._group_spec(group_id)
        if found is None:
            return
        group = found.value
        _check_members(group, snapshot_ids)
        doomed = revise(group, deleted=True)
        compares = [unchanged_since(group.key, found)]
        ops: list[Put | Delete] = [put(doomed)]
        holders = [h for m in group.members for h in self._holders(m.snapshot_id, group.node_id)]
        for held in holders:
            marked = revise(held.value, deleted=True)
            if marked is not held.value:
                compares.append(unchanged_since(held.value.key, held))
                ops.append(put(marked))
        if doomed is not group:
            self._txn(compares, ops)
        status = self._await(GroupSnapshotStatus, doomed.status_key, doomed, "delete the group")
        if status.phase is not ImagePhase.DELETED:
            raise _refusal(doomed.node_id, status.reason, status.message)
        for member in group.members:
            copies = [
                h.value.node_id
                for h in holders
                if h.value.copy_from and h.value.snapshot_id == member.snapshot_id
            ]
            self._await_deleted(copies, member.snapshot_id)
        self._forget_group(doomed)
        log.info("group snapshot deleted", extra={"group": group_id})

    def _forget_group(self, group: GroupSnapshotSpec) -> None:
        members = [s.value for m in group.members if (s := self._spec(m.snapshot_id))]
        extra = [
            Delete(group.key),
            Delete(group.status_key),
            Delete(group_index_key(group.group_id)),
        ]
        owner = self._store.get(snapshot_name_key(group.name))
        if owner is not None and owner.value.decode() == group.group_id:
            extra.append(Delete(snapshot_name_key(group.name)))
        # The group's DELETED answers for its members on its node; copies elsewhere
        # answer for themselves.
        self._forget_snapshots(
            members, extra, keep=lambda spec: bool(spec.copy_from) and self._undeleted(spec)
        )

    # -- backups as snapshots ----------------------------------------------------

    def _backup_view(self, snapshot_id: str) -> SnapshotView | None:
        """A ``backup-<id>`` handle as a snapshot (always ready: a backup is committed
        whole or not at all); None for any other id."""
        backup_id = handle_backup_id(snapshot_id)
        if backup_id is None:
            return None
        if self._backups is None:
            raise NotFound(
                f"snapshot {snapshot_id} names a backup and Ferry has no backup target "
                "configured: set the chart's backup.target and backup.keySecret"
            )
        info = self._backups.describe(backup_id)
        return SnapshotView(
            snapshot_id,
            info.info.volume_id,
            info.manifest.size,
            info.info.created_at,
            ready=True,
            backup_id=backup_id,
        )

    def _backup_source(self, snapshot_id: str, backup_id: str) -> CloneSource:
        assert self._backups is not None  # _backup_view found the backup
        info = self._backups.describe(backup_id).info
        fs_type = FsType(info.fs_type) if info.fs_type else None
        view = self._backup_view(snapshot_id)
        assert view is not None
        return CloneSource(
            ImageSource(snapshot_id, "", backup_id),
            view.size_bytes,
            AccessType.MOUNT if fs_type else AccessType.BLOCK,
            fs_type,
            f"snapshot:{snapshot_id}",
            encrypted=info.encrypted,
        )

    # -- clone sources ---------------------------------------------------------

    def clone_source(self, snapshot_id: str, volume_id: str, clone_name: str) -> CloneSource:
        """Resolve CreateVolume's content source (a snapshot, or a volume, which is
        snapshotted first under a name derived from the clone's)."""
        if snapshot_id and (backup_id := handle_backup_id(snapshot_id)) is not None:
            self._backup_view(snapshot_id)  # NotFound without a target or the backup
            return self._backup_source(snapshot_id, backup_id)
        if snapshot_id:
            found = self._spec(snapshot_id)
            if found is None or found.value.deleted:
                raise NotFound(f"source snapshot {snapshot_id} does not exist")
            spec = found.value
            view = self.get(snapshot_id)
            if not view.ready:
                raise Unavailable(f"source snapshot {snapshot_id} is not ready yet; retry")
            return CloneSource(
                ImageSource(snapshot_id, self._holder(spec.node_id, view.nodes), view.backup_id),
                spec.size_bytes,
                spec.access_type,
                spec.fs_type,
                f"snapshot:{snapshot_id}",
                encrypted=spec.encrypted,
            )
        if not VOLUME_ID_PATTERN.match(volume_id) or self._catalog.get_volume(volume_id) is None:
            raise NotFound(f"source volume {volume_id} does not exist")
        view = self.create(_clone_snapshot_name(clone_name), volume_id, copies=False)
        if not view.ready:
            raise Unavailable(f"the snapshot of source volume {volume_id} is not ready; retry")
        found = self._spec(view.snapshot_id)
        if found is None:
            raise Aborted(f"the snapshot of source volume {volume_id} vanished; retry")
        spec = found.value
        return CloneSource(
            ImageSource(spec.snapshot_id, spec.node_id),
            spec.size_bytes,
            spec.access_type,
            spec.fs_type,
            f"volume:{volume_id}",
            encrypted=spec.encrypted,
        )

    def _holder(self, home: str, nodes: Sequence[str]) -> str:
        """The node a restore reads the snapshot from: its home while that node lives,
        else the live holder of a copy heard from last (the home's loss is why copies
        exist)."""
        if home in nodes and not self._lost(home):
            return home
        heard = {n.node_id: n.heartbeat_at for n in self._catalog.list_nodes()}
        live = [n for n in nodes if n in heard and not self._lost(n)]
        return max(live, key=lambda n: heard[n]) if live else home

    def release_clone(self, clone_name: str) -> None:
        """Delete the snapshot a volume was cloned through, once the clone exists
        (best effort: what a failure leaves, the next repeat of the CreateVolume
        deletes)."""
        owner = self._store.get(snapshot_name_key(_clone_snapshot_name(clone_name)))
        if owner is None:
            return
        try:
            self.delete(owner.value.decode())
        except FerryError as exc:
            log.warning(
                "clone snapshot kept",
                extra={"snapshot": owner.value.decode(), "error": exc.message},
            )

    # -- shared ----------------------------------------------------------------

    def _spec(self, snapshot_id: str) -> Versioned[SnapshotSpec] | None:
        if not SNAPSHOT_ID_PATTERN.match(snapshot_id):
            return None
        node = self._store.get(snapshot_index_key(snapshot_id))
        if node is None:
            return None
        return read(self._store, SnapshotSpec, snapshot_spec_key(node.value.decode(), snapshot_id))

    def _group_spec(self, group_id: str) -> Versioned[GroupSnapshotSpec] | None:
        if not GROUP_ID_PATTERN.match(group_id):
            return None
        node = self._store.get(group_index_key(group_id))
        if node is None:
            return None
        return read(self._store, GroupSnapshotSpec, group_spec_key(node.value.decode(), group_id))

    def _txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> None:
        try:
            self._store.txn(compares, ops)
        except Conflict as exc:
            raise Aborted(f"a snapshot changed during this call ({exc.key}); retry") from exc

    def _await(
        self,
        cls: type[St],
        key: str,
        spec: SnapshotSpec | GroupSnapshotSpec,
        what: str,
    ) -> St:
        def settled(record: Record | None) -> bool:
            if record is None:
                return False
            status = decode(cls, record.value)
            return answers(status, spec) and status.settled

        record = wait_for(
            self._store,
            key,
            settled,
            time.monotonic() + max(0.0, deadline.clamp(self._wait_s) - REPLY_MARGIN_S),
            waiting_for=f"node {spec.node_id} to {what} (generation {spec.generation})",
        )
        assert record is not None
        return decode(cls, record.value)


def _clone_snapshot_name(clone_name: str) -> str:
    """The name of the snapshot a volume called ``clone_name`` is cloned through."""
    return "ferry-clone-" + hashlib.sha256(clone_name.encode()).hexdigest()[:32]


def _check_members(group: GroupSnapshotSpec, snapshot_ids: Sequence[str]) -> None:
    members = sorted(m.snapshot_id for m in group.members)
    if snapshot_ids and sorted(set(snapshot_ids)) != members:
        raise InvalidArgument(
            GROUP_MEMBERS_MISMATCH.format(group_id=group.group_id, members=", ".join(members))
        )
