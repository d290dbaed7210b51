"""A VolumeSnapshotClass's parameters, as CreateSnapshot receives them.

Ferry knows one: ``backup`` ("true"/"false"), which makes the snapshot a
backup too (see :mod:`csi_driver.backup.snapshots`). Keys under
``csi.storage.k8s.io/`` are the external-snapshotter's own (its
``--extra-create-metadata``) and are accepted and ignored. Any other key is
INVALID_ARGUMENT: a misspelt ``backup`` must not quietly produce a snapshot
that is not backed up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from csi_driver.core.errors import InvalidArgument

BACKUP = "backup"
SIDECAR_PREFIX = "csi.storage.k8s.io/"
_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class SnapshotClassParameters:
    backup: bool = False


def parse_snapshot_parameters(parameters: Mapping[str, str]) -> SnapshotClassParameters:
    unknown = sorted(k for k in parameters if k != BACKUP and not k.startswith(SIDECAR_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown VolumeSnapshotClass parameter(s) {', '.join(unknown)}: Ferry knows "
            f'only "{BACKUP}" ("true" or "false")'
        )
    value = parameters.get(BACKUP, "false").strip().lower()
    if value not in _BOOLEANS:
        raise InvalidArgument(
            f'VolumeSnapshotClass parameter {BACKUP}={parameters[BACKUP]!r}: use "true" or "false"'
        )
    return SnapshotClassParameters(backup=_BOOLEANS[value])
