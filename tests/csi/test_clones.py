"""Clones and restores across nodes, and snapshots of volumes in use.

- A clone placed on another node is pulled from the node holding the
  snapshot, chunk by chunk over the chunk service, verified, and is
  byte-identical to the snapshot (two real node services sharing a
  catalog, each serving its snapshots on its own socket).
- A snapshot of a mounted volume under writes (fsfreeze) restores, into a
  larger volume, to a filesystem that fsck finds clean, that grows to the
  new size on stage, and that holds exactly a prefix of the writes: all
  that was durable before the snapshot was asked for, none that began
  after it was answered.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.core.placement import NODE_KEY
from csi_driver.csi.client import block_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.reconcile.snapshots import TORN_COPY
from csi_driver.node.teardown import release_under
from csi_driver.runtime import start_node
from tests.csi.conftest import Ferry, expect_code, node_config, running
from tests.csi.test_snapshots import from_snapshot, snap
from tests.node.conftest import host_can_mount, requires_root

SIZE = 64 * MiB
RECORD = 4096


def on_node(request: Any, node_id: str) -> Any:
    segment = csi_pb2.Topology(segments={NODE_KEY: node_id})
    request.accessibility_requirements.requisite.append(segment)
    request.accessibility_requirements.preferred.append(segment)
    return request


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[Ferry]:
    """Ferry all-in-one on node-a and a node service on node-b, both serving chunks."""
    config_a = replace(node_config(tmp_path), chunk_endpoint=f"unix://{tmp_path}/a-chunks.sock")
    config_b = replace(
        node_config(tmp_path, "node-b"), chunk_endpoint=f"unix://{tmp_path}/b-chunks.sock"
    )
    try:
        with running(tmp_path, config_a) as ferry:
            node_b = start_node(f"unix://{tmp_path}/csi-b.sock", config_b, ferry.catalog)
            try:
                yield ferry
            finally:
                node_b.stop(grace_s=0)
    finally:
        if host_can_mount():
            release_under(tmp_path)


def image(ferry: Ferry, node_id: str, volume_id: str) -> Path:
    return ferry.base / node_id / "pool" / "images" / f"{volume_id}.img"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_clone_on_another_node_is_byte_identical(two_nodes: Ferry) -> None:
    ferry = two_nodes
    request = csi_pb2.CreateVolumeRequest(
        name="source",
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[csi_pb2.VolumeCapability(**_mount())],
    )
    source = ferry.client.controller.CreateVolume(on_node(request, "node-a")).volume
    source_image = image(ferry, "node-a", source.volume_id)
    with open(source_image, "r+b") as handle:
        for chunk in range(0, SIZE, 5 * MiB):  # data in some chunks, holes in others
            handle.seek(chunk)
            handle.write(os.urandom(300 * 1024))
    taken = snap(ferry, "s", source.volume_id)
    held = ferry.base / "node-a" / "pool" / "snapshots" / f"{taken.snapshot_id}.img"
    with open(source_image, "r+b") as handle:
        handle.write(b"written after the snapshot" * 100)
    clone = ferry.client.controller.CreateVolume(
        on_node(from_snapshot("clone", taken.snapshot_id), "node-b")
    ).volume
    copy = image(ferry, "node-b", clone.volume_id)
    assert copy.exists() and not image(ferry, "node-a", clone.volume_id).exists()
    assert digest(copy) == digest(held)
    assert digest(copy) != digest(source_image)
    # Nothing of the pull is left behind, and a repeat only finds the clone.
    assert not list((ferry.base / "node-b" / "pool" / "incoming").iterdir())
    again = ferry.client.controller.CreateVolume(
        on_node(from_snapshot("clone", taken.snapshot_id), "node-b")
    ).volume
    assert again.volume_id == clone.volume_id


def _mount() -> dict[str, Any]:
    mode = csi_pb2.VolumeCapability.AccessMode(mode="SINGLE_NODE_WRITER")
    return {"access_mode": mode, "mount": csi_pb2.VolumeCapability.MountVolume()}


class Writer:
    """Appends numbered records to a file, each made durable before the next."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.durable = 0  # records fsync'ed
        self.started = 0  # records whose write began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with open(self.path, "wb") as handle:
            while not self._stop.is_set():
                n = self.started
                self.started += 1
                handle.write(n.to_bytes(8, "big") * (RECORD // 8))
                handle.flush()
                os.fsync(handle.fileno())
                self.durable = n + 1


@requires_root
@pytest.mark.root
def test_snapshot_under_writes_restores_consistent(mountable: Ferry) -> None:
    ferry = mountable
    volume = ferry.create("busy", SIZE)
    ferry.stage(volume.volume_id)
    target = Path(ferry.publish(volume.volume_id))
    with Writer(target / "log") as writer:
        while writer.durable < 200:
            threading.Event().wait(0.01)
        durable_before = writer.durable
        taken = snap(ferry, "mid-write", volume.volume_id)
        started_after = writer.started
        while writer.durable < started_after + 50:  # writes go on after the thaw
            threading.Event().wait(0.01)
    assert taken.ready_to_use
    restored = ferry.client.controller.CreateVolume(
        from_snapshot("restored", taken.snapshot_id, size=2 * SIZE)
    )
    restored_id = restored.volume.volume_id
    fsck = subprocess.run(
        ["e2fsck", "-f", "-n", str(image(ferry, "node-a", restored_id))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    ferry.stage(restored_id)
    restored_target = Path(ferry.publish(restored_id, pod="pod-2"))
    grown = os.statvfs(restored_target)
    assert grown.f_blocks * grown.f_frsize > SIZE + SIZE // 2  # the filesystem grew on stage
    data = (restored_target / "log").read_bytes()
    count = len(data) // RECORD
    assert len(data) % RECORD == 0, "a torn record"
    assert durable_before <= count <= started_after
    for n in range(count):
        assert data[n * RECORD : (n + 1) * RECORD] == n.to_bytes(8, "big") * (RECORD // 8)


@requires_root
@pytest.mark.root
def test_a_block_volume_in_use_is_not_copied_torn(mountable: Ferry) -> None:
    """On a pool that cannot reflink (this ext4 /tmp), a copy of a block volume that
    its pod may be writing would be no point in time: refused, saying what to do."""
    ferry = mountable
    volume = ferry.create("raw", SIZE, capability=block_capability())
    ferry.stage(volume.volume_id, block_capability())
    request = csi_pb2.CreateSnapshotRequest(name="torn", source_volume_id=volume.volume_id)
    details = expect_code(
        grpc.StatusCode.FAILED_PRECONDITION, ferry.client.controller.CreateSnapshot, request
    )
    assert details.endswith(TORN_COPY.format(volume_id=volume.volume_id, node_id="node-a"))
    assert list(ferry.client.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == []
    ferry.client.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=ferry.staging(volume.volume_id)
        )
    )
    taken = ferry.client.controller.CreateSnapshot(request).snapshot  # unused: a copy is fine
    assert taken.ready_to_use


@requires_root
@pytest.mark.root
def test_a_group_snapshot_is_one_point_in_time(mountable: Ferry) -> None:
    """Record n goes to volume A, then to volume B, each made durable before the next
    write: at one freeze point B holds n or n - 1 records when A holds n."""
    ferry = mountable
    targets = []
    volumes = []
    for name in ("a", "b"):
        volume = ferry.create(name, SIZE).volume_id
        ferry.stage(volume)
        targets.append(Path(ferry.publish(volume, pod=f"pod-{name}")))
        volumes.append(volume)
    stop = threading.Event()

    def write() -> None:
        handles = [open(t / "log", "wb") for t in targets]  # noqa: SIM115
        try:
            n = 0
            while not stop.is_set():
                for handle in handles:
                    handle.write(n.to_bytes(8, "big") * (RECORD // 8))
                    handle.flush()
                    os.fsync(handle.fileno())
                n += 1
        finally:
            for handle in handles:
                handle.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        threading.Event().wait(0.5)
        group = ferry.client.group.CreateVolumeGroupSnapshot(
            csi_pb2.CreateVolumeGroupSnapshotRequest(name="app", source_volume_ids=volumes)
        ).group_snapshot
    finally:
        stop.set()
        writer.join(timeout=30)
    by_volume = {s.source_volume_id: s.snapshot_id for s in group.snapshots}
    counts = []
    for name, volume in zip(("a", "b"), volumes, strict=True):
        restored = ferry.client.controller.CreateVolume(
            from_snapshot(f"restored-{name}", by_volume[volume])
        ).volume.volume_id
        ferry.stage(restored)
        data = (Path(ferry.publish(restored, pod=f"pod-r{name}")) / "log").read_bytes()
        assert len(data) % RECORD == 0
        counts.append(len(data) // RECORD)
    assert counts[0] > 0 and counts[0] - counts[1] in (0, 1), counts
