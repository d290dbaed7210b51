"""DeleteVolume never deletes an image that is attached, staged or published.

Each case leaves the volume in use on the node the way kubelet (or a failed
cleanup) can, asks the controller to delete it over the CSI socket, and
checks the whole contract: FAILED_PRECONDITION naming where the volume is
still in use, the volume still usable (publishable, not DELETING), the
image file in the pool and no loop device backed by a "(deleted)" file;
then the real cleanup, after which a retry deletes it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.model import VolumeState
from csi_driver.gen import csi_pb2
from csi_driver.node.loop import LoopDevices
from csi_driver.node.runner import CommandRunner
from csi_driver.store.catalog import Catalog
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import NODE_ID, Ferry, block_capability, expect_code, mount_capability

pytestmark = pytest.mark.root
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
MULTI_WRITER = "SINGLE_NODE_MULTI_WRITER"


def _image(ferry: Ferry, vid: str) -> Path:
    return ferry.base / NODE_ID / "pool" / "images" / f"{vid}.img"


def _loops_of(ferry: Ferry, vid: str) -> list[Any]:
    image = os.path.realpath(_image(ferry, vid))
    return [loop for loop in LoopDevices(CommandRunner()).attached() if loop.backing_file == image]


def _delete(ferry: Ferry, vid: str) -> Any:
    return ferry.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))


def _refused(ferry: Ferry, vid: str, *expected: str, capability: Any = None) -> str:
    """DeleteVolume is refused, names ``expected``, and the volume is intact and usable."""
    details = expect_code(
        REFUSED, ferry.client.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid)
    )
    for phrase in expected:
        assert phrase in details, details
    assert _image(ferry, vid).stat().st_size > 0
    loops = _loops_of(ferry, vid)
    assert loops and not any(loop.deleted for loop in loops)
    for loop in loops:
        assert loop.device in details, details
    status = ferry.client.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vid)
    ).status
    assert not status.volume_condition.abnormal, status.volume_condition.message
    # Usable, not left DELETING: the controller accepts a publication again.
    publish = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=NODE_ID, volume_capability=capability or mount_capability()
    )
    ferry.client.controller.ControllerPublishVolume(publish)
    ferry.client.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID)
    )
    return details


def _unpublish(ferry: Ferry, vid: str, target: str) -> None:
    ferry.client.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
    )


def _unstage(ferry: Ferry, vid: str) -> None:
    ferry.client.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=ferry.staging(vid))
    )


def _deleted(ferry: Ferry, vid: str) -> None:
    assert _delete(ferry, vid) == csi_pb2.DeleteVolumeResponse()
    assert not _image(ferry, vid).exists()
    assert _loops_of(ferry, vid) == []
    expect_code(
        grpc.StatusCode.NOT_FOUND,
        ferry.client.controller.ControllerGetVolume,
        csi_pb2.ControllerGetVolumeRequest(volume_id=vid),
    )


def test_staged_volume_is_kept_until_unstaged(mountable: Ferry) -> None:
    ferry = mountable
    vid = ferry.create("staged-only").volume_id
    staging = ferry.stage(vid)
    (Path(staging) / "data").write_bytes(b"still here")
    _refused(ferry, vid, f"staged at {staging}", f"mounted at {staging}", NODE_ID)
    _refused(ferry, vid, f"staged at {staging}")  # a retry before cleanup is refused again
    assert (Path(staging) / "data").read_bytes() == b"still here"
    _unstage(ferry, vid)
    _deleted(ferry, vid)


def test_published_volume_is_kept_until_unpublished_and_unstaged(mountable: Ferry) -> None:
    ferry = mountable
    vid = ferry.create("published").volume_id
    staging = ferry.stage(vid)
    target = ferry.publish(vid)
    _refused(ferry, vid, f"published at {target}", f"mounted at {target}", staging)
    _unpublish(ferry, vid, target)
    details = _refused(ferry, vid, f"staged at {staging}")
    assert target not in details
    _unstage(ferry, vid)
    _deleted(ferry, vid)


def test_block_volume_is_kept_while_published(mountable: Ferry) -> None:
    ferry = mountable
    vid = ferry.create("block", capability=block_capability()).volume_id
    ferry.stage(vid, block_capability())
    target = ferry.publish(vid, block_capability())
    readonly = ferry.publish(vid, block_capability(), pod="pod-ro", readonly=True)
    details = _refused(
        ferry,
        vid,
        f"published at {target}",
        f"mounted at {readonly}",
        capability=block_capability(),
    )
    assert len(_loops_of(ferry, vid)) == 2, details  # the read-only one is named too
    _unpublish(ferry, vid, target)
    _unpublish(ferry, vid, readonly)
    _unstage(ferry, vid)
    _deleted(ferry, vid)


def test_target_published_inside_another_target(mountable: Ferry) -> None:
    """The conformance suite's cascade: unstage fails, then the volume is deleted."""
    ferry = mountable
    cap = mount_capability(mode=MULTI_WRITER)
    vid = ferry.create("nested", capability=cap).volume_id
    staging = ferry.stage(vid, cap)
    outer = ferry.publish(vid, cap)
    inner = str(Path(outer) / "nested")
    ferry.client.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=inner, volume_capability=cap
        )
    )
    # The outer target cannot be unmounted under the inner one, and unstage refuses.
    with pytest.raises(grpc.RpcError):
        _unpublish(ferry, vid, outer)
    expect_code(
        REFUSED,
        ferry.client.node.NodeUnstageVolume,
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
    )
    _refused(ferry, vid, f"published at {inner}", f"mounted at {inner}", f"staged at {staging}")
    _unpublish(ferry, vid, inner)
    _unpublish(ferry, vid, outer)
    _unstage(ferry, vid)
    _deleted(ferry, vid)


