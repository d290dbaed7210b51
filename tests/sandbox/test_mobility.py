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
target's image byte-identical to the source's and nothing left behind (the
source's copy, one too many for ``replicas: 0``, retired).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.csi.client import mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.sandbox.demo import Demo, Workload
from csi_driver.sandbox.harness import Sandbox
from csi_driver.sandbox.plan import SANDBOX_NODE_LOST_AFTER_S
from tests.sandbox.conftest import Place, _missing, _new_place, requires_host, run_ferry
from tests.sandbox.test_sandbox import NODE_KEY, RETRYABLE, create_on

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
    return str(Demo(Sandbox(place.directory)).mount(volume_id, node, context))


def unmount(place: Place, node: str, volume_id: str) -> None:
    Demo(Sandbox(place.directory)).unmount(volume_id, node)


def _stage_stale(place: Place, node: str, volume_id: str) -> None:
    """NodeStageVolume as kubelet would retry it with the first attachment's context."""
    staging, _ = Demo(Sandbox(place.directory)).paths(node, volume_id)
    with place.client(node) as client:
        client.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                volume_capability=mount_capability(),
                publish_context={"ferry.csi.dev/epoch": "1"},
            ),
            timeout=10,
        )


def test_a_moved_volume_keeps_every_acknowledged_write_and_fences_the_old_node(
    mobile: Place,
) -> None:
    volume_id = create_on(mobile, "node-1", "moving-writer").volume_id
    context = _publish(mobile, volume_id, "node-1")
    target = _stage_and_publish(mobile, "node-1", volume_id, context)
    writer = Workload(Path(target) / "log")  # fsyncs every record, keeps their checksums
    writer.run_for(1.0)
    unmount(mobile, "node-1", volume_id)
    _unpublish(mobile, volume_id, "node-1")

    started = time.monotonic()
    context, _ = _publish_until_done(mobile, volume_id, "node-2")
    moved = _stage_and_publish(mobile, "node-2", volume_id, context)
    downtime = time.monotonic() - started

    assert writer.intact_in(Path(moved) / "log") == len(writer.acknowledged) > 0
    assert context["ferry.csi.dev/epoch"] == "2"
    print(f"\nmoved {len(writer.acknowledged)} records, publish to mounted in {downtime:.2f} s")

    with pytest.raises(grpc.RpcError) as refused:
        _stage_stale(mobile, "node-1", volume_id)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    shown = run_ferry("volumes", "--sandbox", str(mobile.directory)).stdout
    row = next(line for line in shown.splitlines() if line.startswith(volume_id)).split()
    assert row[2:4] == ["node-2", "2"]  # node-1's copy: a replica, or retired (replicas: 0)
    assert "not its primary" in (refused.value.details() or "")
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
    replica = mobile.node_dir(source) / "pool" / "replicas" / volume_id

    # replicas: 0, so the old primary's copy is one too many after the move: the
    # source's own reconciler demotes it, then removes it, half-built parts and all.
    def retired() -> bool:
        return not _image(mobile, source, volume_id).exists() and not replica.exists()

    _eventually(retired, "the source's copy retired")
    shown = Demo(Sandbox(mobile.directory)).volume(volume_id)
    assert (shown["primary"], shown["replicas"]) == (target, [])
    _eventually(
        lambda: not (mobile.node_dir(target) / "pool" / "replicas" / volume_id).exists(),
        "the target's replica directory gone once promoted",
    )


def _create_replicated(place: Place, node: str, name: str) -> str:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[mount_capability()],
        parameters={"replicas": "1", "rpoSeconds": "1", "failoverPolicy": "promote"},
    )
    request.accessibility_requirements.requisite.add().segments[NODE_KEY] = node
    with place.client("controller") as client:
        return str(client.controller.CreateVolume(request, timeout=60).volume.volume_id)


def _eventually(check: Any, what: str, timeout: float = 30) -> Any:
    ends = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < ends, f"{what} not within {timeout} s"
        time.sleep(0.2)


def _write_block(directory: Path, name: str) -> bytes:
    block = secrets.token_bytes(RECORD)
    with open(directory / name, "wb") as handle:
        handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    return block


def _holds(images: list[Path], block: bytes) -> bool:
    return any(block in image.read_bytes() for image in images)


