"""Volumes follow their pods: replicas, moves and epoch fencing, in one process.

Two real node services (node-a all-in-one with the controller, node-b on
its own socket) share one SQLite catalog and pull chunks from each other
over real gRPC unix sockets. Images are written as files (no loop device
needed): a move of an unstaged volume ships its image, verified, and
switches the primary; the old node is then refused NodeStageVolume.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from csi_driver.controller.overview import drain, drained, overview, undrain
from csi_driver.controller.replication import POLL_S
from csi_driver.core.errors import NotFound
from csi_driver.core.model import MiB
from csi_driver.core.records import (
    ExportSpec,
    ExportStatus,
    ImageRole,
    ImageSpec,
    ImageStatus,
    MoveSpec,
    MoveStatus,
    MoveStep,
    drain_spec_key,
    export_spec_key,
    export_status_key,
    image_spec_key,
    image_status_key,
    move_spec_key,
    move_status_key,
    revise,
)
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import put, read, unchanged_since
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import NODE_ID, Ferry, expect_code

SECOND = "node-b"
CHUNK = 4 * MiB


@pytest.fixture
def catalog(ferry: Ferry) -> Iterator[Catalog]:
    store = SqliteStore(ferry.catalog)
    try:
        yield Catalog(store)
    finally:
        store.close()


def _image(ferry: Ferry, node: str, volume_id: str) -> Path:
    return ferry.base / node / "pool" / "images" / f"{volume_id}.img"


def _scribble(path: Path, offsets: list[int], seed: bytes) -> None:
    """Write 64 KiB of distinct bytes at each offset, durably, as a workload would."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in offsets:
            block = hashlib.sha256(seed + str(offset).encode()).digest() * 2048
            os.pwrite(fd, block, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _publish(ferry: Ferry, volume_id: str, node: str, timeout: float = 60) -> dict[str, str]:
    request = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node, volume_capability=mount_capability()
    )
    reply = ferry.client.controller.ControllerPublishVolume(request, timeout=timeout)
    return dict(reply.publish_context)


def _unpublish(ferry: Ferry, volume_id: str, node: str) -> None:
    ferry.client.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node)
    )


def _retired(ferry: Ferry, catalog: Catalog, node: str, volume_id: str) -> bool:
    """``node`` holds nothing of the volume any more, in its pool or the catalog, and
    its accounting charges nothing for it (the tests' volumes are its only ones)."""
    pool = ferry.base / node / "pool"
    account = catalog.account(node)
    return (
        catalog.store.get(image_spec_key(node, volume_id)) is None
        and catalog.store.get(image_status_key(node, volume_id)) is None
        and not (pool / "replicas" / volume_id).exists()
        and not (pool / "images" / f"{volume_id}.img").exists()
        and account is not None
        and account.value.provisioned_bytes == 0
        and account.value.volume_count == 0
    )


def _move_status(catalog: Catalog, volume_id: str) -> MoveStatus:
    found = read(catalog.store, MoveStatus, move_status_key(volume_id))
    assert found is not None
    return found.value


def _stage_request(ferry: Ferry, volume_id: str, epoch: str) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id,
        staging_target_path=ferry.staging(volume_id),
        volume_capability=mount_capability(),
        publish_context={"ferry.csi.dev/epoch": epoch},
    )


def _eventually(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    ends = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < ends, f"{what} not within {timeout} s"
        time.sleep(0.1)


def test_a_move_ships_the_image_verified_and_fences_the_old_primary(
    ferry: Ferry, second_node: str, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="csi_driver.kube.events")
    volume_id = ferry.create("mover", size=32 * MiB).volume_id
    source = _image(ferry, NODE_ID, volume_id)
    _scribble(source, [0, 5 * MiB, 17 * MiB, 31 * MiB], b"first")
    before = _digest(source)

    context = _publish(ferry, volume_id, SECOND)

    assert context == {"ferry.csi.dev/epoch": "2", "ferry.csi.dev/primary": SECOND}
    assert _digest(_image(ferry, SECOND, volume_id)) == before
    volume = catalog.require_volume(volume_id)
    assert (volume.primary_node, volume.epoch) == (SECOND, 2)
    new = read(catalog.store, ImageSpec, image_spec_key(SECOND, volume_id))
    assert new is not None and (new.value.role, new.value.epoch) == (ImageRole.PRIMARY, 2)
    # replicas: 0, so the old primary's copy is one too many: retired, its records
    # gone and node-a's accounting released, with nothing left in its pool.
    _eventually(lambda: _retired(ferry, catalog, NODE_ID, volume_id), "node-a's copy retired")
    assert not source.exists()
    status = _move_status(catalog, volume_id)
    assert status.step is MoveStep.DONE
    assert status.final_bytes == 4 * CHUNK  # the four written chunks, no hole
    reasons = [getattr(r, "reason", "") for r in caplog.records if r.name.endswith("events")]
    assert reasons[0] == "MoveStarted" and "MoveFinished" in reasons  # the PVC's Events

    details = expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        ferry.client.node.NodeStageVolume,
        _stage_request(ferry, volume_id, "1"),
    )
    assert "not its primary" in details and SECOND in details
    with CsiClient(f"unix://{ferry.base}/csi-b.sock") as node_b:
        details = expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            node_b.node.NodeStageVolume,
            _stage_request(ferry, volume_id, "1"),
        )
    assert "stale" in details


