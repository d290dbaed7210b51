"""Policy changes on a live volume: ControllerModifyVolume (VolumeAttributesClass).

A VolumeAttributesClass's ``mutable_parameters`` may change a volume's
``replicas``, ``rpoSeconds`` and ``failoverPolicy`` (core/params.MUTABLE),
nothing else. Invariants:

- Validation precedes any lookup: an unknown or immutable key, or a bad
  value, is INVALID_ARGUMENT naming it whatever the volume id (which is what
  the external-resizer reports as an infeasible modification).
- The change is one compare-and-swap of the volume record with its
  ``generation`` bumped (records.revise); applying the same parameters again
  writes nothing and bumps nothing (CSI idempotency).
- The RPC records intent only. The replica reconcilers watch the volume and
  add or retire replicas toward the new policy (core/placement.plan_replicas)
  with no downtime; waiting for a full copy would outlive any RPC deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from csi_driver.core.errors import FailedPrecondition, NotFound
from csi_driver.core.model import VOLUME_ID_PATTERN, Volume, VolumeState
from csi_driver.core.params import StorageParameters, parse_parameters
from csi_driver.core.records import revise
from csi_driver.store.catalog import Catalog

log = logging.getLogger(__name__)


def check_mutable(mutable: Mapping[str, str]) -> None:
    """Raise InvalidArgument unless every key and value may change on a live volume."""
    StorageParameters().with_mutable(mutable)


def with_policy(volume: Volume, mutable: Mapping[str, str]) -> Volume:
    """``volume`` under its changed policy (generation bumped only by a real change)."""
    if volume.state is VolumeState.DELETING:
        raise FailedPrecondition(
            f"volume {volume.volume_id} is being deleted; its policy can no longer change"
        )
    params = parse_parameters(dict(volume.parameters)).with_mutable(mutable)
    return revise(volume, parameters=tuple(sorted(params.as_dict().items())))


def modify_volume(catalog: Catalog, volume_id: str, mutable: Mapping[str, str]) -> Volume:
    """Record ``mutable`` as the volume's new policy; return the volume as stored."""
    check_mutable(mutable)
    if not VOLUME_ID_PATTERN.match(volume_id):
        raise NotFound(f"volume {volume_id} does not exist")
    before = catalog.require_volume(volume_id)
    after = catalog.update_volume(volume_id, lambda v: with_policy(v, mutable))
    if after.generation != before.generation:
        log.info(
            "volume policy changed",
            extra={
                "volume": volume_id,
                "generation": after.generation,
                "parameters": dict(after.parameters),
            },
        )
    return after
