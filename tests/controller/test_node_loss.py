"""Node readiness as an input to failover, on a real SQLite catalog.

The failover reconciler decides from records (the volume, its images, the
replica's last sync, the nodes' heartbeats) and from what Kubernetes says of
the primary's Node, read through :mod:`csi_driver.kube.nodes`' pure rules.
The Kubernetes side enters as the :class:`~csi_driver.kube.nodes.NodeState`
that a Node with the out-of-service taint (or NotReady) reads as, which is
exactly what :class:`csi_driver.kube.api.KubeNodes` returns in a cluster
(tested against one in tests/kube/test_api.py where KUBECONFIG reaches it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from csi_driver.controller.failover import FailoverReconciler
from csi_driver.controller.images import ImageIntents
from csi_driver.controller.readiness import NodeReadings
from csi_driver.core.model import (
    AccessType,
    FsType,
    MiB,
    NodeRecord,
    Topology,
    Volume,
    VolumeState,
)
from csi_driver.core.records import (
    FENCE_STATUSES,
    FailoverStatus,
    FenceStatus,
    ImagePhase,
    ImageRole,
    ImageSpec,
    ImageStatus,
    encode,
    failover_status_key,
    fence_status_key,
    image_spec_key,
)
from csi_driver.kube.nodes import NodeFacts, NodeState, Taint, readiness
from csi_driver.reconcile.informer import Informer
from csi_driver.store.catalog import NODES, VOLUMES, Catalog, node_from_json
from csi_driver.store.records import put, read
from csi_driver.store.sqlite import SqliteStore

NOW = 1_800_000_000.0
LOST_AFTER_S = 30.0
VOL = "vol-" + "ab" * 16
OUT_OF_SERVICE = readiness(
    NodeFacts(
        "node-1",
        "Unknown",
        taints=(Taint("node.kubernetes.io/out-of-service", "nodeshutdown", "NoExecute", NOW - 4),),
    )
)
NOT_READY = readiness(NodeFacts("node-1", "Unknown", NOW - 100))


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    store = SqliteStore(tmp_path / "catalog.db")
    catalog = Catalog(store)
    for node in ("node-1", "node-2"):
        catalog.register_node(
            NodeRecord(node, f"unix:///{node}", Topology.of({}), 1 << 30, 0, heartbeat_at=NOW - 1)
        )
    catalog.put_volume(
        Volume(
            VOL,
            "pvc-lost",
            32 * MiB,
            AccessType.MOUNT,
            FsType.EXT4,
            "node-1",
            1,
            VolumeState.READY,
            parameters=(("failoverPolicy", "promote"), ("replicas", "1")),
        )
    )
    replica = ImageSpec(VOL, "node-2", 32 * MiB, 1, role=ImageRole.REPLICA, source_node="node-1")
    synced = ImageStatus(
        VOL,
        "node-2",
        ImagePhase.READY,
        1,
        manifest_digest="d" * 64,
        synced_transfer=f"{VOL}-e1-r1",
        synced_captured_at=NOW - 9,
    )
    store.txn([], [put(ImageSpec(VOL, "node-1", 32 * MiB, 1)), put(replica), put(synced)])
    try:
        yield catalog
    finally:
        store.close()


@dataclass(frozen=True)
class Caches:
    """The failover runner's informers, read by the reconciler instead of the store."""

    fences: Informer
    volumes: Informer
    nodes: Informer

    def all(self) -> tuple[Informer, ...]:
        return (self.fences, self.volumes, self.nodes)


def _reconciler(
    catalog: Catalog, kube: NodeState | None, caches: Caches | None = None
) -> FailoverReconciler:
    def node_state(name: str) -> NodeState | None:
        return kube if name == "node-1" else None

    readings = NodeReadings(catalog, LOST_AFTER_S, node_state, clock=lambda: NOW)
    return FailoverReconciler(
        catalog,
        ImageIntents(catalog),
        LOST_AFTER_S,
        clock=lambda: NOW,
        readings=readings,
        fences=caches.fences if caches else None,
        volumes=caches.volumes if caches else None,
        nodes=caches.nodes if caches else None,
    )


@pytest.fixture(params=["store", "cache"])
def caches(request: pytest.FixtureRequest, catalog: Catalog) -> Iterator[Caches | None]:
    """Records read from the store, or from the failover runner's informers."""
    if request.param == "store":
        yield None
        return
    store = catalog.store
    started = Caches(
        Informer(store, FENCE_STATUSES, poll_s=0.05),
        Informer(store, VOLUMES, poll_s=0.05),
        Informer(store, NODES, poll_s=0.05),
    )
    for informer in started.all():
        informer.start()
        assert informer.wait_synced(10)
    yield started
    for informer in started.all():
        informer.stop()


