"""Replicas retired and re-placed, and forced detaches fenced, with three real node services.

node-a runs all-in-one with the controller (its leader declares a node lost
after :data:`LOST_AFTER_S`); node-b and node-c are node services of their
own sharing the SQLite catalog and pulling chunks over real gRPC sockets.
Images are files (no loop device needed). Lowering ``replicas`` through
ControllerModifyVolume retires copies (deleted on their node, accounting
released, records gone), raising it adds them; a drained, deleted or lost
node's replica is re-placed; and a ControllerUnpublishVolume for a lost node
bumps the epoch (fenced) and, with ``failoverPolicy: promote``, fails over.
The volume stays published on its primary throughout: no downtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from csi_driver.controller.overview import drain, undrain
from csi_driver.core.model import MiB
from csi_driver.core.records import (
    FailoverStatus,
    FenceStatus,
    ImageRole,
    ImageSpec,
    ImageStatus,
    failover_status_key,
    fence_status_key,
    image_spec_key,
    image_status_key,
)
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.runtime import Services, start_all_in_one, start_node
from csi_driver.store.catalog import NODES, Catalog
from csi_driver.store.records import read
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import NODE_ID, expect_code, node_config

LOST_AFTER_S = 2.0
HEARTBEAT_S = 0.3
SIZE = 16 * MiB


@dataclass
class Cluster:
    base: Path
    client: CsiClient
    catalog: Catalog
    others: dict[str, Services]

    def start(self, node_id: str) -> None:
        config = node_config(self.base, node_id)
        config = type(config)(**{**config.__dict__, "heartbeat_s": HEARTBEAT_S})
        self.others[node_id] = start_node(
            f"unix://{self.base}/csi-{node_id}.sock", config, self.base / "catalog.db"
        )

    def stop(self, node_id: str) -> None:
        self.others.pop(node_id).stop(grace_s=0)

    def create(self, name: str, parameters: dict[str, str], on: str = NODE_ID) -> str:
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
            volume_capabilities=[mount_capability()],
            parameters=parameters,
        )
        request.accessibility_requirements.preferred.add().segments[
            "topology.ferry.csi.dev/node"
        ] = on
        return str(self.provision(request).volume_id)

    def provision(self, request: csi_pb2.CreateVolumeRequest) -> csi_pb2.Volume:
        """CreateVolume, retried as the external-provisioner retries it: a node whose
        heartbeat (every 0.3 s here) a loaded machine delays past two thirds of
        LOST_AFTER_S is not ready for a new volume until its next beat."""
        ends = time.monotonic() + 30
        while True:
            try:
                reply = self.client.controller.CreateVolume(request, timeout=30)
                return reply.volume
            except grpc.RpcError as exc:
                error: Any = exc
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > ends:
                    raise
                time.sleep(HEARTBEAT_S)

    def publish(self, volume_id: str, node: str) -> dict[str, str]:
        reply = self.client.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume_id, node_id=node, volume_capability=mount_capability()
            ),
            timeout=30,
        )
        return dict(reply.publish_context)

    def unpublish(self, volume_id: str, node: str) -> None:
        self.client.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node),
            timeout=30,
        )

    def modify(self, volume_id: str, mutable: dict[str, str]) -> None:
        self.client.controller.ControllerModifyVolume(
            csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=mutable)
        )

    def replicas(self, volume_id: str) -> dict[str, ImageSpec]:
        """The volume's live replica specs by node (retired ones excluded)."""
        found = {}
        for node in ("node-a", "node-b", "node-c"):
            spec = read(self.catalog.store, ImageSpec, image_spec_key(node, volume_id))
            if spec and spec.value.role is ImageRole.REPLICA and not spec.value.deleted:
                found[node] = spec.value
        return found

    def synced(self, volume_id: str, node: str) -> bool:
        status = read(self.catalog.store, ImageStatus, image_status_key(node, volume_id))
        return status is not None and bool(status.value.manifest_digest)

    def forgotten(self, volume_id: str, node: str) -> bool:
        """The catalog holds nothing of the volume on ``node`` and charges it nothing."""
        account = self.catalog.account(node)
        return (
            self.catalog.store.get(image_spec_key(node, volume_id)) is None
            and self.catalog.store.get(image_status_key(node, volume_id)) is None
            and (account is None or account.value.provisioned_bytes == 0)
        )

    def gone(self, volume_id: str, node: str) -> bool:
        """Nothing of the volume on ``node``: records, charge, replica directory."""
        return (
            self.forgotten(volume_id, node)
            and not (self.base / node / "pool" / "replicas" / volume_id).exists()
        )


