"""A catalog outage is not the nodes' silence: readiness across a real etcd's death.

While etcd is down no heartbeat can land, so every node's record ages at
once. When it comes back, a node heard just before the outage must read
READY and not lost (placement and failover act on this), though its record
is older than ``--node-lost-after``; a node that was silent before the outage
stays silent. The same records read without the outages prove the outage
really was long enough to matter. DeleteSnapshot reads node loss the same way:
it waits for a node heard before the outage instead of leaving that node's
copy behind as a lost node's.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.controller.collector import Collector
from csi_driver.controller.readiness import CatalogOutages, NodeReadings
from csi_driver.controller.snapshots import SnapshotService
from csi_driver.core.errors import StoreUnavailable, Unavailable
from csi_driver.core.model import NodeRecord, Topology
from csi_driver.core.placement import NODE_KEY, ZONE_KEY, NodeReadiness
from csi_driver.core.records import SnapshotSpec, snapshot_spec_key
from csi_driver.node.agent import NodeAgent
from csi_driver.node.reconcile.images import ImageReconciler
from csi_driver.node.reconcile.snapshots import SnapshotReconciler
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import read
from csi_driver.store.url import open_store
from tests.controller.test_collector import _intend
from tests.node.conftest import requires_root
from tests.store.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

pytestmark = [pytest.mark.skipif(ETCD is None, reason=SKIP_REASON), pytest.mark.slow]

LOST_AFTER_S = 3.0  # stale after 2 s
SETTLE_S = 60.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path, 1).start()
    try:
        yield etcd
    finally:
        etcd.close()


def _register(catalog: Catalog, node_id: str, heard_at: float) -> None:
    topology = Topology.of({ZONE_KEY: "z1", NODE_KEY: node_id})
    catalog.register_node(NodeRecord(node_id, f"unix:///{node_id}", topology, 1 << 30, 0, heard_at))


def _outage(cluster: EtcdCluster, catalog: Catalog, down_s: float) -> None:
    """etcd killed for ``down_s``, restarted; returns once the catalog answers again."""
    cluster.kill_member(0, signal.SIGKILL)
    time.sleep(down_s)
    cluster.start_member(0)
    cluster.wait_healthy()
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            catalog.list_nodes()
            return
        except StoreUnavailable:
            assert time.monotonic() < deadline, "etcd did not come back"
            time.sleep(0.1)


def _readiness(readings: NodeReadings, node_id: str) -> NodeReadiness:
    node = readings.catalog.get_node(node_id)
    assert node is not None
    return readings.state(node, drained=False).readiness


def test_nodes_heard_before_an_outage_are_ready_when_the_catalog_returns(
    cluster: EtcdCluster,
) -> None:
    store = open_store(cluster.url)
    catalog = Catalog(store)
    outages = CatalogOutages(store, keep_s=LOST_AFTER_S, period_s=0.1)
    readings = NodeReadings(catalog, LOST_AFTER_S, outages=outages)
    blind = NodeReadings(catalog, LOST_AFTER_S)  # what the controller read before
    try:
        _register(catalog, "heard", time.time())
        _register(catalog, "silent", time.time() - 2.5)  # stale already
        outages.start()
        time.sleep(0.3)  # probed while up
        _outage(cluster, catalog, LOST_AFTER_S + 1.0)

        heard = _readiness(readings, "heard")
        assert _readiness(blind, "heard") is NodeReadiness.LEAVING
        assert heard is NodeReadiness.READY
        assert readings.lost("heard") is None
        assert blind.lost("heard") is not None
        assert _readiness(readings, "silent") is not NodeReadiness.READY
        # The outage is spent: silence counts again from the catalog's return.
        time.sleep(LOST_AFTER_S * 2 / 3 + 0.5)
        assert _readiness(readings, "heard") is not NodeReadiness.READY
    finally:
        outages.stop()
        store.close()


def test_an_outage_is_credited_only_where_it_overlaps_the_silence(cluster: EtcdCluster) -> None:
    store = open_store(cluster.url)
    outages = CatalogOutages(store, keep_s=LOST_AFTER_S, period_s=0.1)
    try:
        outages.probe()
        before = time.time()
        cluster.kill_member(0, signal.SIGKILL)
        outages.probe()  # fails: an outage since the last answer, still going
        time.sleep(0.5)
        during = time.time()
        assert outages.unobserved(before - 10, during) >= 0.5
        assert outages.unobserved(during, during + 1) == pytest.approx(1.0)
        cluster.start_member(0)
        cluster.wait_healthy()
        deadline = time.monotonic() + SETTLE_S
        while outages.unobserved(time.time(), time.time() + 1) > 0:
            assert time.monotonic() < deadline, "the outage never ended"
            outages.probe()
            time.sleep(0.05)
        ended = time.time()
        assert outages.unobserved(before - 10, before - 5) == 0
        assert 0.5 <= outages.unobserved(before - 10, ended) <= ended - before + 0.2
    finally:
        store.close()


@requires_root
def test_a_snapshot_delete_waits_for_a_node_heard_before_an_outage(
    cluster: EtcdCluster, agent: NodeAgent
) -> None:
    """Past the outage node-a's record is older than the loss delay, but node-a was
    heard just before it: DeleteSnapshot must wait for node-a to delete its copy
    (UNAVAILABLE until it has), not skip it as a lost node's and answer OK while the
    copy is still on disk."""
    lost_after_s = 5.0  # leaves the delete time to run once etcd is back
    store = open_store(cluster.url)
    catalog = Catalog(store)
    outages = CatalogOutages(store, keep_s=lost_after_s, period_s=0.1)
    readings = NodeReadings(catalog, lost_after_s, outages=outages)
    service = SnapshotService(catalog, wait_s=1.0, readings=readings)
    try:
        with store.election("controller", "leader-a") as leading:
            assert leading.campaign(timeout=10)
            volume = _intend(catalog, 21)
            ImageReconciler(store, agent)(volume.volume_id)
            Collector(catalog, leading.fence).sweep()  # the volume is READY
        _register(catalog, "node-a", time.time())
        node = SnapshotReconciler(store, agent)
        snapshot_id = service.create("nightly", volume.volume_id, acknowledge=True).snapshot_id
        node(snapshot_id)
        assert service.get(snapshot_id).ready
        outages.start()
        time.sleep(0.3)  # probed while up
        _outage(cluster, catalog, lost_after_s + 1.0)
        heard = catalog.get_node("node-a")
        assert heard is not None and time.time() - heard.heartbeat_at > lost_after_s

        with pytest.raises(Unavailable, match="node node-a"):
            service.delete(snapshot_id)  # node-a has not acted yet: it is waited for
        assert agent.snapshots.get(snapshot_id) is not None
        node(snapshot_id)  # node-a deletes its copy and reports it
        service.delete(snapshot_id)
        assert agent.snapshots.get(snapshot_id) is None
        assert read(store, SnapshotSpec, snapshot_spec_key("node-a", snapshot_id)) is None
    finally:
        outages.stop()
        store.close()
