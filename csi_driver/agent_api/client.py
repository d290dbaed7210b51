"""The controller's gRPC client for node agents.

gRPC status codes coming back from an agent are turned into the same domain
errors the agent raised, so the controller reasons in one vocabulary. A call
to an agent waits no longer than the controller's own call has left
(``csi_driver.core.deadline``), and the agent's commands inherit that deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from csi_driver.core import deadline, errors
from csi_driver.core.model import NodeRecord
from csi_driver.core.nodes import NodeClient
from csi_driver.gen.ferry.v1 import agent_pb2, agent_pb2_grpc
from csi_driver.pki import Identity, Role
from csi_driver.rpc.errors import CODES
from csi_driver.transport import AgentSecurity, open_channel

_FROM_CODE: dict[grpc.StatusCode, type[errors.FerryError]] = {code: kind for kind, code in CODES}
#: Codes meaning the agent could not be reached or answered in time.
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

T = TypeVar("T")


class GrpcNodeClient:
    """One node agent, reached over gRPC."""

    def __init__(self, node: NodeRecord, channel: grpc.Channel, timeout_s: float) -> None:
        self._node = node
        self._stub = agent_pb2_grpc.NodeAgentStub(channel)
        self._timeout = timeout_s

    def _call(self, what: str, call: Callable[[float], T]) -> T:
        """``call(timeout)``, the timeout cut to what the current call has left."""
        timeout = deadline.clamp(self._timeout)
        if timeout <= 0:
            # Unavailable, like an unreachable node: the caller keeps its intent for the retry.
            raise errors.Unavailable(
                f"the call's deadline passed before node {self._node.node_id} was asked to "
                f"run {what}; retrying completes it"
            )
        try:
            return call(timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            detail = exc.details() or ""
            left = deadline.remaining()
            if code in _UNREACHABLE and left is not None and left <= 0:
                raise errors.Unavailable(
                    f"the call's deadline passed while node {self._node.node_id} ran {what}; "
                    "retrying completes it"
                ) from exc
            if code in _UNREACHABLE:
                raise errors.Unavailable(
                    f"node agent {self._node.node_id} at {self._node.agent_endpoint} did not "
                    f"answer {what} ({code.name}: {detail}); check the Ferry node pod on that node"
                ) from exc
            kind = _FROM_CODE.get(code, errors.InternalError)
            raise kind(f"node {self._node.node_id}: {detail}") from exc

    def create_image(self, volume_id: str, size_bytes: int, epoch: int, thin: bool) -> int:
        request = agent_pb2.CreateImageRequest(
            volume_id=volume_id, size_bytes=size_bytes, epoch=epoch, thin=thin
        )
        reply: Any = self._call("CreateImage", lambda t: self._stub.CreateImage(request, timeout=t))
        return int(reply.size_bytes)

    def delete_image(self, volume_id: str) -> None:
        request = agent_pb2.DeleteImageRequest(volume_id=volume_id)
        self._call("DeleteImage", lambda t: self._stub.DeleteImage(request, timeout=t))

    def expand_image(self, volume_id: str, size_bytes: int) -> int:
        request = agent_pb2.ExpandImageRequest(volume_id=volume_id, size_bytes=size_bytes)
        reply: Any = self._call("ExpandImage", lambda t: self._stub.ExpandImage(request, timeout=t))
        return int(reply.size_bytes)


class GrpcNodeDirectory:
    """Keeps one channel per node and endpoint, secured as ``security`` says.

    Keyed by node as well: a TLS channel only accepts the node it was opened
    for, so a new node registering a departed node's address gets its own.
    """

    def __init__(self, timeout_s: float = 60.0, security: AgentSecurity | None = None) -> None:
        self._timeout = timeout_s
        self._security = security or AgentSecurity()
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
        self._lock = threading.Lock()

    def client(self, node: NodeRecord) -> NodeClient:
        key = (node.node_id, node.agent_endpoint)
        with self._lock:
            channel = self._channels.get(key)
            if channel is None:
                server = Identity(Role.NODE, node.node_id)
                channel = open_channel(node.agent_endpoint, self._security, server)
                self._channels[key] = channel
        return GrpcNodeClient(node, channel, self._timeout)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