def test_moving_back_ships_only_what_changed(
    ferry: Ferry, second_node: str, catalog: Catalog
) -> None:
    # One replica: after each move the old primary's copy is that replica.
    volume_id = ferry.create("round-trip", size=32 * MiB, parameters={"replicas": "1"}).volume_id
    _scribble(_image(ferry, NODE_ID, volume_id), [0, 8 * MiB, 16 * MiB, 24 * MiB], b"one")
    _publish(ferry, volume_id, SECOND)
    _unpublish(ferry, volume_id, SECOND)
    moved = _image(ferry, SECOND, volume_id)
    _scribble(moved, [9 * MiB], b"two")  # one chunk changes on node-b
    after = _digest(moved)

    context = _publish(ferry, volume_id, NODE_ID)

    assert context["ferry.csi.dev/epoch"] == "3"
    assert _digest(_image(ferry, NODE_ID, volume_id)) == after
    # Four chunks went out, one came back (in the warm sync or the final one):
    # node-a kept its old image as the base, and node-b, now a replica, too.
    _eventually(lambda: _received(volume_id) == 5 * CHUNK, "node-b's resync as a replica")
    assert _move_status(catalog, volume_id).final_bytes in (0, CHUNK)


def _received(volume_id: str) -> float:
    """Bytes every replica in this process received for the volume (both nodes)."""
    return REGISTRY.get_sample_value("ferry_replica_sync_bytes_total", {"volume": volume_id}) or 0


def _aborted_at_a_short_deadline(ferry: Ferry, request: Any, deadline_s: float) -> str:
    """ControllerPublishVolume with a deadline far shorter than the move: the answer is
    ABORTED (with the move's progress), just before the deadline. A machine too loaded
    to answer even within it gives DEADLINE_EXCEEDED (the move is recorded and goes
    on): the same call again with twice the deadline, up to 2 s, must be ABORTED."""
    while True:
        try:
            ferry.client.controller.ControllerPublishVolume(request, timeout=deadline_s)
        except grpc.RpcError as exc:
            error: Any = exc
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline_s < 2:
                deadline_s *= 2
                continue
            assert error.code() == grpc.StatusCode.ABORTED, f"{error.code()}: {error.details()}"
            return str(error.details())
        raise AssertionError(f"the move finished within {deadline_s} s: not a short deadline")


def test_a_short_deadline_answers_aborted_with_progress_and_a_retry_completes(
    ferry: Ferry, second_node: str, catalog: Catalog
) -> None:
    volume_id = ferry.create("slow-caller", size=32 * MiB).volume_id
    _scribble(_image(ferry, NODE_ID, volume_id), [MiB * i for i in range(0, 32, 4)], b"x")
    request = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=SECOND, volume_capability=mount_capability()
    )
    details = _aborted_at_a_short_deadline(ferry, request, 0.25)
    assert "moving from node node-a to node-b" in details and "step" in details
    assert read(catalog.store, MoveSpec, move_spec_key(volume_id)) is not None
    assert _publish(ferry, volume_id, SECOND)["ferry.csi.dev/epoch"] == "2"