@contextmanager
def _cluster(base: Path) -> Iterator[Cluster]:
    (base / "kubelet").mkdir(exist_ok=True)
    config = node_config(base)
    config = type(config)(**{**config.__dict__, "heartbeat_s": HEARTBEAT_S})
    services = start_all_in_one(
        f"unix://{base}/csi.sock", config, base / "catalog.db", node_lost_after_s=LOST_AFTER_S
    )
    client = CsiClient(f"unix://{base}/csi.sock")
    store = SqliteStore(base / "catalog.db")
    cluster = Cluster(base, client, Catalog(store), {})
    try:
        client.wait_ready()
        cluster.start("node-b")
        cluster.start("node-c")
        yield cluster
    finally:
        for node in list(cluster.others):
            cluster.stop(node)
        client.close()
        store.close()
        services.stop(grace_s=0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with _cluster(tmp_path) as running:
        yield running


def _eventually(check: Callable[[], object], what: str, timeout: float = 30) -> None:
    ends = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < ends, f"{what} not within {timeout} s"
        time.sleep(0.1)


def _changes(action: str) -> float:
    return REGISTRY.get_sample_value("ferry_replica_changes_total", {"action": action}) or 0


def _settles_on(
    cluster: Cluster,
    volume_id: str,
    node: str,
    left: Callable[[str, str], bool],
    what: str,
) -> None:
    """The volume's one replica ends on ``node``, synced; the other node's copy is
    ``left`` (gone, or forgotten by the catalog)."""
    other = ({"node-b", "node-c"} - {node}).pop()
    _eventually(
        lambda: (
            set(cluster.replicas(volume_id)) == {node}
            and left(volume_id, other)
            and cluster.synced(volume_id, node)
        ),
        what,
    )


def test_lowering_replicas_retires_copies_and_raising_adds_them(cluster: Cluster) -> None:
    volume_id = cluster.create("policy", {"replicas": "2"})
    cluster.publish(volume_id, NODE_ID)  # in use on its primary throughout
    _eventually(
        lambda: (
            set(cluster.replicas(volume_id)) == {"node-b", "node-c"}
            and all(cluster.synced(volume_id, n) for n in ("node-b", "node-c"))
        ),
        "two replicas synced",
    )

    retired_before = _changes("retired")
    cluster.modify(volume_id, {"replicas": "1"})

    _eventually(lambda: len(cluster.replicas(volume_id)) == 1, "one replica retired")
    (kept,) = cluster.replicas(volume_id)
    retired = ({"node-b", "node-c"} - {kept}).pop()
    _eventually(lambda: cluster.gone(volume_id, retired), "the retired copy removed")
    # Counted by the reconciler just after its txn, which the test may see first.
    _eventually(lambda: _changes("retired") >= retired_before + 1, "the retirement counted")
    assert _changes("retired") == retired_before + 1
    account = cluster.catalog.account(retired)
    assert account is not None and account.value.volume_count == 0

    cluster.modify(volume_id, {"replicas": "2"})

    _eventually(
        lambda: len(cluster.replicas(volume_id)) == 2 and cluster.synced(volume_id, retired),
        "the replica added back and synced",
    )
    volume = cluster.catalog.require_volume(volume_id)
    assert (volume.primary_node, volume.epoch) == (NODE_ID, 1)  # never moved, never fenced
    assert [p.node_id for p in volume.publications] == [NODE_ID]


def test_a_drained_or_deleted_node_has_its_replica_placed_elsewhere(cluster: Cluster) -> None:
    volume_id = cluster.create("re-placed", {"replicas": "1"})
    _eventually(lambda: cluster.replicas(volume_id), "a replica")
    (first,) = cluster.replicas(volume_id)
    other = ({"node-b", "node-c"} - {first}).pop()
    _eventually(lambda: cluster.synced(volume_id, first), "the replica synced")

    assert drain(cluster.catalog, first) == {}  # no primary there: only marked leaving

    _settles_on(cluster, volume_id, other, cluster.gone, "the replica off the drained node")
    assert undrain(cluster.catalog, first)

    # An operator removes the other node's record (the node is gone for good): its
    # copy can never report, so it is re-placed and its records dropped at once.
    cluster.stop(other)
    cluster.catalog.store.delete(NODES + other)
    _settles_on(cluster, volume_id, first, cluster.forgotten, "the replica placed back")


def test_a_lost_node_has_its_replica_re_placed_and_removed_once_back(cluster: Cluster) -> None:
    volume_id = cluster.create("lost-replica", {"replicas": "1"})
    _eventually(lambda: cluster.replicas(volume_id), "a replica")
    (first,) = cluster.replicas(volume_id)
    _eventually(lambda: cluster.synced(volume_id, first), "the replica synced")
    other = ({"node-b", "node-c"} - {first}).pop()

    cluster.stop(first)  # silent past --node-lost-after: lost

    _eventually(
        lambda: set(cluster.replicas(volume_id)) == {other} and cluster.synced(volume_id, other),
        "the replica re-placed on the other node",
    )
    retired = read(cluster.catalog.store, ImageSpec, image_spec_key(first, volume_id))
    # Retired while away: the node cannot act on it, so its charge stays until it does.
    assert retired is not None and retired.value.deleted
    cluster.start(first)
    _settles_on(cluster, volume_id, other, cluster.gone, "the lost node's copy removed")


def test_a_forced_detach_from_a_lost_node_is_fenced_then_failed_over(cluster: Cluster) -> None:
    volume_id = cluster.create("lost", {"replicas": "1", "failoverPolicy": "wait"}, on="node-c")
    _eventually(lambda: cluster.replicas(volume_id), "a replica")
    (replica,) = cluster.replicas(volume_id)
    _eventually(lambda: cluster.synced(volume_id, replica), "the replica synced")
    assert cluster.publish(volume_id, "node-c")["ferry.csi.dev/epoch"] == "1"
    failovers = REGISTRY.get_sample_value("ferry_failover_duration_seconds_count") or 0
    detaches = REGISTRY.get_sample_value("ferry_forced_detaches_total") or 0

    cluster.stop("node-c")  # the node dies with the volume published
    time.sleep(LOST_AFTER_S + 3 * HEARTBEAT_S)
    cluster.unpublish(volume_id, "node-c")  # Kubernetes' forced detach: success
    cluster.unpublish(volume_id, "node-c")  # the attacher's repeat: success, no second fence

    fence = read(cluster.catalog.store, FenceStatus, fence_status_key(volume_id))
    assert fence is not None and (fence.value.node_id, fence.value.epoch) == ("node-c", 2)
    assert fence.value.at <= time.time() and "silent" in fence.value.why
    volume = cluster.catalog.require_volume(volume_id)
    # failoverPolicy wait: the data stays on node-c, behind a new epoch.
    assert (volume.primary_node, volume.epoch, volume.publications) == ("node-c", 2, ())
    image = read(cluster.catalog.store, ImageSpec, image_spec_key("node-c", volume_id))
    assert image is not None and (image.value.role, image.value.epoch) == (ImageRole.PRIMARY, 2)
    account = cluster.catalog.account("node-c")
    assert account is not None and account.value.published_count == 0
    assert (REGISTRY.get_sample_value("ferry_forced_detaches_total") or 0) == detaches + 1

    # The operator accepts the loss: the failover counts from the forced detach.
    cluster.modify(volume_id, {"failoverPolicy": "promote"})
    _eventually(
        lambda: read(cluster.catalog.store, FailoverStatus, failover_status_key(volume_id)),
        "the failover",
    )
    volume = cluster.catalog.require_volume(volume_id)
    assert (volume.primary_node, volume.epoch) == (replica, 3)

    def failovers_now() -> float:
        return REGISTRY.get_sample_value("ferry_failover_duration_seconds_count") or 0

    # Observed by the reconciler just after its txn, which the test may see first.
    _eventually(lambda: failovers_now() >= failovers + 1, "the failover counted")
    assert failovers_now() == failovers + 1

    cluster.start("node-c")  # it comes back; kubelet retries the old attachment's stage
    with CsiClient(f"unix://{cluster.base}/csi-node-c.sock") as node_c:
        details = expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            node_c.node.NodeStageVolume,
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=str(cluster.base / "kubelet" / "stage-c"),
                volume_capability=mount_capability(),
                publish_context={"ferry.csi.dev/epoch": "1"},
            ),
        )
    assert "not its primary" in details
    preserved = cluster.base / "node-c" / "pool" / "preserved"
    # Its divergent data is kept aside, whatever becomes of its copy.
    _eventually(lambda: list(preserved.glob(f"{volume_id}-*.img")), "the divergent image kept")


