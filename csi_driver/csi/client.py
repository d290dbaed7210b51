"""A CSI client over one channel: what the demo, benchmarks and tests speak with."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc

from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.transport import channel_target

_MODE = csi_pb2.VolumeCapability.AccessMode


def mount_capability(
    fs_type: str = "",
    mode: str = "SINGLE_NODE_WRITER",
    flags: tuple[str, ...] = (),
) -> Any:
    """A mount VolumeCapability message."""
    cap = csi_pb2.VolumeCapability(access_mode=_MODE(mode=mode))
    cap.mount.fs_type = fs_type
    cap.mount.mount_flags.extend(flags)
    return cap


def block_capability(mode: str = "SINGLE_NODE_WRITER") -> Any:
    """A block VolumeCapability message."""
    cap = csi_pb2.VolumeCapability(access_mode=_MODE(mode=mode))
    cap.block.SetInParent()
    return cap


class CsiClient:
    """Identity, Controller, GroupController and Node stubs sharing one channel to ``endpoint``."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(channel_target(endpoint))
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.group = csi_pb2_grpc.GroupControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CsiClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
