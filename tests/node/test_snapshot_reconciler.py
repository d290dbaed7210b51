"""The node's snapshot reconciler on a real pool and a real catalog store.

What a crash or a lost file leaves behind is reconciled without ever
passing off two points in time, or a blank, as one snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.core.model import AccessType, FsType, MiB
from csi_driver.core.records import (
    FailureReason,
    GroupMember,
    GroupSnapshotSpec,
    GroupSnapshotStatus,
    ImagePhase,
    SnapshotSpec,
    SnapshotStatus,
    revise,
)
from csi_driver.node.agent import NodeAgent
from csi_driver.node.reconcile.snapshots import SnapshotReconciler
from csi_driver.store.records import put, read
from csi_driver.store.sqlite import SqliteStore
from tests.node.conftest import new_volume_id

SIZE = 8 * MiB
GROUP = "group-" + "9" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "catalog.db")
    yield s
    s.close()


def snapshot_spec(n: int, volume: int, group: str = "") -> SnapshotSpec:
    return SnapshotSpec(
        f"snap-{n:032x}",
        f"s{n}",
        "node-a",
        new_volume_id(volume),
        SIZE,
        AccessType.MOUNT,
        FsType.EXT4,
        group_id=group,
    )


def status_of(store: SqliteStore, spec: SnapshotSpec) -> SnapshotStatus | None:
    found = read(store, SnapshotStatus, spec.status_key)
    return found.value if found else None


def test_takes_then_deletes_and_never_retakes_a_lost_snapshot(
    store: SqliteStore, agent: NodeAgent
) -> None:
    reconcile = SnapshotReconciler(store, agent)
    agent.pool.create_image(new_volume_id(1), SIZE, 1)
    spec = snapshot_spec(1, 1)
    store.put(spec.key, put(spec).value)
    reconcile(spec.snapshot_id)
    status = status_of(store, spec)
    assert status is not None and status.phase is ImagePhase.READY
    assert status.size_bytes == SIZE and agent.snapshots.get(spec.snapshot_id) is not None
    reconcile(spec.snapshot_id)  # a resync changes nothing
    assert status_of(store, spec) == status

    agent.snapshots.delete(spec.snapshot_id)  # its bytes lost behind Ferry's back
    reconcile(spec.snapshot_id)
    lost = status_of(store, spec)
    assert lost is not None and (lost.phase, lost.reason) == (
        ImagePhase.FAILED,
        FailureReason.SOURCE_MISSING,
    )
    assert agent.snapshots.get(spec.snapshot_id) is None  # not retaken at a later time

    doomed = revise(spec, deleted=True)
    store.put(doomed.key, put(doomed).value)
    reconcile(spec.snapshot_id)
    gone = status_of(store, spec)
    assert gone is not None and (gone.phase, gone.observed_generation) == (ImagePhase.DELETED, 2)


def test_a_snapshot_of_a_missing_volume_is_refused_once(
    store: SqliteStore, agent: NodeAgent
) -> None:
    spec = snapshot_spec(2, 7)
    store.put(spec.key, put(spec).value)
    reconcile = SnapshotReconciler(store, agent)
    reconcile(spec.snapshot_id)
    status = status_of(store, spec)
    assert status is not None and status.reason is FailureReason.SOURCE_MISSING
    # A final refusal stands for its generation: a resync does not take it later.
    agent.pool.create_image(new_volume_id(7), SIZE, 1)
    reconcile(spec.snapshot_id)
    assert status_of(store, spec) == status and agent.snapshots.get(spec.snapshot_id) is None


def test_a_half_taken_group_is_taken_again_whole(store: SqliteStore, agent: NodeAgent) -> None:
    members = [snapshot_spec(10 + i, i, GROUP) for i in range(1, 4)]
    for member in members:
        agent.pool.create_image(member.source_volume_id, SIZE, 1)
        store.put(member.key, put(member).value)
    group = GroupSnapshotSpec(
        GROUP,
        "g",
        "node-a",
        tuple(GroupMember(m.snapshot_id, m.source_volume_id) for m in members),
    )
    store.put(group.key, put(group).value)
    # A crash after the first member was taken, before the others were.
    early = agent.snapshots.take(
        members[0].snapshot_id,
        members[0].source_volume_id,
        agent.pool.image_path(members[0].source_volume_id),
    )
    reconcile = SnapshotReconciler(store, agent)
    for member in members:  # members wait for their group
        reconcile(member.snapshot_id)
        assert status_of(store, member) is None
    reconcile(GROUP)
    found = read(store, GroupSnapshotStatus, group.status_key)
    assert found is not None and found.value.phase is ImagePhase.READY
    statuses = [status_of(store, m) for m in members]
    assert all(s is not None and s.phase is ImagePhase.READY for s in statuses)
    taken = [s.taken_at for s in statuses if s is not None]
    assert taken[0] > early.taken_at  # the early member was taken again, with its peers
    assert max(taken) - min(taken) < 5.0
    assert found.value.taken_at == min(taken)
    for member in members:  # the members' own passes now agree with the group's
        reconcile(member.snapshot_id)
    assert [status_of(store, m) for m in members] == statuses
