"""Snapshots travel with their volume's replicas, and take pool space, in one process.

Two real node services (node-a all-in-one with the controller, node-b on its
own socket) share one SQLite catalog and pull chunks from each other over
real gRPC unix sockets. A snapshot of a volume with a replica on node-b is
copied there as a delta against the replica, listed as held on both nodes,
charged to both nodes' accounting, and deleted on both. Images are written
as files (unstaged volumes need no loop device).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from csi_driver.controller.snapshot_collector import collect_snapshots
from csi_driver.controller.snapshots import SnapshotService
from csi_driver.core.model import MiB
from csi_driver.core.records import (
    ImageStatus,
    SnapshotMethod,
    SnapshotSpec,
    SnapshotStatus,
    image_status_key,
    snapshot_spec_key,
    snapshot_status_key,
)
from csi_driver.csi.client import block_capability
from csi_driver.gen import csi_pb2
from csi_driver.runtime import NodeConfig, Services, start_node
from csi_driver.store.base import Compare, Delete, Put
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import read
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import NODE_ID, Ferry, expect_code, node_config, running
from tests.csi.test_clones import on_node, two_nodes
from tests.csi.test_controller import create_request
from tests.csi.test_mobility import _scribble
from tests.csi.test_snapshots import from_snapshot

SECOND = "node-b"
__all__ = ["two_nodes"]  # the fixture
SIZE = 32 * MiB


@pytest.fixture
def catalog(two_nodes: Ferry) -> Iterator[Catalog]:
    store = SqliteStore(two_nodes.catalog)
    try:
        yield Catalog(store)
    finally:
        store.close()


def _eventually(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    ends = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < ends, f"{what} not within {timeout} s"
        time.sleep(0.1)


def _pool(ferry: Ferry, node: str) -> Path:
    return ferry.base / node / "pool"


def _received() -> float:
    return REGISTRY.get_sample_value("ferry_transfer_bytes_total", {"direction": "received"}) or 0


def _snapshot_bytes(catalog: Catalog, node: str) -> int:
    account = catalog.account(node)
    return account.value.snapshot_bytes if account is not None else 0


def test_a_snapshot_is_copied_to_the_replica_as_a_delta_and_deleted_everywhere(
    two_nodes: Ferry, catalog: Catalog
) -> None:
    ferry = two_nodes
    created = ferry.create("db", SIZE, block_capability(), parameters={"replicas": "1"})
    volume_id = created.volume_id
    image = _pool(ferry, NODE_ID) / "images" / f"{volume_id}.img"
    _scribble(image, [0, 8 * MiB, 16 * MiB, 24 * MiB], b"before the replica")

    def replica_synced() -> bool:
        found = read(catalog.store, ImageStatus, image_status_key(SECOND, volume_id))
        return found is not None and bool(found.value.synced_transfer)

    _eventually(replica_synced, "node-b's replica synced")
    _scribble(image, [9 * MiB], b"after the replica")  # one chunk the replica lacks
    point_in_time = hashlib.sha256(image.read_bytes()).hexdigest()
    received = _received()

    taken = ferry.client.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="nightly", source_volume_id=volume_id)
    ).snapshot
    assert taken.ready_to_use
    snapshot_id = taken.snapshot_id
    _scribble(image, [20 * MiB], b"after the snapshot")
    service = SnapshotService(catalog)
    _eventually(lambda: service.get(snapshot_id).nodes == (NODE_ID, SECOND), "the copy on node-b")

    copy = _pool(ferry, SECOND) / "snapshots" / f"{snapshot_id}.img"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == point_in_time
    # Only the 64 KiB block the replica did not hold travelled (by block digests
    # against the replica's generation), not the snapshot's five data chunks.
    assert _received() - received == MiB // 16
    status = read(catalog.store, SnapshotStatus, snapshot_status_key(SECOND, snapshot_id))
    assert status is not None and status.value.method is SnapshotMethod.PULLED
    home = read(catalog.store, SnapshotStatus, snapshot_status_key(NODE_ID, snapshot_id))
    assert home is not None and status.value.taken_at == home.value.taken_at
    assert not (_pool(ferry, SECOND) / "incoming" / snapshot_id).exists()
    # Both copies are charged where they are held; one listing entry for the snapshot.
    assert (_snapshot_bytes(catalog, NODE_ID), _snapshot_bytes(catalog, SECOND)) == (SIZE, SIZE)
    listed = ferry.client.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=volume_id)
    )
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snapshot_id]
    assert [v.nodes for v in service.list("", volume_id, 0, "")[0]] == [(NODE_ID, SECOND)]

    ferry.client.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))

    assert not copy.exists()
    assert not (_pool(ferry, NODE_ID) / "snapshots" / f"{snapshot_id}.img").exists()
    for node in (NODE_ID, SECOND):
        assert read(catalog.store, SnapshotSpec, snapshot_spec_key(node, snapshot_id)) is None
        assert _snapshot_bytes(catalog, node) == 0
    expect_code(
        grpc.StatusCode.NOT_FOUND,
        ferry.client.controller.GetSnapshot,
        csi_pb2.GetSnapshotRequest(snapshot_id=snapshot_id),
    )


def test_snapshots_take_their_size_from_capacity_and_placement(tmp_path: Path) -> None:
    """A snapshot may come to hold every block of its volume (copy on write), so
    GetCapacity and CreateVolume never promise that space away; deleting it frees it."""
    with running(tmp_path, node_config(tmp_path, capacity=128 * MiB)) as ferry:
        controller = ferry.client.controller

        def available() -> tuple[int, int]:
            reply = controller.GetCapacity(csi_pb2.GetCapacityRequest())
            return reply.available_capacity, reply.maximum_volume_size.value

        volume = ferry.create("db", 48 * MiB, block_capability())
        assert available() == (80 * MiB, 80 * MiB)
        snapshot = controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="nightly", source_volume_id=volume.volume_id)
        ).snapshot
        assert available() == (32 * MiB, 32 * MiB)
        details = expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            controller.CreateVolume,
            create_request("would-fit-without-the-snapshot", 48 * MiB),
        )
        assert f"most free: {32 * MiB} bytes" in details
        expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            controller.ControllerExpandVolume,
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=96 * MiB),
            ),
        )
        controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
        assert available() == (80 * MiB, 80 * MiB)
        ferry.create("fits-again", 48 * MiB, block_capability())


@dataclass
class Pair:
    """node-a (all-in-one) and node-b, which the test may stop and start again."""

    ferry: Ferry
    catalog: Catalog
    config_b: NodeConfig
    node_b: Services | None = None

    def start_b(self) -> None:
        socket = f"unix://{self.ferry.base}/csi-b.sock"
        self.node_b = start_node(socket, self.config_b, self.ferry.catalog)

    def stop_b(self) -> None:
        if self.node_b is not None:
            self.node_b.stop(grace_s=0)
            self.node_b = None


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    config_a = replace(node_config(tmp_path), chunk_endpoint=f"unix://{tmp_path}/a-chunks.sock")
    config_b = replace(
        node_config(tmp_path, SECOND), chunk_endpoint=f"unix://{tmp_path}/b-chunks.sock"
    )
    with running(tmp_path, config_a) as ferry:
        store = SqliteStore(ferry.catalog)
        both = Pair(ferry, Catalog(store), config_b)
        try:
            both.start_b()
            yield both
        finally:
            both.stop_b()
            store.close()


def test_a_copy_on_a_lost_node_is_deleted_when_it_returns(pair: Pair) -> None:
    """DeleteSnapshot does not wait for a lost node: its copy stays marked deleted,
    the node deletes the file when it is back, and the collector drops the records."""
    ferry, catalog = pair.ferry, pair.catalog
    volume_id = ferry.create("db", SIZE, block_capability(), parameters={"replicas": "1"}).volume_id
    _eventually(
        lambda: read(catalog.store, ImageStatus, image_status_key(SECOND, volume_id)) is not None,
        "node-b's replica",
    )
    snapshot_id = ferry.client.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="nightly", source_volume_id=volume_id)
    ).snapshot.snapshot_id
    service = SnapshotService(catalog, wait_s=5)
    _eventually(lambda: service.get(snapshot_id).nodes == (NODE_ID, SECOND), "the copy")
    copy = _pool(ferry, SECOND) / "snapshots" / f"{snapshot_id}.img"
    assert copy.exists()
    pair.stop_b()
    # Silent for a minute: lost (NODE_LOST_AFTER_S) as failover would declare it.
    catalog.heartbeat(SECOND, time.time() - 60)

    service.delete(snapshot_id)

    assert _snapshot_bytes(catalog, NODE_ID) == 0
    tombstone = read(catalog.store, SnapshotSpec, snapshot_spec_key(SECOND, snapshot_id))
    assert tombstone is not None and tombstone.value.deleted
    assert _snapshot_bytes(catalog, SECOND) == SIZE  # until its node deleted the copy
    assert copy.exists()

    def txn(compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> int:
        return catalog.store.txn(compares, ops)

    assert collect_snapshots(catalog, txn, [], time.time()) == 0  # not deleted there yet
    pair.start_b()
    _eventually(lambda: not copy.exists(), "node-b deleting its copy once back")
    _eventually(
        lambda: collect_snapshots(catalog, txn, [], time.time()) == 1, "the records dropped"
    )
    assert read(catalog.store, SnapshotSpec, snapshot_spec_key(SECOND, snapshot_id)) is None
    assert _snapshot_bytes(catalog, SECOND) == 0


def test_a_restore_pulls_from_a_copy_when_the_home_cannot_serve(pair: Pair) -> None:
    """The home is registered and heartbeating but its chunk endpoint answers nothing
    (a partition, a crashed chunk server): a restore on a third node pulls the
    snapshot from the replica node's copy instead, verified."""
    ferry, catalog = pair.ferry, pair.catalog
    volume_id = ferry.create("db", SIZE, block_capability(), parameters={"replicas": "1"}).volume_id
    image = _pool(ferry, NODE_ID) / "images" / f"{volume_id}.img"
    _scribble(image, [0, 12 * MiB, 28 * MiB], b"the point in time")
    point_in_time = hashlib.sha256(image.read_bytes()).hexdigest()
    snapshot_id = ferry.client.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="nightly", source_volume_id=volume_id)
    ).snapshot.snapshot_id
    service = SnapshotService(catalog)
    _eventually(lambda: service.get(snapshot_id).nodes == (NODE_ID, SECOND), "the copy")
    home = catalog.get_node(NODE_ID)
    assert home is not None
    catalog.register_node(replace(home, chunk_endpoint=f"unix://{ferry.base}/nobody.sock"))
    config_c = replace(
        node_config(ferry.base, "node-c"), chunk_endpoint=f"unix://{ferry.base}/c-chunks.sock"
    )
    node_c = start_node(f"unix://{ferry.base}/csi-c.sock", config_c, ferry.catalog)
    try:
        request = from_snapshot("restored", snapshot_id, size=SIZE)
        request.volume_capabilities[0].CopyFrom(block_capability())
        restored = ferry.client.controller.CreateVolume(
            on_node(request, "node-c"), timeout=60
        ).volume
        copy = _pool(ferry, "node-c") / "images" / f"{restored.volume_id}.img"
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == point_in_time
    finally:
        node_c.stop(grace_s=0)
