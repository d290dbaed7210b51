"""CSI volumes on records: intent in one txn, the node's status, exact node accounting.

A controller and a node run as separate services sharing one SQLite catalog;
the node is stopped and started again to show that a controller RPC waits
for the node's status only within its deadline, keeps its intent, and that
the node's reconciler finishes the work when it comes back.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.model import MiB, VolumeState
from csi_driver.core.records import (
    FailureReason,
    ImagePhase,
    ImageStatus,
    NodeAccounting,
    node_accounting_key,
)
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.runtime import Services, start_controller, start_node
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import put, read
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import NODE_ID, expect_code, node_config

#: A deadline the node cannot meet while it is down; the wait must end with it.
SHORT_DEADLINE_S = 1.5


def _stopped(services: Services) -> None:
    """Stop for good, reconcilers included. ``stop`` closes nothing while any call of
    this process is still finishing (the controller's last reply, under load): a node
    "stopped" that way would go on reconciling. So it is asked again until it has."""
    deadline = time.monotonic() + 60
    while not services.stop(grace_s=0):
        assert time.monotonic() < deadline, "calls in flight never finished"


@dataclass
class Cluster:
    base: Path
    controller: Services
    client: CsiClient
    catalog: Catalog
    node: Services | None = None
    stopped: list[Services] = field(default_factory=list)

    def start_node(self) -> None:
        self.node = start_node(
            f"unix://{self.base}/node.sock", node_config(self.base), self.base / "catalog.db"
        )

    def stop_node(self) -> None:
        assert self.node is not None
        _stopped(self.node)
        self.node = None

    def create(self, name: str, size: int = 16 * MiB, timeout: float | None = None) -> Any:
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_capability()],
            parameters={"provisioning": "thin"},
        )
        return self.client.controller.CreateVolume(request, timeout=timeout).volume

    def accounting(self) -> NodeAccounting:
        found = read(self.catalog.store, NodeAccounting, node_accounting_key(NODE_ID))
        return found.value if found else NodeAccounting(NODE_ID)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    (tmp_path / "kubelet").mkdir()
    controller = start_controller(f"unix://{tmp_path}/controller.sock", tmp_path / "catalog.db")
    store = SqliteStore(tmp_path / "catalog.db")
    client = CsiClient(f"unix://{tmp_path}/controller.sock")
    cluster = Cluster(tmp_path, controller, client, Catalog(store))
    cluster.start_node()
    try:
        yield cluster
    finally:
        client.close()
        if cluster.node is not None:
            _stopped(cluster.node)
        _stopped(controller)
        store.close()


def _call(method: Callable[..., Any], timeout: float) -> Callable[[Any], Any]:
    return functools.partial(method, timeout=timeout)


def test_create_writes_volume_image_and_accounting_together(cluster: Cluster) -> None:
    first = cluster.create("pvc-1")
    second = cluster.create("pvc-2", size=32 * MiB)
    assert cluster.accounting() == NodeAccounting(NODE_ID, 48 * MiB, 2)
    image = cluster.catalog.read_image(NODE_ID, first.volume_id)
    assert image is not None and image.value.size_bytes == 16 * MiB and image.value.thin
    volume = cluster.catalog.read_volume(first.volume_id)
    assert volume is not None and volume.value.state is VolumeState.READY
    assert (cluster.base / NODE_ID / "pool" / "images" / f"{second.volume_id}.img").exists()
    assert cluster.create("pvc-1").volume_id == first.volume_id  # a repeat charges nothing
    assert cluster.accounting() == NodeAccounting(NODE_ID, 48 * MiB, 2)


def test_expand_and_delete_keep_the_accounting_exact(cluster: Cluster) -> None:
    volume = cluster.create("pvc-1")
    cluster.client.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=40 * MiB),
        )
    )
    assert cluster.accounting() == NodeAccounting(NODE_ID, 40 * MiB, 1)
    image = cluster.catalog.read_image(NODE_ID, volume.volume_id)
    assert image is not None and (image.value.size_bytes, image.value.generation) == (40 * MiB, 2)
    cluster.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert cluster.accounting() == NodeAccounting(NODE_ID, 0, 0)
    assert cluster.catalog.read_image(NODE_ID, volume.volume_id) is None
    assert cluster.catalog.volume_id_for_name("pvc-1") is None
    assert not (cluster.base / NODE_ID / "pool" / "images" / f"{volume.volume_id}.img").exists()


def test_a_create_outlasting_its_deadline_keeps_its_intent_and_a_retry_finishes(
    cluster: Cluster,
) -> None:
    cluster.create("pvc-warm")  # the node is registered and placement can pick it
    cluster.stop_node()
    details = expect_code(
        grpc.StatusCode.UNAVAILABLE,
        lambda request: cluster.create(request, timeout=SHORT_DEADLINE_S),
        "pvc-late",
    )
    assert "create the image" in details and "a retry resumes it" in details
    volume_id = cluster.catalog.volume_id_for_name("pvc-late")
    assert volume_id is not None
    pending = cluster.catalog.read_volume(volume_id)
    assert pending is not None and pending.value.state is VolumeState.CREATING
    assert cluster.accounting().volume_count == 2  # the intent is charged

    cluster.start_node()  # its reconciler lists its specs and creates the image
    assert cluster.create("pvc-late").volume_id == volume_id
    ready = cluster.catalog.read_volume(volume_id)
    assert ready is not None and ready.value.state is VolumeState.READY
    assert cluster.accounting() == NodeAccounting(NODE_ID, 32 * MiB, 2)


def test_a_delete_outlasting_its_deadline_completes_on_retry(cluster: Cluster) -> None:
    volume = cluster.create("pvc-1")
    cluster.stop_node()
    request = csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
    expect_code(
        grpc.StatusCode.UNAVAILABLE,
        _call(cluster.client.controller.DeleteVolume, SHORT_DEADLINE_S),
        request,
    )
    deleting = cluster.catalog.read_volume(volume.volume_id)
    assert deleting is not None and deleting.value.state is VolumeState.DELETING
    cluster.start_node()
    cluster.client.controller.DeleteVolume(request)
    assert cluster.catalog.read_volume(volume.volume_id) is None
    assert cluster.accounting() == NodeAccounting(NODE_ID, 0, 0)
    assert not (cluster.base / NODE_ID / "pool" / "images" / f"{volume.volume_id}.img").exists()


def test_a_final_refusal_from_the_node_rolls_the_create_back(cluster: Cluster) -> None:
    cluster.create("pvc-warm")
    before = cluster.accounting()
    cluster.stop_node()  # the test answers in the node's place, through the catalog
    outcome: list[BaseException | Any] = []

    def create() -> None:
        try:
            outcome.append(cluster.create("pvc-big", timeout=60))
        except grpc.RpcError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=create)
    caller.start()
    store = cluster.catalog.store
    deadline = time.monotonic() + 30
    while (volume_id := cluster.catalog.volume_id_for_name("pvc-big")) is None:
        assert time.monotonic() < deadline, "the intent was never written"
        time.sleep(0.01)
    image = cluster.catalog.read_image(NODE_ID, volume_id)
    assert image is not None
    refusal = ImageStatus(
        volume_id,
        NODE_ID,
        ImagePhase.FAILED,
        image.value.generation,
        reason=FailureReason.NO_SPACE,
        message="pool has 0 bytes free",
    )
    store.put(refusal.key, put(refusal).value)
    caller.join(60)
    error = outcome[0]
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "pool has 0 bytes free" in str(error.details())
    assert cluster.catalog.volume_id_for_name("pvc-big") is None
    assert cluster.catalog.read_volume(volume_id) is None
    assert cluster.catalog.read_image(NODE_ID, volume_id) is None
    assert store.get(refusal.key) is None
    assert cluster.accounting() == before


def test_ready_comes_from_the_node_status_and_publications_are_counted_per_node(
    cluster: Cluster,
) -> None:
    volume = cluster.create("pvc-1")
    stored = cluster.catalog.store.get(f"volumes/{volume.volume_id}")
    assert stored is not None and b'"creating"' in stored.value  # no third txn
    read_back = cluster.catalog.read_volume(volume.volume_id)
    assert read_back is not None and read_back.value.state is VolumeState.READY

    publish = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume.volume_id, node_id=NODE_ID, volume_capability=mount_capability()
    )
    cluster.client.controller.ControllerPublishVolume(publish)
    cluster.client.controller.ControllerPublishVolume(publish)  # a repeat counts once
    assert cluster.accounting() == NodeAccounting(NODE_ID, 16 * MiB, 1, published_count=1)
    stored = cluster.catalog.store.get(f"volumes/{volume.volume_id}")
    assert stored is not None and b'"ready"' in stored.value  # stored with the publish
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume.volume_id, node_id=NODE_ID
    )
    cluster.client.controller.ControllerUnpublishVolume(unpublish)
    cluster.client.controller.ControllerUnpublishVolume(unpublish)
    assert cluster.accounting() == NodeAccounting(NODE_ID, 16 * MiB, 1, published_count=0)
