"""An RPC whose deadline is spent starts no host work, and its retry completes it.

CreateVolume is the exception by design: its intent is a catalog record that
the node reconciles on its own, so a create out of time still gets its image
and the retry only finds it (docs/records.md).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import grpc
import pytest

from csi_driver.gen import csi_pb2
from csi_driver.metrics import RPC_REQUESTS
from csi_driver.node.loop import LoopDevices
from csi_driver.node.runner import DEADLINE_MARGIN_S, CommandRunner
from tests.csi.conftest import Ferry, mount_capability

#: Bound on waiting for the server's side of a call the client already gave up on.
HANDLER_BOUND_S = 30.0


def handled(method: str, code: str) -> float:
    return RPC_REQUESTS.labels(method, code)._value.get()


@pytest.mark.root
def test_a_stage_out_of_time_attaches_nothing_and_its_retry_completes(mountable: Ferry) -> None:
    vid = mountable.create("pvc-deadline").volume_id
    image = os.path.realpath(mountable.base / "node-a" / "pool" / "images" / f"{vid}.img")
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id=vid,
        staging_target_path=mountable.staging(vid),
        volume_capability=mount_capability(),
    )
    before = handled("NodeStageVolume", "DEADLINE_EXCEEDED")
    with pytest.raises(grpc.RpcError) as caught:
        mountable.client.node.NodeStageVolume(request, timeout=DEADLINE_MARGIN_S / 2)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    waited = time.monotonic()
    while handled("NodeStageVolume", "DEADLINE_EXCEEDED") == before:
        assert time.monotonic() - waited < HANDLER_BOUND_S, "the handler never gave up"
        time.sleep(0.05)
    loops = LoopDevices(CommandRunner())
    assert [loop for loop in loops.attached() if loop.backing_file == image] == []

    mountable.client.node.NodeStageVolume(request, timeout=60)  # kubelet's retry
    assert os.path.ismount(mountable.staging(vid))


def test_a_create_out_of_time_keeps_its_intent_and_its_retry_completes(ferry: Ferry) -> None:
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-late",
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * 2**20),
        volume_capabilities=[mount_capability()],
    )
    # Another process holds the catalog past the call's deadline: by the time Ferry
    # has recorded the volume's intent, no time is left to wait for the node. (The
    # all-in-one on SQLite made the image first, and its one txn, volume READY with
    # the image's status, lands once the holder lets go: that handler ends OK, late.)
    holder = sqlite3.connect(ferry.catalog, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(2.0, holder.rollback)
    release.start()

    def ended() -> float:
        return handled("CreateVolume", "UNAVAILABLE") + handled("CreateVolume", "OK")

    before = ended()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            ferry.client.controller.CreateVolume(request, timeout=1.0)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        waited = time.monotonic()
        while ended() == before:
            assert time.monotonic() - waited < HANDLER_BOUND_S, "the handler never ended"
            time.sleep(0.05)
    finally:
        release.join()
        holder.close()
    # The intent outlived the call: the node creates the image from its record,
    # with no RPC asking it, and the retry finds the same volume.
    images = ferry.base / "node-a" / "pool" / "images"
    waited = time.monotonic()
    while not list(images.glob("*.img")):
        assert time.monotonic() - waited < HANDLER_BOUND_S, "the node never reconciled"
        time.sleep(0.05)
    volume = ferry.client.controller.CreateVolume(request, timeout=60).volume  # the retry
    assert [p.name for p in images.glob("*.img")] == [f"{volume.volume_id}.img"]
