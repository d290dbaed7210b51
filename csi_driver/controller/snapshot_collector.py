"""The leader's collector for snapshot intents orphaned by a crash.

CreateSnapshot writes its intent (``awaiting_caller`` set), and the node
takes the snapshot whether or not anyone is still waiting. When the call
dies and its caller never asks again (the VolumeSnapshot was deleted
meanwhile, or a CreateVolume clone was abandoned), the snapshot holds pool
space that no Kubernetes object names. As for volumes (:mod:`.collector`),
the collector settles what the node reported:

- a snapshot still ``awaiting_caller`` after ``grace_s`` whose node refused
  it for good: its records (spec, status, index, name) go in one txn;
- one the node took: it is marked deleted, so the node deletes its file,
  then its records go once the node reports DELETED;
- a deleted snapshot whose node reported DELETED (a DeleteSnapshot that
  died waiting): its records go;
- a snapshot's copy on a replica's node is marked deleted with its home
  spec, and its records go once its node reported DELETED (also the copies
  a DeleteSnapshot left marked on a node that was lost then).

Records that go release their node's snapshot charge in the same txn.

Invariants: a snapshot a CreateSnapshot returned (``awaiting_caller``
cleared), a group member (its group owns it), and one that an image spec
names as its source (a clone or restore in progress) are never collected;
every write compares the spec's revision and carries the leader's fence, so
a concurrent call or a newer leader wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from csi_driver.controller.snapshot_space import charge_snapshots
from csi_driver.core.errors import Conflict
from csi_driver.core.records import (
    SNAPSHOT_SPECS,
    ImagePhase,
    ImageSpec,
    SnapshotSpec,
    SnapshotStatus,
    answers,
    revise,
    snapshot_index_key,
    snapshot_name_key,
)
from csi_driver.store.base import Compare, Delete, Put
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import Versioned, from_stored, put, read

log = logging.getLogger(__name__)

#: Longer than the external-snapshotter's retry backoff (at most 5 minutes) and a
#: CreateVolume clone's pull: an intent this old with no caller has none.
DEFAULT_GRACE_S = 900.0

Txn = Callable[[Sequence[Compare], Sequence[Put | Delete]], int]


def collect_snapshots(
    catalog: Catalog,
    txn: Txn,
    image_specs: Sequence[ImageSpec],
    now: float,
    grace_s: float = DEFAULT_GRACE_S,
) -> int:
    """One pass; returns how many orphaned snapshot intents it moved on."""
    store = catalog.store
    sources = {s.source.snapshot_id for s in image_specs if s.source is not None}
    done = 0
    stored = [f for f in (from_stored(SnapshotSpec, r) for r in store.list(SNAPSHOT_SPECS)) if f]
    copies: dict[str, list[Versioned[SnapshotSpec]]] = {}
    for found in stored:
        if found.value.copy_from:
            copies.setdefault(found.value.snapshot_id, []).append(found)
    for found in stored:
        spec = found.value
        if spec.copy_from:
            done += _collect_copy(catalog, txn, found)
            continue
        if spec.group_id or spec.snapshot_id in sources:
            continue
        if not spec.deleted and not (spec.awaiting_caller and now - spec.created_at > grace_s):
            continue
        status_read = read(store, SnapshotStatus, spec.status_key)
        status = status_read.value if status_read is not None else None
        settled = status is not None and answers(status, spec) and status.settled
        refused = settled and status is not None and status.phase is ImagePhase.FAILED
        same = Compare(spec.key, found.revision)
        where = {"snapshot": spec.snapshot_id, "node": spec.node_id}
        try:
            if spec.deleted or (refused and status is not None and status.reason.final):
                if spec.deleted and not (
                    settled and status is not None and status.phase is ImagePhase.DELETED
                ):
                    continue  # the node has not deleted it yet
                charges, released = charge_snapshots(
                    store, {spec.node_id: spec.size_bytes}, release=True
                )
                txn(
                    [same, *_name_owned(catalog, spec), *charges],
                    [*_forget(catalog, spec), *released],
                )
                log.info("orphaned snapshot records removed", extra=where)
            else:
                marked = [c for c in copies.get(spec.snapshot_id, []) if not c.value.deleted]
                txn(
                    [same, *(Compare(c.value.key, c.revision) for c in marked)],
                    [put(revise(s, deleted=True)) for s in [spec, *(c.value for c in marked)]],
                )
                log.info("orphaned snapshot marked deleted", extra=where)
        except Conflict:
            continue  # its caller (or a newer leader) moved it first
        done += 1
    return done


def _collect_copy(catalog: Catalog, txn: Txn, found: Versioned[SnapshotSpec]) -> int:
    """Drop a deleted copy's records once its node deleted it; 1 if it did."""
    spec = found.value
    if not spec.deleted:
        return 0
    status = read(catalog.store, SnapshotStatus, spec.status_key)
    if status is None or not answers(status.value, spec):
        return 0
    if status.value.phase is not ImagePhase.DELETED:
        return 0
    charges, released = charge_snapshots(
        catalog.store, {spec.node_id: spec.size_bytes}, release=True
    )
    try:
        txn(
            [Compare(spec.key, found.revision), *charges],
            [Delete(spec.key), Delete(spec.status_key), *released],
        )
    except Conflict:
        return 0
    log.info("deleted snapshot copy's records removed", extra={"snapshot": spec.snapshot_id})
    return 1


def _name_owned(catalog: Catalog, spec: SnapshotSpec) -> list[Compare]:
    owner = catalog.store.get(snapshot_name_key(spec.name))
    if owner is None or owner.value.decode() != spec.snapshot_id:
        return []
    return [Compare(snapshot_name_key(spec.name), owner.revision)]


def _forget(catalog: Catalog, spec: SnapshotSpec) -> list[Put | Delete]:
    ops: list[Put | Delete] = [
        Delete(spec.key),
        Delete(spec.status_key),
        Delete(snapshot_index_key(spec.snapshot_id)),
    ]
    if _name_owned(catalog, spec):
        ops.append(Delete(snapshot_name_key(spec.name)))
    return ops
