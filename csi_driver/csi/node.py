"""CSI Node service: validate each request, call the NodeAgent, respond."""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver.controller.volumes import DEFAULT_FS, FS_TYPE_CONTEXT_KEY
from csi_driver.core.errors import InvalidArgument, NotFound, OutOfRange
from csi_driver.core.model import (
    SUPPORTED_ACCESS_MODES,
    VOLUME_ID_PATTERN,
    FsType,
    Topology,
    VolumeCapability,
)
from csi_driver.csi.convert import capability_from_proto, require, topology_to_proto
from csi_driver.csi.errors import rpc
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.node.agent import NodeAgent

_RPC = csi_pb2.NodeServiceCapability.RPC
_Usage = csi_pb2.VolumeUsage

CAPABILITIES = (
    _RPC.STAGE_UNSTAGE_VOLUME,
    _RPC.GET_VOLUME_STATS,
    _RPC.EXPAND_VOLUME,
    _RPC.VOLUME_CONDITION,
    _RPC.SINGLE_NODE_MULTI_WRITER,
)


def _known_volume(volume_id: str) -> str:
    require(volume_id, "volume_id")
    if not VOLUME_ID_PATTERN.match(volume_id):
        raise NotFound(f"volume {volume_id} does not exist on this node")
    return volume_id


def _capability(request: Any) -> VolumeCapability:
    if not request.HasField("volume_capability"):
        raise InvalidArgument("volume_capability is required")
    capability = capability_from_proto(request.volume_capability)
    if capability.access_mode not in SUPPORTED_ACCESS_MODES:
        raise InvalidArgument(
            f"access mode {capability.access_mode.value} is not supported: Ferry volumes "
            "are single-node"
        )
    return capability


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, agent: NodeAgent, topology: Topology, max_volumes: int) -> None:
        self._agent = agent
        self._topology = topology
        self._max_volumes = max_volumes

    @rpc
    def NodeStageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = _known_volume(request.volume_id)
        require(request.staging_target_path, "staging_target_path")
        capability = _capability(request)
        fs_type = capability.fs_type
        if fs_type is None:
            from_context = request.volume_context.get(FS_TYPE_CONTEXT_KEY, "")
            fs_type = FsType.parse(from_context) if from_context else DEFAULT_FS
        self._agent.stage(volume_id, request.staging_target_path, capability, fs_type)
        return csi_pb2.NodeStageVolumeResponse()

    @rpc
    def NodeUnstageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = request.volume_id
        require(volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        if VOLUME_ID_PATTERN.match(volume_id):
            self._agent.unstage(volume_id, request.staging_target_path)
        return csi_pb2.NodeUnstageVolumeResponse()

    @rpc
    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = _known_volume(request.volume_id)
        require(request.target_path, "target_path")
        # Ferry stages every volume, so the spec makes staging_target_path mandatory.
        require(request.staging_target_path, "staging_target_path")
        capability = _capability(request)
        self._agent.publish(
            volume_id,
            request.staging_target_path,
            request.target_path,
            capability,
            request.readonly,
        )
        return csi_pb2.NodePublishVolumeResponse()

    @rpc
    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = request.volume_id
        require(volume_id, "volume_id")
        require(request.target_path, "target_path")
        if VOLUME_ID_PATTERN.match(volume_id):
            self._agent.unpublish(volume_id, request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @rpc
    def NodeGetVolumeStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = _known_volume(request.volume_id)
        require(request.volume_path, "volume_path")
        stats = self._agent.stats(volume_id, request.volume_path)
        usage = [
            _Usage(
                unit=_Usage.BYTES,
                total=stats.total_bytes,
                used=stats.used_bytes,
                available=stats.available_bytes,
            )
        ]
        if stats.total_inodes is not None:
            usage.append(
                _Usage(
                    unit=_Usage.INODES,
                    total=stats.total_inodes,
                    used=stats.used_inodes or 0,
                    available=stats.available_inodes or 0,
                )
            )
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage,
            volume_condition=csi_pb2.VolumeCondition(
                abnormal=stats.abnormal, message=stats.message
            ),
        )

    @rpc
    def NodeExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = _known_volume(request.volume_id)
        require(request.volume_path, "volume_path")
        capability = (
            capability_from_proto(request.volume_capability)
            if request.HasField("volume_capability")
            else None
        )
        size = self._agent.expand(volume_id, request.volume_path, capability)
        wanted = request.capacity_range.required_bytes if request.HasField("capacity_range") else 0
        if wanted and size < wanted:
            raise OutOfRange(
                f"volume {volume_id} has {size} bytes after expansion, less than the "
                f"{wanted} requested: expand it with ControllerExpandVolume first"
            )
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    @rpc
    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=kind))
                for kind in CAPABILITIES
            ]
        )

    @rpc
    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._agent.node_id,
            max_volumes_per_node=self._max_volumes,
            accessible_topology=topology_to_proto(self._topology),
        )
