"""CSI Controller service: validate each request, call the VolumeService, respond."""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver.controller.snapshots import CloneSource, SnapshotService, SnapshotView
from csi_driver.controller.volumes import FS_TYPE_CONTEXT_KEY, VolumeService
from csi_driver.core.encryption import ENCRYPTED_CONTEXT_KEY
from csi_driver.core.model import AccessType, Volume
from csi_driver.core.params import parse_parameters
from csi_driver.csi.convert import (
    capabilities_from_proto,
    capability_from_proto,
    capacity_from_proto,
    content_source_from_proto,
    requirement_from_proto,
    topology_from_proto,
    topology_to_proto,
)
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.rpc.errors import rpc

_RPC = csi_pb2.ControllerServiceCapability.RPC

CAPABILITIES = (
    _RPC.CREATE_DELETE_VOLUME,
    _RPC.PUBLISH_UNPUBLISH_VOLUME,
    _RPC.LIST_VOLUMES,
    _RPC.GET_CAPACITY,
    _RPC.EXPAND_VOLUME,
    _RPC.LIST_VOLUMES_PUBLISHED_NODES,
    _RPC.VOLUME_CONDITION,
    _RPC.GET_VOLUME,
    _RPC.SINGLE_NODE_MULTI_WRITER,
    _RPC.MODIFY_VOLUME,
    _RPC.CREATE_DELETE_SNAPSHOT,
    _RPC.LIST_SNAPSHOTS,
    _RPC.CLONE_VOLUME,
    _RPC.GET_SNAPSHOT,
)

ACCESS_TYPE_CONTEXT_KEY = "ferry.csi.dev/access-type"