def test_a_publish_to_the_source_while_it_moves_away_is_aborted(
    ferry: Ferry, second_node: str, catalog: Catalog
) -> None:
    volume_id = ferry.create("contended", size=32 * MiB).volume_id
    request = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=SECOND, volume_capability=mount_capability()
    )
    # A caller that gives up at once leaves the move recorded.
    _aborted_at_a_short_deadline(ferry, request, 0.21)
    status = read(catalog.store, MoveStatus, move_status_key(volume_id))
    if status is None or not status.value.step.finished:
        details = expect_code(
            grpc.StatusCode.ABORTED,
            ferry.client.controller.ControllerPublishVolume,
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume_id, node_id=NODE_ID, volume_capability=mount_capability()
            ),
        )
        assert "moving to node node-b" in details
    _eventually(
        lambda: (
            (found := read(catalog.store, MoveStatus, move_status_key(volume_id))) is not None
            and found.value.step is MoveStep.DONE
        ),
        "the move to finish",
    )


def test_replicas_are_assigned_on_other_nodes_and_synced_verified(
    ferry: Ferry, second_node: str, catalog: Catalog
) -> None:
    volume_id = ferry.create("replicated", size=32 * MiB, parameters={"replicas": "1"}).volume_id
    source = _image(ferry, NODE_ID, volume_id)

    def synced() -> bool:
        export = read(catalog.store, ExportStatus, export_status_key(NODE_ID, volume_id))
        replica = read(catalog.store, ImageStatus, image_status_key(SECOND, volume_id))
        return (
            export is not None
            and replica is not None
            and bool(replica.value.synced_transfer)
            and replica.value.synced_transfer == export.value.transfer_id
            and replica.value.manifest_digest == export.value.manifest_digest
        )

    _eventually(synced, "node-b's replica synced")
    spec = read(catalog.store, ImageSpec, image_spec_key(SECOND, volume_id))
    assert spec is not None
    assert (spec.value.role, spec.value.source_node) == (ImageRole.REPLICA, NODE_ID)
    replica = ferry.base / SECOND / "pool" / "replicas" / volume_id
    generations = sorted(replica.glob("gen-*/image"))
    assert len(generations) == 1
    assert _digest(generations[0]) == _digest(source)
    assert not _image(ferry, SECOND, volume_id).exists()  # a replica is not a pool image

    # A new round (what a schedule or a retry asks for) ships only the change.
    _scribble(source, [12 * MiB], b"later")
    export = read(catalog.store, ExportSpec, export_spec_key(NODE_ID, volume_id))
    assert export is not None
    catalog.store.txn(
        [unchanged_since(export.value.key, export)],
        [put(revise(export.value, round=export.value.round + 1))],
    )
    _eventually(
        lambda: (
            synced()
            and (status := read(catalog.store, ImageStatus, image_status_key(SECOND, volume_id)))
            is not None
            and status.value.synced_transfer.endswith("-r2")
        ),
        "the second round synced",
    )
    status = read(catalog.store, ImageStatus, image_status_key(SECOND, volume_id))
    assert status is not None and status.value.synced_bytes == CHUNK
    # The older generation goes once the new one is reported.
    _eventually(lambda: len(list(replica.glob("gen-*/image"))) == 1, "the older one retired")
    generations = sorted(replica.glob("gen-*/image"))
    assert len(generations) == 1 and _digest(generations[0]) == _digest(source)


def test_a_mounted_volume_is_replicated_every_rpo_crash_consistently(
    mountable: Ferry, second_node: str, catalog: Catalog
) -> None:
    ferry = mountable
    volume_id = ferry.create(
        "rpo", size=32 * MiB, parameters={"replicas": "1", "rpoSeconds": "1"}
    ).volume_id
    ferry.stage(volume_id)
    target = Path(ferry.publish(volume_id))
    replica = ferry.base / SECOND / "pool" / "replicas" / volume_id
    try:
        for round_ in range(2):
            block = os.urandom(4096)
            written = time.time()
            with open(target / f"file-{round_}", "wb") as handle:
                handle.write(block)
                handle.flush()
                os.fsync(handle.fileno())

            def holds_it(block: bytes = block, written: float = written) -> bool:
                status = read(catalog.store, ImageStatus, image_status_key(SECOND, volume_id))
                if status is None or status.value.synced_captured_at <= written:
                    return False
                images = sorted(replica.glob("gen-*/image"))
                return bool(images) and block in images[-1].read_bytes()

            # Captured after the write (frozen, so its data is in the image), shipped.
            _eventually(holds_it, f"round {round_} on the replica", timeout=30)
    finally:
        ferry.client.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )
        ferry.client.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=volume_id, staging_target_path=ferry.staging(volume_id)
            )
        )
    status = read(catalog.store, ImageStatus, image_status_key(SECOND, volume_id))
    assert status is not None and 0 < status.value.synced_bytes < 32 * MiB  # deltas


