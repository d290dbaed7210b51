"""The controller's view of node agents: an interface, implemented over gRPC."""

from __future__ import annotations

from typing import Protocol

from csi_driver.core.model import NodeRecord


class NodeClient(Protocol):
    """Operations the controller asks of the node agent that holds a volume."""

    def create_image(self, volume_id: str, size_bytes: int, epoch: int, thin: bool) -> int:
        """Allocate the volume's image, thick or thin (idempotent); return its size."""

    def delete_image(self, volume_id: str) -> None:
        """Remove the volume's image (idempotent); FailedPrecondition while in use."""

    def expand_image(self, volume_id: str, size_bytes: int) -> int:
        """Grow the image to at least ``size_bytes``; return its new size."""


class NodeDirectory(Protocol):
    """Hands out a client for a registered node."""

    def client(self, node: NodeRecord) -> NodeClient:
        """A client for ``node``'s agent; raises Unavailable if it cannot be reached."""
