"""CSI Node service: validate each request, call the NodeAgent, respond.

Order inside every RPC: the declared required fields (INVALID_ARGUMENT),
then the other argument checks, then the volume id: an id that is not
Ferry-shaped was never issued by Ferry, so it names no volume on this node
(NOT_FOUND, or OK for the idempotent unstage and unpublish).
"""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver.controller.volumes import DEFAULT_FS, EPOCH_CONTEXT_KEY, FS_TYPE_CONTEXT_KEY
from csi_driver.core.encryption import (
    ENCRYPTED_CONTEXT_KEY,
    check_encryptable,
    encrypted_context,
    volume_key,
)
from csi_driver.core.errors import (
    STAGING_PATH_NOT_SET,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from csi_driver.core.model import (
    SUPPORTED_ACCESS_MODES,
    VOLUME_ID_PATTERN,
    AccessType,
    FsType,
    Topology,
    VolumeCapability,
)
from csi_driver.csi.convert import capability_from_proto, topology_to_proto
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.node.agent import NodeAgent
from csi_driver.node.fencing import EpochFence
from csi_driver.rpc.errors import rpc

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
    if not VOLUME_ID_PATTERN.match(volume_id):
        raise NotFound(f"volume {volume_id} does not exist on this node")
    return volume_id


def _capability(request: Any) -> VolumeCapability:
    capability = capability_from_proto(request.volume_capability)
    if capability.access_mode not in SUPPORTED_ACCESS_MODES:
        raise InvalidArgument(
            f"access mode {capability.access_mode.value} is not supported: Ferry volumes "
            "are single-node"
        )
    return capability


def _context_epoch(context: Any) -> int | None:
    text = context.get(EPOCH_CONTEXT_KEY, "")
    if not text:
        return None  # a CO that does not attach (no ControllerPublish): the catalog decides
    if not text.isdigit():
        raise InvalidArgument(f"publish_context {EPOCH_CONTEXT_KEY}={text!r} is not an epoch")
    return int(text)


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(
        self,
        agent: NodeAgent,
        topology: Topology,
        max_volumes: int,
        fence: EpochFence | None = None,
    ) -> None:
        self._agent = agent
        self._topology = topology
        self._max_volumes = max_volumes
        self._fence = fence

    @rpc(required=("volume_id", "staging_target_path", "volume_capability"))
    def NodeStageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        capability = _capability(request)
        fs_type = capability.fs_type
        if fs_type is None:
            from_context = request.volume_context.get(FS_TYPE_CONTEXT_KEY, "")
            fs_type = FsType.parse(from_context) if from_context else DEFAULT_FS
        key = None
        if encrypted_context(request.volume_context.get(ENCRYPTED_CONTEXT_KEY, "")):
            mounted = capability.access_type is AccessType.MOUNT
            check_encryptable(capability.access_type, fs_type if mounted else None)
            key = volume_key(request.secrets)
        volume_id = _known_volume(request.volume_id)
        epoch = _context_epoch(request.publish_context)
        fence = self._fence
        self._agent.stage(
            volume_id,
            request.staging_target_path,
            capability,
            fs_type,
            key,
            admit=(lambda: fence.check(volume_id, epoch)) if fence is not None else None,
        )
        return csi_pb2.NodeStageVolumeResponse()

    @rpc(required=("volume_id", "staging_target_path"))
    def NodeUnstageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = request.volume_id
        if VOLUME_ID_PATTERN.match(volume_id):
            self._agent.unstage(volume_id, request.staging_target_path)
        return csi_pb2.NodeUnstageVolumeResponse()

    @rpc(required=("volume_id", "target_path", "volume_capability"))
    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        # Ferry advertises STAGE_UNSTAGE_VOLUME; the spec's code for a publish
        # without the staging path is then FAILED_PRECONDITION, not INVALID_ARGUMENT.
        if not request.staging_target_path:
            raise FailedPrecondition(STAGING_PATH_NOT_SET)
        capability = _capability(request)
        volume_id = _known_volume(request.volume_id)
        self._agent.publish(
            volume_id,
            request.staging_target_path,
            request.target_path,
            capability,
            request.readonly,
        )
        return csi_pb2.NodePublishVolumeResponse()

    @rpc(required=("volume_id", "target_path"))
    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = request.volume_id
        if VOLUME_ID_PATTERN.match(volume_id):
            self._agent.unpublish(volume_id, request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @rpc(required=("volume_id", "volume_path"))
    def NodeGetVolumeStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = _known_volume(request.volume_id)
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

    @rpc(required=("volume_id", "volume_path"))
    def NodeExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        capability = (
            capability_from_proto(request.volume_capability)
            if request.HasField("volume_capability")
            else None
        )
        volume_id = _known_volume(request.volume_id)
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
