"""Epoch fencing: a node stages a volume only as its current primary.

Invariant: at most one writable primary per volume, ever. A move or a
failover bumps the volume's epoch in the same catalog transaction that
makes another node the primary and this node's image a replica, so a node
that stages must find, in the catalog, that the volume's primary is itself,
that its own image record is the PRIMARY at the volume's current epoch, and
that the epoch kubelet carries in the publish context (written by
ControllerPublishVolume) is that epoch too. Anything else is refused with
FAILED_PRECONDITION saying why. A catalog that cannot be read refuses too
(UNAVAILABLE, retried by kubelet): a partitioned node never stages on trust.
"""

from __future__ import annotations

from csi_driver.core.errors import FailedPrecondition, NotFound
from csi_driver.core.records import ImageRole, ImageSpec, image_spec_key
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import read

FENCED = (
    "volume {volume_id} cannot be staged on node {node_id}: {why}. Its primary is node "
    "{primary} at epoch {epoch}; publish the volume to this node (ControllerPublishVolume "
    "moves it here) and stage it again"
)


class EpochFence:
    """Checks, against the catalog, that node ``node_id`` may stage a volume."""

    def __init__(self, catalog: Catalog, node_id: str) -> None:
        self._catalog = catalog
        self.node_id = node_id

    def check(self, volume_id: str, context_epoch: int | None) -> None:
        volume = self._catalog.get_volume(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} does not exist")
        image = read(self._catalog.store, ImageSpec, image_spec_key(self.node_id, volume_id))

        def refuse(why: str) -> FailedPrecondition:
            return FailedPrecondition(
                FENCED.format(
                    volume_id=volume_id,
                    node_id=self.node_id,
                    why=why,
                    primary=volume.primary_node,
                    epoch=volume.epoch,
                )
            )

        if volume.primary_node != self.node_id:
            held = f"this node holds a {image.value.role.value}" if image else "no image is here"
            raise refuse(f"this node is not its primary ({held})")
        if image is not None and image.value.role is not ImageRole.PRIMARY:
            raise refuse(f"this node's image is a {image.value.role.value}")
        if image is not None and image.value.epoch != volume.epoch:
            raise refuse(f"this node's image is at epoch {image.value.epoch}, not the current one")
        if context_epoch is not None and context_epoch != volume.epoch:
            raise refuse(f"the publish context carries epoch {context_epoch}, a stale attachment")