def test_ferry_volumes_shows_primary_replicas_and_lag(
    ferry: Ferry, second_node: str, catalog: Catalog
) -> None:
    volume_id = ferry.create("shown", size=16 * MiB, parameters={"replicas": "1"}).volume_id
    _eventually(
        lambda: any(v.replicas and v.replicas[0].synced for v in overview(catalog)),
        "the replica synced",
    )
    (view,) = overview(catalog)
    assert (view.volume.volume_id, view.volume.primary_node, view.volume.epoch) == (
        volume_id,
        NODE_ID,
        1,
    )
    assert [r.node_id for r in view.replicas] == [SECOND]
    assert view.replicas[0].lag_s is not None and 0 <= view.replicas[0].lag_s < 60
    shown = subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", "volumes", "--catalog", str(ferry.catalog)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=True,
    ).stdout
    header, row = shown.splitlines()[:2]
    assert header.split()[:4] == ["VOLUME", "NAME", "PRIMARY", "EPOCH"]
    assert row.split()[:4] == [volume_id, "shown", NODE_ID, "1"]
    assert f"{SECOND}(" in row


def test_a_drained_node_hands_over_in_a_move_that_ships_nothing_more(
    ferry: Ferry, second_node: str, catalog: Catalog
) -> None:
    volume_id = ferry.create("drained", size=32 * MiB).volume_id
    _scribble(_image(ferry, NODE_ID, volume_id), [0, 20 * MiB], b"drain")
    wanted = drain(catalog, NODE_ID)
    assert list(wanted) == [volume_id]
    _eventually(lambda: all(drained(catalog, NODE_ID, wanted).values()), "the drain")
    # replicas: 0, yet the replica the drain made is pinned for the move it prepares:
    # the leader's passes (every few seconds) leave it in place.
    time.sleep(2 * POLL_S)
    replica = read(catalog.store, ImageSpec, image_spec_key(SECOND, volume_id))
    assert replica is not None and replica.value.role is ImageRole.REPLICA
    assert (replica.value.pinned_for, replica.value.deleted) == (NODE_ID, False)
    assert catalog.store.get(drain_spec_key(NODE_ID)) is not None  # node-a is leaving

    assert _publish(ferry, volume_id, SECOND)["ferry.csi.dev/epoch"] == "2"
    assert _move_status(catalog, volume_id).final_bytes == 0  # the drain shipped it all
    primary = read(catalog.store, ImageSpec, image_spec_key(SECOND, volume_id))
    assert primary is not None and primary.value.pinned_for == ""  # the pin is released
    # The old primary's copy on the drained node is one too many: retired.
    _eventually(lambda: _retired(ferry, catalog, NODE_ID, volume_id), "node-a's copy retired")
    assert undrain(catalog, NODE_ID) and not undrain(catalog, NODE_ID)
    with pytest.raises(NotFound):
        drain(catalog, "node-z")


def test_a_stage_with_a_malformed_epoch_in_its_context_is_invalid_argument(
    ferry: Ferry,
) -> None:
    volume_id = ferry.create("garbled", size=16 * MiB).volume_id
    details = expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        ferry.client.node.NodeStageVolume,
        _stage_request(ferry, volume_id, "one"),
    )
    assert "epoch" in details


def test_deleting_a_replicated_volume_leaves_no_replica_or_record_behind(
    ferry: Ferry, second_node: str, catalog: Catalog
) -> None:
    volume_id = ferry.create("doomed", size=16 * MiB, parameters={"replicas": "1"}).volume_id
    replica = ferry.base / SECOND / "pool" / "replicas" / volume_id
    _eventually(lambda: any(replica.glob("gen-*/image")), "the replica synced")
    ferry.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))

    def gone() -> bool:
        left = [
            r.key
            for prefix in ("spec/", "status/")
            for r in catalog.store.list(prefix)
            if r.key.endswith(volume_id)
        ]
        return not left and not replica.exists()

    _eventually(gone, "the replica and every record of the volume removed")
