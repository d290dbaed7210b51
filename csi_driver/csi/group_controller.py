"""CSI GroupController service: snapshots of several volumes at one point in time."""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver.controller.snapshots import GroupView, SnapshotService
from csi_driver.csi.controller import snapshot_message
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.rpc.errors import rpc

_RPC = csi_pb2.GroupControllerServiceCapability.RPC


def group_message(view: GroupView) -> Any:
    group = csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=view.group_id,
        snapshots=[snapshot_message(s) for s in view.snapshots],
        ready_to_use=view.ready,
    )
    group.creation_time.FromNanoseconds(int(view.created_at * 1e9))
    return group


class GroupControllerServicer(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, snapshots: SnapshotService) -> None:
        self._snapshots = snapshots

    @rpc
    def GroupControllerGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        kind = _RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
        return csi_pb2.GroupControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.GroupControllerServiceCapability(rpc=_RPC(type=kind))]
        )

    @rpc(required=("name", "source_volume_ids"))
    def CreateVolumeGroupSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        view = self._snapshots.create_group(
            request.name, list(request.source_volume_ids), dict(request.parameters)
        )
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=group_message(view))

    @rpc(required=("group_snapshot_id",))
    def DeleteVolumeGroupSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._snapshots.delete_group(request.group_snapshot_id, list(request.snapshot_ids))
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    @rpc(required=("group_snapshot_id",))
    def GetVolumeGroupSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        view = self._snapshots.get_group(request.group_snapshot_id, list(request.snapshot_ids))
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=group_message(view))
