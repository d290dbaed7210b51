"""ControllerUnpublishVolume for a node Ferry cannot reach: recorded and fenced.

Kubernetes force-detaches a volume from a node it gave up on (the
``out-of-service`` taint, or its timeout on an unhealthy node). That node
never unstaged: whatever it staged may still be mounted there. Ferry must
not ignore the detach, nor simply forget the attachment as for a healthy
node. Invariants of :meth:`Fences.fence`:

- It acts only when the node is lost (controller/readiness.py: out of
  service, deleted from the cluster, or silent past ``--node-lost-after``)
  and the volume is published there; otherwise the caller's ordinary
  unpublish runs.
- One txn drops the publication (and the node's published count), bumps
  the volume's epoch, brings the node's primary image spec to the new
  epoch, and writes ``status/fences/<volume>`` (who, which epoch, when the
  node was declared lost). The old attachment's publish context carries the
  old epoch, so the lost node can never stage the volume with it again
  (node/fencing.py); with ``failoverPolicy: wait`` the volume stays there
  and a new attachment (new epoch) may use it once the node is back.
- The fence is what failover counts from: with ``promote`` the failover
  reconciler promotes a replica at once, and the lost node's data is kept
  aside as divergent when it returns, as for any failover.
- CSI: the answer is success once the fence is written (so the attacher
  can finish the detach), a retryable error if the catalog refused it; a
  repeat finds no publication and succeeds without a second epoch bump.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from csi_driver.controller.images import ImageIntents
from csi_driver.controller.readiness import NodeReadings
from csi_driver.core.errors import Conflict, StoreError
from csi_driver.core.records import FenceStatus, ImageRole, NodeAccounting, revise
from csi_driver.metrics import count_forced_detach
from csi_driver.store.base import Compare, Put
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import put, unchanged_since

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 16


class Fences:
    """Fences volumes force-detached from lost nodes (see the module doc)."""

    def __init__(self, catalog: Catalog, intents: ImageIntents, readings: NodeReadings) -> None:
        self._catalog = catalog
        self._intents = intents
        self._readings = readings

    def fence(self, volume_id: str, node_id: str) -> bool:
        """Fence ``volume_id`` off lost node ``node_id``; False when that is not the case
        (the node is reachable, or the volume is not published there)."""
        for _ in range(_CAS_ATTEMPTS):
            volume_read = self._catalog.read_volume(volume_id)
            if volume_read is None or volume_read.value.published_on(node_id) is None:
                return False
            lost = self._readings.lost(node_id)
            if lost is None:
                return False
            volume = volume_read.value
            epoch = volume.epoch + 1
            fenced = replace(
                volume,
                epoch=epoch,
                publications=tuple(p for p in volume.publications if p.node_id != node_id),
            )
            account = self._catalog.account(node_id)
            released = (account.value if account else NodeAccounting(node_id)).publications(-1)
            compares: list[Compare] = [
                self._catalog.volume_unchanged(volume_read),
                unchanged_since(released.key, account),
            ]
            ops: list[Put] = [self._catalog.volume_op(fenced), put(released)]
            image = self._catalog.read_image(node_id, volume_id)
            if image is not None and image.value.role is ImageRole.PRIMARY:
                compares.append(unchanged_since(image.value.key, image))
                ops.append(put(revise(image.value, epoch=epoch)))
            record = FenceStatus(volume_id, node_id, epoch, lost.since, lost.why)
            ops.append(put(record))
            try:
                self._intents.txn(compares, ops)
            except Conflict:
                continue
            count_forced_detach()
            log.warning(
                "volume force-detached from a lost node: fenced",
                extra={"volume": volume_id, "node": node_id, "epoch": epoch, "why": lost.why},
            )
            return True
        raise StoreError(f"volume {volume_id} kept changing while it was fenced; retry")
