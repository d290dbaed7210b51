"""A snapshot outlives its primary's node: copies on the replicas' nodes, in a real sandbox.

Three node processes in their own network namespaces, chunks over mutual
TLS. A volume with one replica is written, snapshotted (the copy lands on
the replica's node) and written again; then the primary's node is killed
(SIGKILL), the volume fails over to the replica, and the snapshot is still
ready and restores, byte for byte its point in time, on the survivor (from
its own copy) and on the third node (pulled from the survivor's copy).
Deleting it while the old primary is down deletes the copies that can be
reached; the old primary deletes its own when it comes back.
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
from csi_driver.csi.client import mount_capability
from csi_driver.gen import csi_pb2
from tests.csi.test_snapshots import from_snapshot
from tests.sandbox.conftest import Place, requires_host
from tests.sandbox.test_mobility import _create_replicated, _eventually
from tests.sandbox.test_sandbox import NODE_KEY, RETRYABLE

pytestmark = [requires_host, pytest.mark.root, pytest.mark.slow]

NODES = ("node-1", "node-2", "node-3")


def _image(place: Place, node: str, volume_id: str) -> Path:
    return place.node_dir(node) / "pool" / "images" / f"{volume_id}.img"


def _held(place: Place, node: str, snapshot_id: str) -> Path:
    return place.node_dir(node) / "pool" / "snapshots" / f"{snapshot_id}.img"


def _scribble(path: Path, seed: bytes, offsets: range) -> str:
    """Write 256 KiB at each offset, durably; returns the image's digest after."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in offsets:
            os.pwrite(fd, hashlib.sha256(seed + b"%d" % offset).digest() * 8192, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _until_ok(place: Place, call: Any, request: Any, what: str, timeout: float = 60) -> Any:
    """Call through the controller until it succeeds, as a sidecar retries."""
    ends = time.monotonic() + timeout
    while True:
        with place.client("controller") as client:
            try:
                return call(client.controller)(request, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > ends:
                    raise AssertionError(f"{what}: {exc.code()} {exc.details()}") from exc
        time.sleep(0.3)


def test_a_snapshot_survives_its_primarys_node_and_restores_on_survivors(place: Place) -> None:
    place.up(3)
    volume_id = _create_replicated(place, "node-1", f"pvc-{uuid.uuid4()}")
    replicas = {n: place.node_dir(n) / "pool" / "replicas" / volume_id for n in NODES[1:]}
    survivor = _eventually(
        lambda: next((n for n, d in replicas.items() if list(d.glob("gen-*/image"))), None),
        "the replica's first generation",
    )
    third = next(n for n in NODES[1:] if n != survivor)
    point_in_time = _scribble(
        _image(place, "node-1", volume_id), b"before", range(0, 40 * MiB, 3 * MiB)
    )
    with place.client("controller") as client:
        snapshot = client.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="before-the-crash", source_volume_id=volume_id),
            timeout=60,
        ).snapshot
    assert snapshot.ready_to_use
    snapshot_id = snapshot.snapshot_id
    _eventually(lambda: _held(place, survivor, snapshot_id).exists(), "the copy on the replica")
    assert not _held(place, third, snapshot_id).exists()  # no replica there, no copy
    _scribble(_image(place, "node-1", volume_id), b"after", range(MiB, 64 * MiB, 5 * MiB))

    place.fault("kill", "node-1")
    publish = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=survivor, volume_capability=mount_capability()
    )
    context = _until_ok(place, lambda c: c.ControllerPublishVolume, publish, "the failover")
    assert context.publish_context["ferry.csi.dev/primary"] == survivor  # promoted
    got = _until_ok(
        place,
        lambda c: c.GetSnapshot,
        csi_pb2.GetSnapshotRequest(snapshot_id=snapshot_id),
        "GetSnapshot",
    )
    assert got.snapshot.ready_to_use

    restored = {}
    for node in (survivor, third):
        request = from_snapshot(f"pvc-{uuid.uuid4()}", snapshot_id)
        request.accessibility_requirements.requisite.add().segments[NODE_KEY] = node
        created = _until_ok(place, lambda c: c.CreateVolume, request, f"the restore on {node}")
        restored[node] = _image(place, node, created.volume.volume_id)
    for node, image in restored.items():
        assert hashlib.sha256(image.read_bytes()).hexdigest() == point_in_time, node

    _until_ok(
        place,
        lambda c: c.DeleteSnapshot,
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id),
        "DeleteSnapshot with the old primary down",
    )
    assert not _held(place, survivor, snapshot_id).exists()
    assert _held(place, "node-1", snapshot_id).exists()  # unreachable while it is down
    place.fault("start", "node-1")
    _eventually(
        lambda: not _held(place, "node-1", snapshot_id).exists(),
        "the old primary deleting its copy once back",
    )