def test_crash_after_the_delete_intent_is_resolved_by_the_retry(mountable: Ferry) -> None:
    """A controller that crashed after persisting DELETING left the volume staged:
    the provisioner's retry is refused and the volume is READY again."""
    ferry = mountable
    vid = ferry.create("crashed").volume_id
    staging = ferry.stage(vid)
    store = SqliteStore(ferry.catalog)
    try:
        catalog = Catalog(store)
        catalog.update_volume(vid, lambda v: replace(v, state=VolumeState.DELETING))
        _refused(ferry, vid, f"staged at {staging}")
        volume = catalog.get_volume(vid)
        assert volume is not None and volume.state is VolumeState.READY
    finally:
        store.close()
    _unstage(ferry, vid)
    _deleted(ferry, vid)


def test_attached_loop_device_alone_keeps_the_image(mountable: Ferry) -> None:
    """A loop device nobody recorded (a crash between attach and record) still counts."""
    ferry = mountable
    vid = ferry.create("attached").volume_id
    device = LoopDevices(CommandRunner()).attach(_image(ferry, vid))
    try:
        _refused(ferry, vid, f"attached to loop device {device}")
    finally:
        LoopDevices(CommandRunner()).detach(device)
    _deleted(ferry, vid)


def _outcome(call: Any, request: Any, into: dict[str, grpc.StatusCode], name: str) -> None:
    try:
        call(request)
        into[name] = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        into[name] = exc.code()


def test_concurrent_stage_and_delete_never_delete_an_attached_image(mountable: Ferry) -> None:
    """Either the delete wins (stage finds no volume) or the stage does (delete refused)."""
    ferry = mountable
    for round_ in range(4):
        vid = ferry.create(f"race-{round_}").volume_id
        outcome: dict[str, grpc.StatusCode] = {}
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=vid,
            staging_target_path=ferry.staging(vid),
            volume_capability=mount_capability(),
        )
        delete = csi_pb2.DeleteVolumeRequest(volume_id=vid)
        threads = [
            threading.Thread(
                target=_outcome, args=(ferry.client.node.NodeStageVolume, stage, outcome, "stage")
            ),
            threading.Thread(
                target=_outcome,
                args=(ferry.client.controller.DeleteVolume, delete, outcome, "delete"),
            ),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not any(loop.deleted for loop in _loops_of(ferry, vid))
        if outcome["delete"] == grpc.StatusCode.OK:
            assert outcome["stage"] == grpc.StatusCode.NOT_FOUND, outcome
            assert _loops_of(ferry, vid) == [] and not _image(ferry, vid).exists()
        else:
            assert outcome == {"stage": grpc.StatusCode.OK, "delete": REFUSED}, outcome
            _unstage(ferry, vid)
            _deleted(ferry, vid)