def test_a_partitioned_primary_is_failed_over_fenced_and_keeps_its_divergent_data(
    mobile: Place,
) -> None:
    volume_id = _create_replicated(mobile, "node-1", "split-brain")
    context = _publish(mobile, volume_id, "node-1")
    mounted = Path(_stage_and_publish(mobile, "node-1", volume_id, context))
    acknowledged = _write_block(mounted, "before")

    def replica_node() -> str | None:
        for node in ("node-2", "node-3"):
            images = sorted(
                (mobile.node_dir(node) / "pool" / "replicas" / volume_id).glob("gen-*/image")
            )
            if images and _holds(images, acknowledged):
                return node
        return None

    survivor = _eventually(replica_node, "the write replicated (rpoSeconds 1)")
    mobile.fault("cut", "node-1")
    try:
        divergent = _write_block(mounted, "after")  # the partitioned primary goes on writing
        _unpublish(mobile, volume_id, "node-1")  # Kubernetes' force detach after the taint
        context, _ = _publish_until_done(mobile, volume_id, survivor)
        assert context["ferry.csi.dev/epoch"] == "2"
        moved = Path(_stage_and_publish(mobile, survivor, volume_id, context))
        assert (moved / "before").read_bytes() == acknowledged
        assert not (moved / "after").exists()
    finally:
        mobile.fault("heal", "node-1")

    def refused() -> str | None:
        try:
            _stage_stale(mobile, "node-1", volume_id)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                return exc.details() or "refused"
            return None  # its catalog connection is still coming back
        raise AssertionError("the old primary staged the volume again")

    assert "epoch 2" in _eventually(refused, "the returned node refused a stage")
    unmount(mobile, "node-1", volume_id)  # kubelet cleans up the dead pod there
    preserved = mobile.node_dir("node-1") / "pool" / "preserved"
    _eventually(
        lambda: _holds(sorted(preserved.glob(f"{volume_id}-*.img")), divergent),
        "the divergent image kept aside",
    )

    # node-1 was lost past --node-lost-after: its copy was re-placed (replicas: 1) on the
    # third node, or, had no node been free, node-1 resynced as the replica.
    def replica_holds_it() -> bool:
        replicas = Demo(Sandbox(mobile.directory)).volume(volume_id)["replicas"]
        return len(replicas) == 1 and _holds(
            sorted(
                (mobile.node_dir(replicas[0]["node_id"]) / "pool" / "replicas" / volume_id).glob(
                    "gen-*/image"
                )
            ),
            acknowledged,
        )

    _eventually(replica_holds_it, "one replica in place again, holding every acknowledged write")
    unmount(mobile, survivor, volume_id)
    _unpublish(mobile, volume_id, survivor)


def test_a_forced_detach_from_a_lost_node_is_fenced_and_the_node_resumes_with_a_new_epoch(
    mobile: Place,
) -> None:
    request = csi_pb2.CreateVolumeRequest(
        name="fenced",
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[mount_capability()],
        parameters={"failoverPolicy": "wait"},
    )
    request.accessibility_requirements.requisite.add().segments[NODE_KEY] = "node-1"

    def created() -> str | None:
        # node-1 was cut and healed by the test before: under load its heartbeat may
        # not have landed yet (this test is about the forced detach, not readiness).
        with mobile.client("controller") as client:
            try:
                return str(client.controller.CreateVolume(request, timeout=60).volume.volume_id)
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "node-1" in (
                    exc.details() or ""
                ):
                    return None
                raise

    volume_id = _eventually(created, "node-1 ready again for a new volume")
    mounted = Path(
        _stage_and_publish(mobile, "node-1", volume_id, _publish(mobile, volume_id, "node-1"))
    )
    written = _write_block(mounted, "kept")
    mobile.fault("cut", "node-1")
    try:
        demo = Demo(Sandbox(mobile.directory))
        time.sleep(SANDBOX_NODE_LOST_AFTER_S + 1.5)  # the node is lost now
        _unpublish(mobile, volume_id, "node-1")  # Kubernetes' forced detach: answered OK
        fence = _eventually(lambda: demo.volume(volume_id)["fence"], "the fence recorded")
        assert (fence["node_id"], fence["epoch"]) == ("node-1", 2)
        assert demo.volume(volume_id)["epoch"] == 2
    finally:
        mobile.fault("heal", "node-1")
    # Back: the old attachment (epoch 1) can never be staged again...
    details = _eventually(lambda: _refused(mobile, "node-1", volume_id), "the stale stage refused")
    assert "stale attachment" in details
    unmount(mobile, "node-1", volume_id)  # kubelet cleans up the dead pod
    # ...but with failoverPolicy wait the data stayed there: a new attachment uses it.
    context = _publish(mobile, volume_id, "node-1")
    assert context["ferry.csi.dev/epoch"] == "2"
    remounted = Path(_stage_and_publish(mobile, "node-1", volume_id, context))
    assert (remounted / "kept").read_bytes() == written
    unmount(mobile, "node-1", volume_id)
    _unpublish(mobile, volume_id, "node-1")


def _refused(place: Place, node: str, volume_id: str) -> str | None:
    """The details of a refused stale stage; None while the node's catalog link returns."""
    try:
        _stage_stale(place, node, volume_id)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
            return exc.details() or "refused"
        return None
    raise AssertionError("a stale attachment was staged")
