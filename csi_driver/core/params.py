"""StorageClass parameters: what Ferry accepts, validated in one place."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import FsType

FS_TYPE = "fsType"
REPLICAS = "replicas"
MAX_REPLICAS = 3
PROVISIONING = "provisioning"

#: Keys the external-provisioner adds itself (``--extra-create-metadata``):
#: PVC/PV names. Accepted and ignored.
PROVISIONER_PREFIX = "csi.storage.k8s.io/"

KNOWN = (FS_TYPE, REPLICAS, PROVISIONING)


class Provisioning(enum.Enum):
    """How a volume's image holds its space in the node's pool.

    THICK reserves every byte when the image is created or grown, so a
    volume can always be filled to its size. THIN allocates on first write:
    cheaper, but a write fails with an I/O error when the pool's filesystem
    has run out of space, which only the StorageClass may choose to risk.
    """

    THICK = "thick"
    THIN = "thin"


@dataclass(frozen=True)
class StorageParameters:
    """Ferry's reading of a StorageClass's ``parameters``."""

    fs_type: FsType | None = None
    replicas: int = 0
    provisioning: Provisioning = Provisioning.THICK

    def as_dict(self) -> dict[str, str]:
        out: dict[str, str] = {REPLICAS: str(self.replicas)}
        if self.fs_type is not None:
            out[FS_TYPE] = self.fs_type.value
        # Only the non-default is recorded, so volumes recorded before the
        # parameter existed compare equal to a request that omits it.
        if self.provisioning is not Provisioning.THICK:
            out[PROVISIONING] = self.provisioning.value
        return out


def parse_parameters(parameters: Mapping[str, str]) -> StorageParameters:
    """Validate StorageClass parameters; unknown keys are refused by name.

    ``replicas`` is the number of warm copies on other nodes besides the
    primary. It is validated and recorded now; replication acts on it.
    ``provisioning`` is ``thick`` (the default) or ``thin``.
    """
    unknown = sorted(
        k for k in parameters if k not in KNOWN and not k.startswith(PROVISIONER_PREFIX)
    )
    if unknown:
        raise InvalidArgument(
            f"unknown StorageClass parameter(s) {', '.join(map(repr, unknown))}: "
            f"Ferry accepts {', '.join(KNOWN)}; remove or correct them in the StorageClass"
        )
    fs_type = FsType.parse(parameters[FS_TYPE].strip().lower()) if parameters.get(FS_TYPE) else None
    replicas = 0
    if REPLICAS in parameters:
        text = parameters[REPLICAS].strip()
        if not text.isdigit() or int(text) > MAX_REPLICAS:
            raise InvalidArgument(
                f"StorageClass parameter replicas={parameters[REPLICAS]!r} is invalid: "
                f"use a whole number from 0 to {MAX_REPLICAS}"
            )
        replicas = int(text)
    return StorageParameters(
        fs_type=fs_type, replicas=replicas, provisioning=_provisioning(parameters)
    )


def _provisioning(parameters: Mapping[str, str]) -> Provisioning:
    if PROVISIONING not in parameters:
        return Provisioning.THICK
    text = parameters[PROVISIONING].strip().lower()
    try:
        return Provisioning(text)
    except ValueError:
        allowed = " or ".join(p.value for p in Provisioning)
        raise InvalidArgument(
            f"StorageClass parameter provisioning={parameters[PROVISIONING]!r} is invalid: "
            f"use {allowed} (thin risks I/O errors when the node's pool fills up)"
        ) from None