def _caught_up(caches: Caches | None, key: str, revision: int) -> None:
    """Wait until the informer of ``key`` holds it at ``revision``."""
    if caches is None:
        return
    informer = next(i for i in caches.all() if key.startswith(i.prefix))
    deadline = time.monotonic() + 10
    while (cached := informer.get(key)) is None or cached.revision < revision:
        assert time.monotonic() < deadline, f"the informer never saw {key} at {revision}"
        time.sleep(0.01)


def _failovers() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("ferry_failover_duration_seconds_count") or 0.0
    total = REGISTRY.get_sample_value("ferry_failover_duration_seconds_sum") or 0.0
    return count, total


def test_an_out_of_service_node_is_failed_over_at_once(
    catalog: Catalog, caches: Caches | None
) -> None:
    count, total = _failovers()

    _reconciler(catalog, OUT_OF_SERVICE, caches)(VOL)  # node-1's agent beat a second ago

    volume = catalog.require_volume(VOL)
    assert (volume.primary_node, volume.epoch) == ("node-2", 2)
    record = read(catalog.store, FailoverStatus, failover_status_key(VOL))
    assert record is not None and (record.value.from_node, record.value.to_node) == (
        "node-1",
        "node-2",
    )
    old = read(catalog.store, ImageSpec, image_spec_key("node-1", VOL))
    assert old is not None and (old.value.role, old.value.keep_divergent) == (
        ImageRole.REPLICA,
        True,
    )
    # Timed from the taint (4 s before), not from the heartbeat.
    after_count, after_total = _failovers()
    assert after_count == count + 1 and after_total - total == pytest.approx(4.0)


@pytest.mark.parametrize("kube", [None, NOT_READY], ids=["no-cluster", "not-ready"])
def test_a_live_agent_is_not_failed_over_without_the_operator(
    catalog: Catalog, kube: NodeState | None, caches: Caches | None
) -> None:
    # A NotReady kubelet (or no cluster at all) with Ferry's agent still beating:
    # the data is reachable, so promoting would give up acknowledged writes.
    _reconciler(catalog, kube, caches)(VOL)
    volume = catalog.require_volume(VOL)
    assert (volume.primary_node, volume.epoch) == ("node-1", 1)
    assert catalog.store.get(failover_status_key(VOL)) is None


def test_a_fence_is_a_loss_until_the_node_is_heard_from_again(
    catalog: Catalog, caches: Caches | None
) -> None:
    # ControllerUnpublishVolume fenced the volume off node-1 (declared lost at NOW - 10);
    # node-1's agent has beaten since: it is back, and nothing fails over.
    fenced = FenceStatus(VOL, "node-1", 1, NOW - 10)
    key = fence_status_key(VOL)
    _caught_up(caches, key, catalog.store.put(key, encode(fenced)))
    _reconciler(catalog, None, caches)(VOL)
    assert catalog.require_volume(VOL).primary_node == "node-1"

    # Not heard from since (20 s of silence: not lost by heartbeat alone): the fence
    # is the loss, and the failover is timed from it.
    node = catalog.get_node("node-1")
    assert node is not None
    catalog.register_node(replace(node, heartbeat_at=NOW - 20))
    count, total = _failovers()
    _reconciler(catalog, None, caches)(VOL)
    volume = catalog.require_volume(VOL)
    assert (volume.primary_node, volume.epoch) == ("node-2", 2)
    after_count, after_total = _failovers()
    assert after_count == count + 1 and after_total - total == pytest.approx(10.0)


@pytest.mark.parametrize("caches", ["cache"], indirect=True)
def test_a_silent_node_in_a_stale_cache_is_not_lost_while_the_store_has_it_beating(
    catalog: Catalog, caches: Caches
) -> None:
    """A cache shows a node alive only if it is (heartbeats only move forward); one
    that shows it silent may trail the store, so the store decides."""
    node = catalog.get_node("node-1")
    assert node is not None
    catalog.register_node(replace(node, heartbeat_at=NOW - 100))
    _caught_up(caches, NODES + "node-1", catalog.store.revision())
    assert caches.nodes.stop()
    catalog.register_node(replace(node, heartbeat_at=NOW - 1))  # the stopped cache misses it
    cached = caches.nodes.get(NODES + "node-1")
    assert cached is not None and node_from_json(cached.value).heartbeat_at == NOW - 100
    _reconciler(catalog, None, caches)(VOL)
    assert catalog.require_volume(VOL).primary_node == "node-1"
    # Once the store has it silent too, the loss stands: the volume fails over.
    catalog.register_node(replace(node, heartbeat_at=NOW - 100))
    _reconciler(catalog, None, caches)(VOL)
    assert catalog.require_volume(VOL).primary_node == "node-2"
