"""Moves between real nodes: every acknowledged write arrives, a crash at any step resumes.

In a real three-node sandbox (etcd, a controller and node processes in
network namespaces, mutual TLS, loop devices): a workload that fsyncs and
records a checksum of every write is moved from node-1 to node-2 the way
Kubernetes does it (unpublish, unstage, ControllerUnpublish, then
ControllerPublish to the new node, retried while it answers ABORTED), and
everything it was told was written reads back identical on node-2; node-1
is refused a stage afterwards. Then the source, the target or the
controller is killed with SIGKILL at each step of a move (``FERRY_CRASH_FILE``
names the step), started again, and the retried publish completes with the
target's image byte-identical to the source's and nothing left behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.csi.client import mount_capability
from csi_driver.gen import csi_pb2
from tests.sandbox.conftest import Place, _missing, _new_place, requires_host
from tests.sandbox.test_sandbox import RETRYABLE, create_on, paths, unmount

pytestmark = [requires_host, pytest.mark.root, pytest.mark.slow]

RECORD = 4096


@pytest.fixture(scope="module")
def mobile() -> Iterator[Place]:
    """A three-node sandbox whose processes die at the steps a crash file names."""
    if _missing():
        pytest.skip(_missing() or "")
    with _new_place() as spot:
        crash_file = spot.directory / "crash-at"
        crash_file.touch()
        # Members restarted by `ferry sandbox start` must read it too.
        os.environ["FERRY_CRASH_FILE"] = str(crash_file)
        try:
            spot.up(3)
            yield spot
        finally:
            del os.environ["FERRY_CRASH_FILE"]


def _publish(place: Place, volume_id: str, node: str, timeout: float = 20) -> dict[str, str]:
    with place.client("controller") as client:
        reply = client.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume_id, node_id=node, volume_capability=mount_capability()
            ),
            timeout=timeout,
        )
    return dict(reply.publish_context)


def _publish_until_done(place: Place, volume_id: str, node: str) -> tuple[dict[str, str], int]:
    """What the external-attacher does: retry while the move is under way; restart
    (as Kubernetes would) any member that died. Returns the context and the retries."""
    retries = 0
    ends = time.monotonic() + 120
    while True:
        try:
            return _publish(place, volume_id, node, timeout=2), retries
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > ends:
                raise
        retries += 1
        for member, row in place.status().items():
            if row["STATE"] == "dead":
                place.sandbox("start", member)
        time.sleep(0.2)


def _unpublish(place: Place, volume_id: str, node: str) -> None:
    with place.client("controller") as client:
        client.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node),
            timeout=20,
        )


def _stage_and_publish(place: Place, node: str, volume_id: str, context: dict[str, str]) -> str:
    staging, target = paths(place, node, volume_id)
    capability = mount_capability()
    with place.client(node) as client:
        client.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                volume_capability=capability,
                publish_context=context,
            ),
            timeout=60,
        )
        client.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                target_path=target,
                volume_capability=capability,
                publish_context=context,
            ),
            timeout=60,
        )
    return target


class Writer:
    """Appends 4 KiB records to a file, fsyncing each; remembers what was acknowledged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acknowledged: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self._stop.is_set():
                record = secrets.token_bytes(RECORD)
                os.write(fd, record)
                os.fsync(fd)
                self.acknowledged.append(hashlib.sha256(record).hexdigest())
        finally:
            os.close(fd)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_moved_volume_keeps_every_acknowledged_write_and_fences_the_old_node(
    mobile: Place,
) -> None:
    volume_id = create_on(mobile, "node-1", "moving-writer").volume_id
    context = _publish(mobile, volume_id, "node-1")
    target = _stage_and_publish(mobile, "node-1", volume_id, context)
    with Writer(Path(target) / "log") as writer:
        time.sleep(1.0)
    unmount(mobile, "node-1", volume_id)
    _unpublish(mobile, volume_id, "node-1")

    started = time.monotonic()
    context, _ = _publish_until_done(mobile, volume_id, "node-2")
    moved = _stage_and_publish(mobile, "node-2", volume_id, context)
    downtime = time.monotonic() - started

    data = (Path(moved) / "log").read_bytes()
    assert len(data) >= len(writer.acknowledged) * RECORD
    found = [
        hashlib.sha256(data[i * RECORD : (i + 1) * RECORD]).hexdigest()
        for i in range(len(writer.acknowledged))
    ]
    assert found == writer.acknowledged, "an acknowledged write did not arrive"
    assert context["ferry.csi.dev/epoch"] == "2"
    print(f"\nmoved {len(writer.acknowledged)} records, publish to mounted in {downtime:.2f} s")

    staging, _ = paths(mobile, "node-1", volume_id)
    with mobile.client("node-1") as client, pytest.raises(grpc.RpcError) as refused:
        client.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                volume_capability=mount_capability(),
                publish_context={"ferry.csi.dev/epoch": "1"},
            ),
            timeout=20,
        )
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "replica" in (refused.value.details() or "")
    unmount(mobile, "node-2", volume_id)
    _unpublish(mobile, volume_id, "node-2")


def _image(place: Place, node: str, volume_id: str) -> Path:
    return place.node_dir(node) / "pool" / "images" / f"{volume_id}.img"


def _fill(path: Path, seed: bytes) -> str:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, 64 * MiB, 9 * MiB):
            os.pwrite(fd, hashlib.sha256(seed + bytes(offset)).digest() * 4096, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: Each step a move persists, and who dies there.
STEPS = (
    "controller:move:source-released",
    "controller:move:target-assigned",
    "controller:move:final-captured",
    "controller:move:verified",
    "controller:move:switched",
    "node:export:captured",  # the source, after capturing its final image
    "node:replica:committed",  # the target, after committing, before reporting
    "node:image:promoted",  # the target, after adopting the replica, before cleaning up
)


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_of_a_move_resumes_and_completes(mobile: Place, step: str) -> None:
    name = "crash-" + step.replace(":", "-")
    volume_id = create_on(mobile, "node-1", name).volume_id
    _publish(mobile, volume_id, "node-1")
    _unpublish(mobile, volume_id, "node-1")  # published once: the usual history
    source, target = "node-1", "node-3"
    before = _fill(_image(mobile, source, volume_id), step.encode())
    crash_file = mobile.directory / "crash-at"
    crash_file.write_text(step + "\n")

    context, retries = _publish_until_done(mobile, volume_id, target)

    assert crash_file.read_text() == "", f"nothing reached {step}"
    assert retries > 0
    assert context["ferry.csi.dev/epoch"] == "2"
    moved = _image(mobile, target, volume_id)
    assert hashlib.sha256(moved.read_bytes()).hexdigest() == before
    assert not _image(mobile, source, volume_id).exists()
    replica = mobile.node_dir(source) / "pool" / "replicas" / volume_id
    kept = sorted(replica.glob("gen-*/image"))
    assert len(kept) == 1 and hashlib.sha256(kept[0].read_bytes()).hexdigest() == before
    leftovers = [p.name for p in replica.iterdir() if not p.name.startswith("gen-")]
    assert leftovers == [], "a half-built generation was left behind"
    assert not (mobile.node_dir(target) / "pool" / "replicas" / volume_id).exists()
