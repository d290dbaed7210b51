"""A clone made on another node of a real sandbox is byte-identical to its snapshot.

Nodes in their own network namespaces, each serving its snapshots on
its chunk endpoint over mutual TLS under the sandbox's CA: the snapshot is
taken on node-1, a volume is created from it on node-2, and node-2 pulls
and verifies the chunks from node-1 across the bridge. A clone of a volume
(not of a snapshot) made on node-2 is byte-identical to the volume.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.core.placement import NODE_KEY
from csi_driver.csi.client import CsiClient
from csi_driver.gen import csi_pb2
from tests.csi.test_snapshots import from_snapshot
from tests.sandbox.conftest import Place, requires_host
from tests.sandbox.test_sandbox import RPC_TIMEOUT_S, create_on

pytestmark = [requires_host, pytest.mark.root, pytest.mark.slow]


def image(place: Place, node: str, volume_id: str) -> Path:
    return place.node_dir(node) / "pool" / "images" / f"{volume_id}.img"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def on_node_2(request: csi_pb2.CreateVolumeRequest) -> csi_pb2.CreateVolumeRequest:
    request.accessibility_requirements.requisite.add().segments[NODE_KEY] = "node-2"
    return request


def test_clones_on_another_node_are_byte_identical(running: Place) -> None:
    source = create_on(running, "node-1", f"pvc-{uuid.uuid4()}")
    source_image = image(running, "node-1", source.volume_id)
    with open(source_image, "r+b") as handle:
        for offset in range(0, 64 * MiB, 3 * MiB):
            handle.seek(offset)
            handle.write(os.urandom(256 * 1024))
    before = digest(source_image)
    with running.client("controller") as client:
        controller = client.controller
        snapshot = controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=source.volume_id),
            timeout=RPC_TIMEOUT_S,
        ).snapshot
        assert snapshot.ready_to_use
        with open(source_image, "r+b") as handle:
            handle.write(b"after the snapshot" * 1000)
        restored = controller.CreateVolume(
            on_node_2(from_snapshot(f"pvc-{uuid.uuid4()}", snapshot.snapshot_id)),
            timeout=RPC_TIMEOUT_S,
        ).volume
        after = digest(source_image)
        clone = controller.CreateVolume(
            on_node_2(from_snapshot(f"pvc-{uuid.uuid4()}", volume_id=source.volume_id)),
            timeout=RPC_TIMEOUT_S,
        ).volume
    assert not image(running, "node-1", restored.volume_id).exists()
    assert digest(image(running, "node-2", restored.volume_id)) == before
    assert digest(image(running, "node-2", clone.volume_id)) == after != before


def _answered_in_time(client: CsiClient, request: csi_pb2.CreateSnapshotRequest) -> Any:
    """CreateSnapshot with a short deadline: it answers (not ready) just before the
    deadline while the node is dead. A machine too loaded to answer even within it
    (DEADLINE_EXCEEDED) gets the same call, idempotent by name, with twice the deadline."""
    deadline_s = 3.0
    while True:
        try:
            return client.controller.CreateSnapshot(request, timeout=deadline_s).snapshot
        except grpc.RpcError as exc:
            error: Any = exc
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED or deadline_s >= 24:
                raise
            deadline_s *= 2


def test_a_snapshot_asked_of_a_dead_node_is_ready_only_once_taken(running: Place) -> None:
    """The intent outlives the node's death; ``ready_to_use`` waits for the node."""
    volume = create_on(running, "node-3", f"pvc-{uuid.uuid4()}")
    held = running.node_dir("node-3") / "pool" / "snapshots"
    request = csi_pb2.CreateSnapshotRequest(name="while-dead", source_volume_id=volume.volume_id)
    running.fault("kill", "node-3")
    try:
        with running.client("controller") as client:
            pending = _answered_in_time(client, request)
        assert not pending.ready_to_use and pending.snapshot_id
        assert not list(held.glob("snap-*.img"))
    finally:
        running.fault("start", "node-3")
    with running.client("controller") as client:
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while True:
            again = client.controller.CreateSnapshot(request, timeout=RPC_TIMEOUT_S).snapshot
            if again.ready_to_use or time.monotonic() > deadline:
                break
    assert again.ready_to_use and again.snapshot_id == pending.snapshot_id
    assert (held / f"{again.snapshot_id}.img").exists()
