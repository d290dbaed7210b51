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
  died waiting): its records go.

Invariants: a snapshot a CreateSnapshot returned (``awaiting_caller``
cleared), a group member (its group owns it), and one that an image spec
names as its source (a clone or restore in progress) are never collected;
every write compares the spec's revision and carries the leader's fence, so
a concurrent call or a newer leader wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

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
from csi_driver.store.records import from_stored, put, read

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
    for record in store.list(SNAPSHOT_SPECS):
        found = from_stored(SnapshotSpec, record)
        if found is None:
            continue
        spec = found.value
        if spec.group_id or spec.snapshot_id in sources:
            continue
        if not spec.deleted and not (spec.awaiting_caller and now - spec.created_at > grace_s):
            continue
        status_read = read(store, SnapshotStatus, spec.status_key)
        status = status_read.value if status_read is not None else None
        settled = status is not None and answers(status, spec) and status.settled
        refused = settled and status is not None and status.phase is ImagePhase.FAILED
        same = Compare(spec.key, record.revision)
        where = {"snapshot": spec.snapshot_id, "node": spec.node_id}
        try:
            if spec.deleted or (refused and status is not None and status.reason.final):
                if spec.deleted and not (
                    settled and status is not None and status.phase is ImagePhase.DELETED
                ):
                    continue  # the node has not deleted it yet
                txn([same, *_name_owned(catalog, spec)], _forget(catalog, spec))
                log.info("orphaned snapshot records removed", extra=where)
            else:
                txn([same], [put(revise(spec, deleted=True))])
                log.info("orphaned snapshot marked deleted", extra=where)
        except Conflict:
            continue  # its caller (or a newer leader) moved it first
        done += 1
    return done


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
