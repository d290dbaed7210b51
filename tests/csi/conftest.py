"""A running Ferry (controller + node, all in one) on real unix sockets.

Each test gets its own pool, catalog and kubelet directory under tmp_path,
served by the real services over real gRPC sockets; teardown stops the
servers and releases every mount and loop device made under tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.model import GiB, MiB
from csi_driver.core.records import (
    IMAGE_SPECS,
    ImageSpec,
    NodeAccounting,
    decode,
    node_accounting_key,
)
from csi_driver.csi.client import CsiClient, block_capability, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.teardown import release_under
from csi_driver.runtime import NodeConfig, Services, start_all_in_one, start_node
from csi_driver.store.base import CatalogStore
from csi_driver.store.records import read
from tests.node.conftest import host_can_mount

POOL_CAPACITY = 2 * GiB
NODE_ID = "node-a"
ZONE = "zone-1"


@dataclass
class Ferry:
    """Handles on one running Ferry for a test."""

    client: CsiClient
    base: Path
    kubelet: Path
    services: Services
    catalog: Path

    def create(
        self,
        name: str,
        size: int = 64 * MiB,
        capability: Any = None,
        parameters: dict[str, str] | None = None,
    ) -> Any:
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[capability or mount_capability()],
            parameters=parameters or {},
        )
        return self.client.controller.CreateVolume(request).volume

    def staging(self, volume_id: str) -> str:
        return str(self.kubelet / "plugins" / "kubernetes.io" / "csi" / volume_id / "globalmount")

    def target(self, volume_id: str, pod: str = "pod-1") -> str:
        return str(
            self.kubelet / "pods" / pod / "volumes" / "kubernetes.io~csi" / volume_id / "mount"
        )

    def stage(self, volume_id: str, capability: Any = None) -> str:
        staging = self.staging(volume_id)
        self.client.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                volume_capability=capability or mount_capability(),
            )
        )
        return staging

    def publish(
        self, volume_id: str, capability: Any = None, pod: str = "pod-1", readonly: bool = False
    ) -> str:
        target = self.target(volume_id, pod)
        self.client.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=self.staging(volume_id),
                target_path=target,
                volume_capability=capability or mount_capability(),
                readonly=readonly,
            )
        )
        return target


def expect_code(code: grpc.StatusCode, call: Callable[..., Any], request: Any) -> str:
    """Call ``call(request)``; it must fail with ``code``. Returns the details."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    error: Any = caught.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return str(error.details())


def accounted_specs(store: CatalogStore, node_id: str = NODE_ID) -> list[ImageSpec]:
    """The node's image specs, once checked that its accounting is exactly their sum
    (bytes and count): every create and delete charged it once."""
    specs = [decode(ImageSpec, r.value) for r in store.list(IMAGE_SPECS)]
    account = read(store, NodeAccounting, node_accounting_key(node_id))
    assert account is not None
    assert account.value.provisioned_bytes == sum(s.size_bytes for s in specs)
    assert account.value.volume_count == len(specs)
    return specs


def node_config(base: Path, node_id: str = NODE_ID, capacity: int = POOL_CAPACITY) -> NodeConfig:
    return NodeConfig(
        node_id=node_id,
        pool_root=base / node_id / "pool",
        kubelet_dirs=(base / "kubelet",),
        agent_endpoint=f"unix://{base}/{node_id}-agent.sock",
        zone=ZONE,
        max_volumes=16,
        pool_capacity_bytes=capacity,
    )


@contextmanager
def running(base: Path, config: NodeConfig) -> Iterator[Ferry]:
    """Ferry all-in-one serving ``config``'s node from ``base``, stopped afterwards."""
    kubelet = base / "kubelet"
    kubelet.mkdir(exist_ok=True)
    catalog = base / "catalog.db"
    services = start_all_in_one(f"unix://{base}/csi.sock", config, catalog)
    client = CsiClient(f"unix://{base}/csi.sock")
    try:
        client.wait_ready()
        yield Ferry(client, base, kubelet, services, catalog)
    finally:
        client.close()
        services.stop(grace_s=0)


@pytest.fixture
def ferry(tmp_path: Path) -> Iterator[Ferry]:
    try:
        with running(tmp_path, node_config(tmp_path)) as ferry:
            yield ferry
    finally:
        if host_can_mount():
            release_under(tmp_path)


@pytest.fixture
def second_node(ferry: Ferry) -> Iterator[str]:
    """A second real node service sharing the catalog; returns its node id."""
    services = start_node(
        f"unix://{ferry.base}/csi-b.sock", node_config(ferry.base, "node-b"), ferry.catalog
    )
    try:
        yield "node-b"
    finally:
        services.stop(grace_s=0)


@pytest.fixture
def mountable(ferry: Ferry) -> Ferry:
    if not host_can_mount():
        pytest.skip("needs root and /dev/loop-control (loop devices, mkfs, mount)")
    return ferry


__all__ = ["Ferry", "block_capability", "expect_code", "mount_capability"]
