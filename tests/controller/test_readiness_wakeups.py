"""A node's readiness change wakes the replication reconciler, on a real SQLite catalog.

Drains, returns, silence past the thresholds and removed registrations are
noticed per node (:class:`~csi_driver.controller.readiness.ReadinessChanges`),
and each wakes only the volumes it concerns
(:class:`~csi_driver.controller.replication.NodeWakeups`): the ones with a
copy on the node, and, when it became ready, the ones left short of replicas.
The last test runs the leader's real runner threads over the catalog's watch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from csi_driver.controller.images import ImageIntents
from csi_driver.controller.readiness import NodeReadings, ReadinessChanges
from csi_driver.controller.replication import (
    NodeWakeups,
    ReplicationReconciler,
    replication_runners,
)
from csi_driver.core.model import AccessType, FsType, MiB, NodeRecord, Topology, Volume, VolumeState
from csi_driver.core.placement import NODE_KEY, ZONE_KEY, NodeReadiness
from csi_driver.core.records import (
    DRAIN_SPECS,
    DrainSpec,
    ImageRole,
    ImageSpec,
    drain_spec_key,
    image_spec_key,
)
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.queue import WorkQueue
from csi_driver.store.catalog import NODES, Catalog
from csi_driver.store.records import put
from csi_driver.store.sqlite import SqliteStore

NOW = 1_800_000_000.0
LOST_AFTER_S = 30.0
MIRRORED = "vol-" + "a1" * 16  # primary on n1, replica on n2
SHORT = "vol-" + "b2" * 16  # primary on n1, wants a replica
READY, NOT_READY, LEAVING = NodeReadiness.READY, NodeReadiness.NOT_READY, NodeReadiness.LEAVING


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _volume(volume_id: str, replicas: int) -> Volume:
    return Volume(
        volume_id,
        f"pvc-{volume_id[-4:]}",
        16 * MiB,
        AccessType.MOUNT,
        FsType.EXT4,
        "n1",
        1,
        VolumeState.READY,
        parameters=(("replicas", str(replicas)),),
    )


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    store = SqliteStore(tmp_path / "catalog.db")
    catalog = Catalog(store)
    for node in ("n1", "n2", "n3"):
        topology = Topology.of({ZONE_KEY: "z1", NODE_KEY: node})
        catalog.register_node(NodeRecord(node, f"unix:///{node}", topology, 1 << 30, 0, NOW))
    catalog.put_volume(_volume(MIRRORED, 1))
    catalog.put_volume(_volume(SHORT, 1))
    replica = ImageSpec(MIRRORED, "n2", 16 * MiB, 1, role=ImageRole.REPLICA, source_node="n1")
    store.txn(
        [],
        [
            put(ImageSpec(MIRRORED, "n1", 16 * MiB, 1)),
            put(replica),
            put(ImageSpec(SHORT, "n1", 16 * MiB, 1)),
        ],
    )
    try:
        yield catalog
    finally:
        store.close()


def _drain(catalog: Catalog, node: str) -> None:
    catalog.store.txn([], [put(DrainSpec(node, NOW))])


def _queued(queue: WorkQueue) -> set[str]:
    found = set()
    while (key := queue.get(timeout=0)) is not None:
        found.add(key)
        queue.done(key)
    return found


def test_each_node_change_is_told_once_and_silence_is_timed(catalog: Catalog) -> None:
    clock = Clock()
    readings = NodeReadings(catalog, LOST_AFTER_S, clock=clock)
    drains = Informer(catalog.store, DRAIN_SPECS)
    drains.start()
    told: list[tuple[str, NodeReadiness | None, NodeReadiness]] = []
    changes = ReadinessChanges(readings, drains, lambda *change: told.append(change))
    try:
        assert drains.wait_synced(30)
        # Seen first: told, and asked to run again just as it would turn stale.
        again = changes("n2")
        assert told == [("n2", None, READY)]
        assert again == pytest.approx(LOST_AFTER_S * 2 / 3 + 0.05)
        assert changes("n2") is not None and len(told) == 1  # a heartbeat: no change

        clock.now = NOW + LOST_AFTER_S * 2 / 3 + 0.1  # silent: stale
        assert changes("n2") == pytest.approx(LOST_AFTER_S / 3 - 0.1 + 0.05)
        clock.now = NOW + LOST_AFTER_S + 0.1  # silent past --node-lost-after: lost
        assert changes("n2") is None  # nothing more can change by silence
        assert told[1:] == [("n2", READY, NOT_READY), ("n2", NOT_READY, LEAVING)]

        clock.now = NOW
        changes("n1")
        _drain(catalog, "n1")
        _wait_for(lambda: drains.get(drain_spec_key("n1")) is not None)
        changes("n1")
        changes("n3")
        catalog.store.delete(NODES + "n3")  # removed by an operator
        changes("n3")
        assert told[3:] == [
            ("n1", None, READY),
            ("n1", READY, LEAVING),
            ("n3", None, READY),
            ("n3", READY, LEAVING),
        ]
    finally:
        drains.stop()


def _readiness_passes() -> float:
    """Passes of the node-readiness runner so far (each asks to run again: requeue)."""
    sample = REGISTRY.get_sample_value(
        "ferry_reconcile_total", {"runner": "node-readiness", "result": "requeue"}
    )
    return sample or 0.0


def _wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    """A condition, with a generous ceiling (never a timing assertion)."""
    ends = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < ends, "not within the ceiling"
        time.sleep(0.02)


def test_a_change_wakes_the_volumes_on_the_node_and_a_ready_one_the_short_ones(
    catalog: Catalog,
) -> None:
    readings = NodeReadings(catalog, LOST_AFTER_S, clock=Clock())
    reconciler = ReplicationReconciler(catalog, ImageIntents(catalog), readings=readings)
    _drain(catalog, "n2")
    _drain(catalog, "n3")
    # SHORT wants a replica and every other node is drained: none placed, it is short.
    reconciler(SHORT)
    assert catalog.store.get(image_spec_key("n2", SHORT)) is None
    assert reconciler.degraded() == [SHORT]
    queue = WorkQueue()
    wake = NodeWakeups(catalog, reconciler, queue)

    wake("n3", READY, LEAVING)  # holds no copy: nothing to re-plan
    assert _queued(queue) == set()
    wake("n2", READY, LEAVING)  # MIRRORED's replica must move
    assert _queued(queue) == {MIRRORED}
    wake("n3", None, READY)  # a node just registered: the short volumes may use it
    assert _queued(queue) == {SHORT}
    wake("n2", LEAVING, READY)  # undrained: both
    assert _queued(queue) == {MIRRORED, SHORT}

    catalog.store.delete(drain_spec_key("n3"))
    reconciler(SHORT)  # what the wake leads to: the replica placed, no longer short
    spec = catalog.store.get(image_spec_key("n3", SHORT))
    assert spec is not None and reconciler.degraded() == []


def test_the_leaders_runners_wake_replication_when_a_node_is_drained(catalog: Catalog) -> None:
    readings = NodeReadings(catalog, LOST_AFTER_S)  # the real clock: every node beat just now
    for node in ("n1", "n2", "n3"):
        catalog.heartbeat(node, time.time())
    replication, watch = replication_runners(catalog, ImageIntents(catalog), readings=readings)
    passes = _readiness_passes()
    watch.start()  # replication itself is not started: its queue shows what was woken
    try:
        _wait_for(lambda: _readiness_passes() >= passes + 3)  # each node seen once
        assert _queued(replication.queue) == set()  # first seen: nothing woken
        _drain(catalog, "n2")
        woken: set[str] = set()

        def woke() -> bool:
            woken.update(_queued(replication.queue))
            return MIRRORED in woken

        _wait_for(woke)
        assert woken == {MIRRORED}
    finally:
        watch.stop()