def snapshot_message(view: SnapshotView) -> Any:
    snapshot = csi_pb2.Snapshot(
        size_bytes=view.size_bytes,
        snapshot_id=view.snapshot_id,
        source_volume_id=view.source_volume_id,
        ready_to_use=view.ready,
        group_snapshot_id=view.group_id,
    )
    snapshot.creation_time.FromNanoseconds(int(view.created_at * 1e9))
    return snapshot


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, volumes: VolumeService, snapshots: SnapshotService) -> None:
        self._volumes = volumes
        self._snapshots = snapshots

    def _volume_message(self, volume: Volume) -> Any:
        context = {ACCESS_TYPE_CONTEXT_KEY: volume.access_type.value}
        if volume.access_type is AccessType.MOUNT and volume.fs_type:
            context[FS_TYPE_CONTEXT_KEY] = volume.fs_type.value
        if parse_parameters(dict(volume.parameters)).encrypted:
            # kubelet hands this back to NodeStageVolume, with the node-stage secret.
            context[ENCRYPTED_CONTEXT_KEY] = "true"
        return csi_pb2.Volume(
            volume_id=volume.volume_id,
            capacity_bytes=volume.capacity_bytes,
            volume_context=context,
            accessible_topology=[
                topology_to_proto(t) for t in self._volumes.accessible_topology(volume)
            ],
        )

    def _condition(self, volume: Volume) -> Any:
        condition = self._volumes.condition(volume)
        return csi_pb2.VolumeCondition(abnormal=condition.abnormal, message=condition.message)

    @rpc(required=("name", "volume_capabilities"))
    def CreateVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        capabilities = capabilities_from_proto(request.volume_capabilities)
        described, resolve = "", None
        if request.HasField("volume_content_source"):
            snapshot_id, volume_id = content_source_from_proto(request.volume_content_source)
            described = f"snapshot:{snapshot_id}" if snapshot_id else f"volume:{volume_id}"

            def resolve() -> CloneSource:
                return self._snapshots.clone_source(snapshot_id, volume_id, request.name)

        volume = self._volumes.create_volume(
            name=request.name,
            capacity=capacity_from_proto(request),
            capabilities=capabilities,
            parameters=dict(request.parameters),
            requirement=requirement_from_proto(request),
            mutable_parameters=dict(request.mutable_parameters),
            content_source=described,
            resolve_source=resolve,
        )
        if described.startswith("volume:"):
            self._snapshots.release_clone(request.name)
        message = self._volume_message(volume)
        if request.HasField("volume_content_source"):
            message.content_source.CopyFrom(request.volume_content_source)
        return csi_pb2.CreateVolumeResponse(volume=message)

    @rpc(required=("volume_id",))
    def DeleteVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._volumes.delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    @rpc(required=("volume_id", "node_id", "volume_capability"))
    def ControllerPublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        capability = capability_from_proto(request.volume_capability)
        publish_context = self._volumes.publish(
            request.volume_id, request.node_id, capability, request.readonly
        )
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=publish_context)

    @rpc(required=("volume_id",))
    def ControllerUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._volumes.unpublish(request.volume_id, request.node_id)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    @rpc(required=("volume_id", "volume_capabilities"))
    def ValidateVolumeCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        capabilities = capabilities_from_proto(request.volume_capabilities)
        reason = self._volumes.validate_capabilities(
            request.volume_id,
            capabilities,
            dict(request.parameters),
            dict(request.mutable_parameters),
        )
        if reason:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=dict(request.volume_context),
            volume_capabilities=list(request.volume_capabilities),
            parameters=dict(request.parameters),
            mutable_parameters=dict(request.mutable_parameters),
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @rpc
    def ListVolumes(self, request: Any, context: grpc.ServicerContext) -> Any:
        volumes, next_token = self._volumes.list_volumes(
            request.max_entries, request.starting_token
        )
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=self._volume_message(v),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    published_node_ids=[p.node_id for p in v.publications],
                    volume_condition=self._condition(v),
                ),
            )
            for v in volumes
        ]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    @rpc
    def GetCapacity(self, request: Any, context: grpc.ServicerContext) -> Any:
        capabilities = capabilities_from_proto(request.volume_capabilities)
        segment = (
            topology_from_proto(request.accessible_topology)
            if request.HasField("accessible_topology")
            else None
        )
        capacity = self._volumes.capacity(capabilities, dict(request.parameters), segment)
        response = csi_pb2.GetCapacityResponse(available_capacity=capacity.available_bytes)
        response.maximum_volume_size.value = capacity.maximum_volume_bytes
        response.minimum_volume_size.value = capacity.minimum_volume_bytes
        return response

    @rpc
    def ControllerGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.ControllerServiceCapability(
                    rpc=csi_pb2.ControllerServiceCapability.RPC(type=kind)
                )
                for kind in CAPABILITIES
            ]
        )

    @rpc(required=("volume_id",))
    def ControllerGetVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume = self._volumes.get_volume(request.volume_id)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume_message(volume),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=[p.node_id for p in volume.publications],
                volume_condition=self._condition(volume),
            ),
        )

    @rpc(required=("volume_id", "capacity_range"))
    def ControllerExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.HasField("volume_capability"):
            capability_from_proto(request.volume_capability)
        size = self._volumes.expand(request.volume_id, capacity_from_proto(request))
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=True
        )

    @rpc(required=("volume_id", "mutable_parameters"))
    def ControllerModifyVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._volumes.modify(request.volume_id, dict(request.mutable_parameters))
        return csi_pb2.ControllerModifyVolumeResponse()

    @rpc(required=("source_volume_id", "name"))
    def CreateSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        view = self._snapshots.create(
            request.name, request.source_volume_id, dict(request.parameters), acknowledge=True
        )
        return csi_pb2.CreateSnapshotResponse(snapshot=snapshot_message(view))

    @rpc(required=("snapshot_id",))
    def DeleteSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._snapshots.delete(request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    @rpc
    def ListSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:
        views, next_token = self._snapshots.list(
            request.snapshot_id,
            request.source_volume_id,
            request.max_entries,
            request.starting_token,
        )
        entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=snapshot_message(v)) for v in views]
        return csi_pb2.ListSnapshotsResponse(entries=entries, next_token=next_token)

    @rpc(required=("snapshot_id",))
    def GetSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        view = self._snapshots.get(request.snapshot_id)
        return csi_pb2.GetSnapshotResponse(snapshot=snapshot_message(view))
