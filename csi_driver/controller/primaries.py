"""The one transaction that gives a volume a new primary (a move's switch, a failover).

Invariant (at most one writable primary, ever): the volume's epoch is bumped
in the same txn that makes the new node's image the PRIMARY at that epoch
and every other copy a REPLICA of it at that epoch, so no node can stage it
under an older epoch again (node/fencing.py). The old primary's export ends
and the new primary's starts, at the new epoch, in the same txn; the caller
adds its own records (the move's or failover's status) and the compares of
everything read, so a concurrent change makes the whole txn fail.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from csi_driver.core.model import Volume
from csi_driver.core.records import (
    ExportSpec,
    ImageRole,
    ImageSpec,
    export_spec_key,
    export_status_key,
    revise,
)
from csi_driver.store.base import Compare, Delete, Put
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import Versioned, put, unchanged_since


@dataclass(frozen=True)
class Switch:
    """The compares and ops of a primary switch, and the epoch it sets."""

    compares: list[Compare]
    ops: list[Put | Delete]
    epoch: int


def switch_primary(
    volume_read: Versioned[Volume],
    images: dict[str, Versioned[ImageSpec]],
    to_node: str,
    *,
    diverged: bool,
) -> Switch:
    """Make ``to_node``'s image the primary of the volume read as ``volume_read``.

    ``diverged``: the old primary may hold writes the new one lacks (a
    failover): its image is marked to be kept aside, never overwritten, and
    the volume's publications (on the lost node) are dropped; after a move
    the old primary's image is exactly what the new one verified.
    """
    volume = volume_read.value
    epoch = volume.epoch + 1
    changed_volume = replace(volume, primary_node=to_node, epoch=epoch)
    if diverged:
        changed_volume = replace(changed_volume, publications=())
    compares = [Catalog.volume_unchanged(volume_read)]
    ops: list[Put | Delete] = [Catalog.volume_op(changed_volume)]
    for node_id, image in images.items():
        if image.value.deleted:
            continue
        if node_id == to_node:
            role, keep = ImageRole.PRIMARY, False
        elif node_id == volume.primary_node:
            role, keep = ImageRole.REPLICA, diverged
        else:
            role, keep = ImageRole.REPLICA, image.value.keep_divergent
        changed = revise(
            image.value,
            role=role,
            epoch=epoch,
            source_node="" if role is ImageRole.PRIMARY else to_node,
            keep_divergent=keep,
            # A pin holds a replica for a move; the primary needs none.
            pinned_for="" if role is ImageRole.PRIMARY else image.value.pinned_for,
        )
        compares.append(unchanged_since(image.value.key, image))
        ops.append(put(changed))
    ops += [
        Delete(export_spec_key(volume.primary_node, volume.volume_id)),
        Delete(export_status_key(volume.primary_node, volume.volume_id)),
        put(ExportSpec(volume.volume_id, to_node, epoch)),
    ]
    return Switch(compares, ops, epoch)
