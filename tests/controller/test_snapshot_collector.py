"""The leader's collector and snapshot intents orphaned by a crash.

A CreateSnapshot's intent is written by the controller's own code
(``SnapshotService``) and its call then gives up before the node answers,
as a killed controller leaves it; the node's real snapshot reconciler takes
and deletes the file in a real pool; the collector removes what no caller
received once its grace has passed, and never a snapshot a CreateSnapshot
returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from csi_driver.controller.collector import Collector, Sweep
from csi_driver.controller.snapshots import SnapshotService
from csi_driver.core.model import Volume
from csi_driver.core.records import SnapshotSpec, snapshot_name_key
from csi_driver.node.agent import NodeAgent
from csi_driver.node.reconcile.images import ImageReconciler
from csi_driver.node.reconcile.snapshots import SnapshotReconciler
from csi_driver.store.catalog import Catalog
from csi_driver.store.leader import LeaderElection
from csi_driver.store.records import read
from tests.controller.test_collector import _intend, catalog, election

__all__ = ["catalog", "election"]  # the collector tests' catalog and leadership fixtures

GRACE_S = 60.0


@dataclass
class Scene:
    """A READY volume, its controller's snapshot service and a collector on a clock the
    test moves forward (the grace is measured against it)."""

    now: list[float]
    collector: Collector
    service: SnapshotService
    volume: Volume


@pytest.fixture
def scene(catalog: Catalog, election: LeaderElection, agent: NodeAgent) -> Scene:
    now = [time.time()]
    collector = Collector(catalog, election.fence, clock=lambda: now[0], snapshot_grace_s=GRACE_S)
    volume = _intend(catalog, 11)
    ImageReconciler(catalog.store, agent)(volume.volume_id)
    collector.sweep()  # the volume is READY
    return Scene(now, collector, SnapshotService(catalog, wait_s=0.3), volume)


def test_a_snapshot_nobody_received_is_collected_after_its_grace(
    catalog: Catalog, scene: Scene, agent: NodeAgent
) -> None:
    now, collector, service, volume = scene.now, scene.collector, scene.service, scene.volume
    orphan = service.create("snap-orphan", volume.volume_id)  # its caller died waiting
    kept = service.create("snap-kept", volume.volume_id, acknowledge=True)
    assert not orphan.ready
    node = SnapshotReconciler(catalog.store, agent)
    node(orphan.snapshot_id)
    node(kept.snapshot_id)
    assert agent.snapshots.get(orphan.snapshot_id) is not None

    assert collector.sweep() == Sweep()  # within the grace: its caller may still ask
    now[0] += GRACE_S + 1
    assert collector.sweep() == Sweep(snapshots=1)  # marked deleted
    node(orphan.snapshot_id)  # the node deletes its file and reports DELETED
    assert agent.snapshots.get(orphan.snapshot_id) is None
    assert collector.sweep() == Sweep(snapshots=1)  # its records go
    assert catalog.store.get(snapshot_name_key("snap-orphan")) is None
    assert service.list(orphan.snapshot_id, "", 0, "")[0] == []
    assert collector.sweep() == Sweep()
    # The one a CreateSnapshot returned is never touched.
    assert service.get(kept.snapshot_id).ready
    spec = read(catalog.store, SnapshotSpec, f"spec/snapshots/node-a/{kept.snapshot_id}")
    assert spec is not None and not spec.value.awaiting_caller and not spec.value.deleted


def test_a_refused_snapshot_left_by_a_dead_call_leaves_nothing(
    catalog: Catalog, scene: Scene, agent: NodeAgent
) -> None:
    now, collector, service, volume = scene.now, scene.collector, scene.service, scene.volume
    refused = service.create("snap-refused", volume.volume_id, {"backup": "true"})
    SnapshotReconciler(catalog.store, agent)(refused.snapshot_id)  # no backup target: final
    now[0] += GRACE_S + 1
    assert collector.sweep() == Sweep(snapshots=1)
    assert catalog.store.get(snapshot_name_key("snap-refused")) is None
    assert service.list("", "", 0, "") == ([], "")
