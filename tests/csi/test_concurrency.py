"""Concurrent CreateVolume calls over the CSI socket."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from csi_driver.core.model import MiB
from csi_driver.gen import csi_pb2
from tests.csi.conftest import NODE_ID, Ferry, mount_capability


def create(ferry: Ferry, name: str) -> str:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_capability()],
    )
    # Retry ABORTED like the external-provisioner does; anything else fails the test.
    for _ in range(50):
        try:
            return str(ferry.client.controller.CreateVolume(request).volume.volume_id)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.ABORTED:  # type: ignore[attr-defined]
                raise
    raise AssertionError(f"CreateVolume {name} stayed ABORTED")


def images(ferry: Ferry) -> list[str]:
    return sorted(p.stem for p in (ferry.base / NODE_ID / "pool" / "images").glob("*.img"))


def listed(ferry: Ferry) -> list[str]:
    reply = ferry.client.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    return sorted(e.volume.volume_id for e in reply.entries)


def test_twenty_concurrent_creates_of_one_name_make_one_volume(ferry: Ferry) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        ids = list(pool.map(lambda _: create(ferry, "pvc-same"), range(20)))
    assert len(set(ids)) == 1
    assert listed(ferry) == images(ferry) == [ids[0]]


def test_fifty_concurrent_creates_of_different_names_all_succeed(ferry: Ferry) -> None:
    with ThreadPoolExecutor(max_workers=50) as pool:
        ids = list(pool.map(lambda i: create(ferry, f"pvc-{i}"), range(50)))
    assert len(set(ids)) == 50
    assert listed(ferry) == images(ferry) == sorted(ids)
    capacity = ferry.client.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    assert capacity.available_capacity == 2048 * MiB - 50 * 16 * MiB
