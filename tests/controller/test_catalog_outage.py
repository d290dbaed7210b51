"""A catalog outage is not the nodes' silence: readiness across a real etcd's death.

While etcd is down no heartbeat can land, so every node's record ages at
once. When it comes back, a node heard just before the outage must read
READY and not lost (placement and failover act on this), though its record
is older than ``--node-lost-after``; a node that was silent before the outage
stays silent. The same records read without the outages prove the outage
really was long enough to matter.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.controller.readiness import CatalogOutages, NodeReadings
from csi_driver.core.errors import StoreUnavailable
from csi_driver.core.model import NodeRecord, Topology
from csi_driver.core.placement import NODE_KEY, ZONE_KEY, NodeReadiness
from csi_driver.store.catalog import Catalog
from csi_driver.store.url import open_store
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
        cluster.kill_member(0, signal.SIGKILL)
        time.sleep(LOST_AFTER_S + 1.0)
        cluster.start_member(0)
        cluster.wait_healthy()

        deadline = time.monotonic() + SETTLE_S
        while True:  # the store answers the readings again
            try:
                heard = _readiness(readings, "heard")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "etcd did not come back"
                time.sleep(0.1)
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
