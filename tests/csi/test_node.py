"""Node service over the CSI socket, on real loop devices and mounts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.errors import STAGING_PATH_NOT_SET
from csi_driver.core.model import MiB
from csi_driver.core.placement import NODE_KEY, ZONE_KEY
from csi_driver.gen import csi_pb2
from csi_driver.node.runner import CommandRunner
from tests.csi.conftest import NODE_ID, ZONE, Ferry, block_capability, expect_code, mount_capability

INVALID = grpc.StatusCode.INVALID_ARGUMENT
_RPC = csi_pb2.NodeServiceCapability.RPC
pytestmark = pytest.mark.root


def _changed(request: Any, changes: dict[str, object]) -> Any:
    """``request`` with fields replaced; a None value clears the field."""
    for key, value in changes.items():
        if value is None:
            request.ClearField(key)
        elif key == "volume_capability":
            request.volume_capability.CopyFrom(value)
        elif hasattr(value, "keys"):
            getattr(request, key).update(value)
        else:
            setattr(request, key, value)
    return request


def stage_request(ferry: Ferry, vid: str, **changes: object) -> Any:
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id=vid,
        staging_target_path=ferry.staging(vid),
        volume_capability=mount_capability(),
    )
    return _changed(request, changes)


def publish_request(ferry: Ferry, vid: str, **changes: object) -> Any:
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=ferry.staging(vid),
        target_path=ferry.target(vid),
        volume_capability=mount_capability(),
    )
    return _changed(request, changes)


class TestLifecycle:
    def test_full_cycle_keeps_data_across_restage(self, mountable: Ferry) -> None:
        ferry = mountable
        volume = ferry.create("cycle", size=64 * MiB)
        vid = volume.volume_id
        ferry.stage(vid)
        target = ferry.publish(vid)
        payload = os.urandom(2 * MiB)
        (Path(target) / "data").write_bytes(payload)
        node = ferry.client.node
        node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
        )
        node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=ferry.staging(vid))
        )
        assert not os.path.exists(target)
        ferry.stage(vid)
        ferry.publish(vid)
        assert (Path(target) / "data").read_bytes() == payload

    def test_every_step_is_idempotent(self, mountable: Ferry) -> None:
        ferry = mountable
        vid = ferry.create("idem").volume_id
        node = ferry.client.node

        def mounted(path: str) -> int:
            table = Path("/proc/self/mountinfo").read_text().splitlines()
            return sum(1 for line in table if line.split()[4] == path)

        for _ in range(2):
            node.NodeStageVolume(stage_request(ferry, vid))
            assert mounted(ferry.staging(vid)) == 1
        for _ in range(2):
            node.NodePublishVolume(publish_request(ferry, vid))
            assert mounted(ferry.target(vid)) == 1
        for _ in range(2):
            node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=ferry.target(vid))
            )
            assert mounted(ferry.target(vid)) == 0
            assert not os.path.exists(ferry.target(vid))
        for _ in range(2):
            node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=vid, staging_target_path=ferry.staging(vid)
                )
            )
            assert mounted(ferry.staging(vid)) == 0

    def test_xfs_volume_from_storage_class(self, mountable: Ferry) -> None:
        ferry = mountable
        volume = ferry.create("x", size=320 * MiB, parameters={"fsType": "xfs"})
        request = stage_request(ferry, volume.volume_id, volume_context=volume.volume_context)
        request.volume_capability.mount.fs_type = ""
        ferry.client.node.NodeStageVolume(request)
        mounts = Path("/proc/self/mountinfo").read_text()
        assert f" {ferry.staging(volume.volume_id)} " in mounts
        assert any(
            f" {ferry.staging(volume.volume_id)} " in line and " - xfs " in line
            for line in mounts.splitlines()
        )

    def test_block_volume(self, mountable: Ferry) -> None:
        ferry = mountable
        vid = ferry.create("blk", capability=block_capability()).volume_id
        ferry.stage(vid, block_capability())
        target = ferry.publish(vid, block_capability())
        assert Path(target).is_block_device()
        stats = ferry.client.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target)
        )
        assert stats.usage[0].total == 64 * MiB

    def test_readonly_publish(self, mountable: Ferry) -> None:
        ferry = mountable
        vid = ferry.create("ro").volume_id
        ferry.stage(vid)
        target = ferry.publish(vid, readonly=True)
        with pytest.raises(OSError):
            (Path(target) / "f").write_text("x")
        expect_code(
            grpc.StatusCode.ALREADY_EXISTS,
            ferry.client.node.NodePublishVolume,
            publish_request(ferry, vid, readonly=False),
        )


class TestNodeStage:
    @pytest.mark.parametrize("missing", ["volume_id", "staging_target_path", "volume_capability"])
    def test_missing_fields_are_invalid(self, mountable: Ferry, missing: str) -> None:
        vid = mountable.create("s").volume_id
        details = expect_code(
            INVALID,
            mountable.client.node.NodeStageVolume,
            stage_request(mountable, vid, **{missing: None}),
        )
        assert missing in details

    def test_unknown_volume_is_not_found(self, mountable: Ferry) -> None:
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            mountable.client.node.NodeStageVolume,
            stage_request(mountable, "vol-" + "6" * 32),
        )
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            mountable.client.node.NodeStageVolume,
            stage_request(mountable, "../etc"),
        )

    def test_second_staging_path_is_failed_precondition(self, mountable: Ferry) -> None:
        vid = mountable.create("s").volume_id
        mountable.stage(vid)
        other = stage_request(
            mountable, vid, staging_target_path=str(mountable.kubelet / "plugins" / "other")
        )
        expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, mountable.client.node.NodeStageVolume, other
        )

    def test_incompatible_restage_is_already_exists(self, mountable: Ferry) -> None:
        vid = mountable.create("s").volume_id
        mountable.stage(vid)
        request = stage_request(
            mountable, vid, volume_capability=mount_capability(flags=("noatime",))
        )
        expect_code(grpc.StatusCode.ALREADY_EXISTS, mountable.client.node.NodeStageVolume, request)

    @pytest.mark.parametrize("path", ["/etc/ferry", "relative", "KUBELET/../../x"])
    def test_paths_outside_kubelet_are_invalid(self, mountable: Ferry, path: str) -> None:
        vid = mountable.create("s").volume_id
        path = path.replace("KUBELET", str(mountable.kubelet))
        expect_code(
            INVALID,
            mountable.client.node.NodeStageVolume,
            stage_request(mountable, vid, staging_target_path=path),
        )

    def test_multi_node_access_mode_is_invalid(self, mountable: Ferry) -> None:
        vid = mountable.create("s").volume_id
        cap = mount_capability(mode="MULTI_NODE_MULTI_WRITER")
        request = stage_request(mountable, vid, volume_capability=cap)
        assert "single-node" in expect_code(INVALID, mountable.client.node.NodeStageVolume, request)

    def test_forbidden_mount_flag_is_invalid(self, mountable: Ferry) -> None:
        vid = mountable.create("s").volume_id
        request = stage_request(mountable, vid, volume_capability=mount_capability(flags=("bind",)))
        expect_code(INVALID, mountable.client.node.NodeStageVolume, request)

    def test_unstage_missing_fields_are_invalid(self, mountable: Ferry) -> None:
        for request in (
            csi_pb2.NodeUnstageVolumeRequest(staging_target_path=mountable.staging("x")),
            csi_pb2.NodeUnstageVolumeRequest(volume_id="vol-" + "7" * 32),
        ):
            expect_code(INVALID, mountable.client.node.NodeUnstageVolume, request)

    def test_unstage_while_published_is_failed_precondition(self, mountable: Ferry) -> None:
        vid = mountable.create("s").volume_id
        mountable.stage(vid)
        mountable.publish(vid)
        request = csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=mountable.staging(vid)
        )
        expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, mountable.client.node.NodeUnstageVolume, request
        )


class TestNodePublish:
    @pytest.mark.parametrize("missing", ["volume_id", "target_path", "volume_capability"])
    def test_missing_fields_are_invalid(self, mountable: Ferry, missing: str) -> None:
        vid = mountable.create("p").volume_id
        mountable.stage(vid)
        details = expect_code(
            INVALID,
            mountable.client.node.NodePublishVolume,
            publish_request(mountable, vid, **{missing: None}),
        )
        assert missing in details

    def test_unknown_volume_is_not_found(self, mountable: Ferry) -> None:
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            mountable.client.node.NodePublishVolume,
            publish_request(mountable, "vol-" + "8" * 32),
        )

    def test_missing_staging_path_is_failed_precondition(self, mountable: Ferry) -> None:
        # The spec's code when STAGE_UNSTAGE_VOLUME is advertised and the path is not set.
        details = expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            mountable.client.node.NodePublishVolume,
            publish_request(mountable, "vol-" + "8" * 32, staging_target_path=None),
        )
        assert details == STAGING_PATH_NOT_SET

    def test_unstaged_volume_is_failed_precondition(self, mountable: Ferry) -> None:
        vid = mountable.create("p").volume_id
        expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            mountable.client.node.NodePublishVolume,
            publish_request(mountable, vid),
        )

    def test_symlinked_target_is_invalid(self, mountable: Ferry) -> None:
        vid = mountable.create("p").volume_id
        mountable.stage(vid)
        (mountable.kubelet / "pods").mkdir(exist_ok=True)
        (mountable.kubelet / "pods" / "sneaky").symlink_to("/etc")
        request = publish_request(
            mountable, vid, target_path=str(mountable.kubelet / "pods" / "sneaky" / "mnt")
        )
        assert "symlink" in expect_code(INVALID, mountable.client.node.NodePublishVolume, request)

    def test_unpublish_missing_fields_are_invalid(self, mountable: Ferry) -> None:
        for request in (
            csi_pb2.NodeUnpublishVolumeRequest(target_path=mountable.target("x")),
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-" + "9" * 32),
        ):
            expect_code(INVALID, mountable.client.node.NodeUnpublishVolume, request)


class TestNodeGetVolumeStats:
    def test_bytes_and_inodes(self, mountable: Ferry) -> None:
        vid = mountable.create("st").volume_id
        mountable.stage(vid)
        target = mountable.publish(vid)
        reply = mountable.client.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target)
        )
        units = {u.unit: u for u in reply.usage}
        assert set(units) == {csi_pb2.VolumeUsage.BYTES, csi_pb2.VolumeUsage.INODES}
        assert 0 < units[csi_pb2.VolumeUsage.BYTES].total <= 64 * MiB
        assert units[csi_pb2.VolumeUsage.INODES].used > 0
        assert not reply.volume_condition.abnormal

    def test_lost_mount_is_abnormal(self, mountable: Ferry) -> None:
        vid = mountable.create("st").volume_id
        mountable.stage(vid)
        target = mountable.publish(vid)
        CommandRunner().run(["umount", target])  # the mount vanishes behind Ferry's back
        reply = mountable.client.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target)
        )
        assert reply.volume_condition.abnormal and reply.volume_condition.message

    def test_unknown_volume_or_path_is_not_found(self, mountable: Ferry) -> None:
        vid = mountable.create("st").volume_id
        mountable.stage(vid)
        for volume_id, path in (
            ("vol-" + "a" * 32, mountable.staging(vid)),
            (vid, mountable.target(vid)),
        ):
            expect_code(
                grpc.StatusCode.NOT_FOUND,
                mountable.client.node.NodeGetVolumeStats,
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path),
            )

    @pytest.mark.parametrize(
        "path", ["some/path", "KUBELET/pods/nothing-here", "KUBELET/pods", "/etc", "/"]
    )
    def test_a_path_where_the_volume_is_not_is_not_found(self, mountable: Ferry, path: str) -> None:
        """Relative, missing, another directory, outside the kubelet dir: all NOT_FOUND."""
        vid = mountable.create("st").volume_id
        mountable.stage(vid)
        mountable.publish(vid)
        path = path.replace("KUBELET", str(mountable.kubelet))
        for call, request in (
            (
                mountable.client.node.NodeGetVolumeStats,
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path),
            ),
            (
                mountable.client.node.NodeExpandVolume,
                csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=path),
            ),
        ):
            details = expect_code(grpc.StatusCode.NOT_FOUND, call, request)
            assert "neither staged nor published" in details

    def test_missing_fields_are_invalid(self, mountable: Ferry) -> None:
        expect_code(
            INVALID,
            mountable.client.node.NodeGetVolumeStats,
            csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-" + "b" * 32),
        )
        expect_code(
            INVALID,
            mountable.client.node.NodeGetVolumeStats,
            csi_pb2.NodeGetVolumeStatsRequest(volume_path="/x"),
        )


class TestNodeExpandVolume:
    def test_xfs_grows_online_through_the_csi_flow(self, mountable: Ferry) -> None:
        ferry = mountable
        vid = ferry.create("ex", size=320 * MiB, parameters={"fsType": "xfs"}).volume_id
        ferry.stage(vid, mount_capability("xfs"))
        target = ferry.publish(vid, mount_capability("xfs"))
        stats = os.statvfs(target)
        before = stats.f_blocks * stats.f_frsize
        ferry.client.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=448 * MiB)
            )
        )
        reply = ferry.client.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=vid,
                volume_path=target,
                capacity_range=csi_pb2.CapacityRange(required_bytes=448 * MiB),
            )
        )
        assert reply.capacity_bytes == 448 * MiB
        after = os.statvfs(target)
        assert after.f_blocks * after.f_frsize - before >= 120 * MiB

    def test_more_than_the_controller_granted_is_out_of_range(self, mountable: Ferry) -> None:
        vid = mountable.create("ex").volume_id
        mountable.stage(vid)
        request = csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid,
            volume_path=mountable.staging(vid),
            capacity_range=csi_pb2.CapacityRange(required_bytes=1024 * MiB),
        )
        expect_code(grpc.StatusCode.OUT_OF_RANGE, mountable.client.node.NodeExpandVolume, request)

    def test_unknown_volume_is_not_found(self, mountable: Ferry) -> None:
        request = csi_pb2.NodeExpandVolumeRequest(
            volume_id="vol-" + "c" * 32, volume_path=mountable.staging("x")
        )
        expect_code(grpc.StatusCode.NOT_FOUND, mountable.client.node.NodeExpandVolume, request)

    def test_missing_fields_are_invalid(self, mountable: Ferry) -> None:
        expect_code(
            INVALID,
            mountable.client.node.NodeExpandVolume,
            csi_pb2.NodeExpandVolumeRequest(volume_path="/x"),
        )
        expect_code(
            INVALID,
            mountable.client.node.NodeExpandVolume,
            csi_pb2.NodeExpandVolumeRequest(volume_id="vol-" + "d" * 32),
        )


def test_node_info_reports_id_limit_and_topology(ferry: Ferry) -> None:
    info = ferry.client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    assert info.max_volumes_per_node == 16
    assert dict(info.accessible_topology.segments) == {ZONE_KEY: ZONE, NODE_KEY: NODE_ID}


def test_node_capabilities(ferry: Ferry) -> None:
    reply = ferry.client.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    assert {c.rpc.type for c in reply.capabilities} == {
        _RPC.STAGE_UNSTAGE_VOLUME,
        _RPC.GET_VOLUME_STATS,
        _RPC.EXPAND_VOLUME,
        _RPC.VOLUME_CONDITION,
        _RPC.SINGLE_NODE_MULTI_WRITER,
    }
