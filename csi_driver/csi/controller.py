"""CSI Controller service: validate each request, call the VolumeService, respond."""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver.controller.volumes import FS_TYPE_CONTEXT_KEY, VolumeService
from csi_driver.core.encryption import ENCRYPTED_CONTEXT_KEY
from csi_driver.core.errors import InvalidArgument, Unimplemented
from csi_driver.core.model import AccessType, Volume
from csi_driver.core.params import parse_parameters
from csi_driver.csi.convert import (
    capabilities_from_proto,
    capability_from_proto,
    capacity_from_proto,
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
)

ACCESS_TYPE_CONTEXT_KEY = "ferry.csi.dev/access-type"


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, volumes: VolumeService) -> None:
        self._volumes = volumes

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
        if request.HasField("volume_content_source"):
            raise InvalidArgument(
                "volume_content_source (clone or restore from snapshot) is not supported by "
                "this Ferry release; create an empty volume"
            )
        volume = self._volumes.create_volume(
            name=request.name,
            capacity=capacity_from_proto(request),
            capabilities=capabilities,
            parameters=dict(request.parameters),
            requirement=requirement_from_proto(request),
            mutable_parameters=dict(request.mutable_parameters),
        )
        return csi_pb2.CreateVolumeResponse(volume=self._volume_message(volume))

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

    # Not offered (and not advertised in ControllerGetCapabilities): UNIMPLEMENTED
    # whatever the request holds, so none of their fields is declared required.

    def _unoffered(self, what: str) -> Any:
        raise Unimplemented(f"{what} is not offered by this Ferry release")

    @rpc
    def CreateSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unoffered("CreateSnapshot")

    @rpc
    def DeleteSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unoffered("DeleteSnapshot")

    @rpc
    def ListSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unoffered("ListSnapshots")

    @rpc
    def GetSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unoffered("GetSnapshot")