def test_a_detach_from_a_reachable_node_is_not_fenced(cluster: Cluster) -> None:
    volume_id = cluster.create("healthy", {}, on="node-b")
    cluster.publish(volume_id, "node-b")
    cluster.unpublish(volume_id, "node-b")
    volume = cluster.catalog.require_volume(volume_id)
    assert (volume.epoch, volume.publications) == (1, ())
    assert cluster.catalog.store.get(fence_status_key(volume_id)) is None


def _create_within(
    cluster: Cluster, name: str, requisite: list[str], preferred: list[str], replicas: int = 0
) -> csi_pb2.CreateVolumeRequest:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[mount_capability()],
        parameters={"replicas": str(replicas)} if replicas else {},
    )
    for nodes, segments in (
        (requisite, request.accessibility_requirements.requisite),
        (preferred, request.accessibility_requirements.preferred),
    ):
        for node in nodes:
            segment = segments.add().segments
            segment["topology.ferry.csi.dev/zone"] = "zone-1"
            segment["topology.ferry.csi.dev/node"] = node
    return request


def test_a_new_volume_and_its_replica_avoid_drained_and_lost_nodes(cluster: Cluster) -> None:
    create = cluster.client.controller.CreateVolume
    assert drain(cluster.catalog, "node-b") == {}
    # The scheduler's choice (preferred) is drained: the volume goes to another
    # requisite node, and its replica too avoids the drained node.
    volume = cluster.provision(
        _create_within(cluster, "avoids", ["node-a", "node-b", "node-c"], ["node-b"], 1)
    )
    assert cluster.catalog.require_volume(volume.volume_id).primary_node != "node-b"
    _eventually(lambda: cluster.replicas(volume.volume_id), "a replica")
    assert "node-b" not in cluster.replicas(volume.volume_id)

    # Only drained nodes are allowed: RESOURCE_EXHAUSTED naming them, why, and what to do.
    details = expect_code(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        create,
        _create_within(cluster, "only-drained", ["node-b"], ["node-b"]),
    )
    assert "node-b (drained (ferry drain))" in details and "ferry drain NODE --undo" in details

    # A node silent past --node-lost-after is no place for a new volume either.
    cluster.stop("node-c")
    time.sleep(LOST_AFTER_S + 3 * HEARTBEAT_S)
    details = expect_code(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        create,
        _create_within(cluster, "only-down", ["node-b", "node-c"], []),
    )
    assert "node-b (drained" in details and "node-c (Ferry agent silent for" in details

    # Undrained, node-b takes it: the same request now succeeds there.
    assert undrain(cluster.catalog, "node-b")
    placed = cluster.provision(_create_within(cluster, "only-down", ["node-b", "node-c"], []))
    assert cluster.catalog.require_volume(placed.volume_id).primary_node == "node-b"
