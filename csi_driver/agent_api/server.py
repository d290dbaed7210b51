"""Serves a node's pool to the controller over ``ferry.v1.NodeAgent``."""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver.gen.ferry.v1 import agent_pb2, agent_pb2_grpc
from csi_driver.metrics import observe_pool, observe_provisioned
from csi_driver.node.agent import NodeAgent
from csi_driver.node.pool import ImageInfo
from csi_driver.pki import Identity, Role
from csi_driver.rpc.errors import rpc
from csi_driver.transport import Admission


def admitted_callers(node_id: str) -> Admission:
    """Who may call node ``node_id``'s agent API over mTLS: the controller, and the
    node itself (all-in-one mode calls its own agent)."""

    def admit(peer: Identity) -> bool:
        return peer.role is Role.CONTROLLER or peer == Identity(Role.NODE, node_id)

    return admit


class NodeAgentServicer(agent_pb2_grpc.NodeAgentServicer):
    """Image operations for the controller; deletion goes through the NodeAgent
    so it takes the same per-volume lock as stage and publish."""

    def __init__(self, agent: NodeAgent) -> None:
        self._node_id = agent.node_id
        self._agent = agent
        self._pool = agent.pool
        self._loops = agent.loops

    def _image(self, info: ImageInfo) -> Any:
        device = self._loops.find(info.path) or ""
        return agent_pb2.ImageInfo(
            volume_id=info.volume_id,
            size_bytes=info.size_bytes,
            allocated_bytes=info.allocated_bytes,
            epoch=info.epoch,
            attached=bool(device),
            device=device,
            thin=info.thin,
        )

    def _observed(self) -> None:
        observe_provisioned(self._pool.provisioned_bytes, self._pool.image_count)

    @rpc(required=("volume_id", "size_bytes"))
    def CreateImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._pool.create_image(
            request.volume_id, request.size_bytes, request.epoch, thin=request.thin
        )
        self._observed()
        return self._image(info)

    @rpc(required=("volume_id",))
    def DeleteImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._agent.delete_image(request.volume_id)
        self._observed()
        return agent_pb2.DeleteImageResponse()

    @rpc(required=("volume_id", "size_bytes"))
    def ExpandImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._pool.expand_image(request.volume_id, request.size_bytes)
        self._observed()
        return self._image(info)

    @rpc
    def GetPool(self, request: Any, context: grpc.ServicerContext) -> Any:
        status = self._pool.status()
        observe_pool(
            status.capacity_bytes,
            status.provisioned_bytes,
            status.allocated_bytes,
            status.image_count,
        )
        return agent_pb2.PoolInfo(
            node_id=self._node_id,
            capacity_bytes=status.capacity_bytes,
            provisioned_bytes=status.provisioned_bytes,
            allocated_bytes=status.allocated_bytes,
            image_count=status.image_count,
            filesystem=status.filesystem,
            reflink=status.reflink,
        )

    @rpc
    def ListImages(self, request: Any, context: grpc.ServicerContext) -> Any:
        return agent_pb2.ListImagesResponse(images=[self._image(i) for i in self._pool.images()])
