"""StorageClass parameters: what Ferry accepts, validated in one place.

Invariants: every key Ferry reads is named in :data:`KNOWN`; anything else
(except the external-provisioner's own ``csi.storage.k8s.io/`` keys) is
INVALID_ARGUMENT naming the key. A refused value's message names the
parameter and the values it allows. :meth:`StorageParameters.as_dict` records
only non-default values of parameters added after 0.1, so volumes recorded
before a parameter existed compare equal to a request that omits it.
The policy parameters (:data:`MUTABLE`) may change on a live volume
(ControllerModifyVolume); the others are fixed when the volume is made.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import FsType

FS_TYPE = "fsType"
REPLICAS = "replicas"
MAX_REPLICAS = 3
PROVISIONING = "provisioning"
RPO_SECONDS = "rpoSeconds"
#: A recovery point further back than a week is a backup schedule, not an
#: RPO; the bound also keeps a typo (an extra digit or two) from silently
#: turning replication off in practice.
MAX_RPO_SECONDS = 7 * 24 * 3600
FAILOVER_POLICY = "failoverPolicy"
#: ``"true"``: files are encrypted at rest with a key from the node-stage secret
#: (csi_driver.core.encryption).
ENCRYPTED = "encrypted"

#: Keys the external-provisioner adds itself (``--extra-create-metadata``):
#: PVC/PV names. Accepted and ignored.
PROVISIONER_PREFIX = "csi.storage.k8s.io/"

KNOWN = (FS_TYPE, REPLICAS, PROVISIONING, RPO_SECONDS, FAILOVER_POLICY, ENCRYPTED)
#: What a VolumeAttributesClass may change on an existing volume.
MUTABLE = (REPLICAS, RPO_SECONDS, FAILOVER_POLICY)


class Provisioning(enum.Enum):
    """How a volume's image holds its space in the node's pool.

    THICK reserves every byte when the image is created or grown, so a
    volume can always be filled to its size. THIN allocates on first write:
    cheaper, but a write fails with an I/O error when the pool's filesystem
    has run out of space, which only the StorageClass may choose to risk.
    """

    THICK = "thick"
    THIN = "thin"


class FailoverPolicy(enum.Enum):
    """What Ferry does when the node holding a volume's primary is lost.

    WAIT never gives up the primary's last writes: the volume stays where it
    is until the node returns. PROMOTE makes the freshest replica the primary
    (an epoch bump fences the old one) and reports the writes lost, at most
    the replication lag, as the failover's data-loss window.
    """

    WAIT = "wait"
    PROMOTE = "promote"


@dataclass(frozen=True)
class StorageParameters:
    """Ferry's reading of a StorageClass's ``parameters``."""

    fs_type: FsType | None = None
    replicas: int = 0
    provisioning: Provisioning = Provisioning.THICK
    #: Background replication period; 0 ships deltas only for moves.
    rpo_seconds: int = 0
    failover_policy: FailoverPolicy = FailoverPolicy.WAIT
    #: Files encrypted at rest (fscrypt); fixed when the volume is made.
    encrypted: bool = False

    def as_dict(self) -> dict[str, str]:
        out: dict[str, str] = {REPLICAS: str(self.replicas)}
        if self.fs_type is not None:
            out[FS_TYPE] = self.fs_type.value
        # Only the non-default is recorded, so volumes recorded before the
        # parameter existed compare equal to a request that omits it.
        if self.provisioning is not Provisioning.THICK:
            out[PROVISIONING] = self.provisioning.value
        if self.rpo_seconds:
            out[RPO_SECONDS] = str(self.rpo_seconds)
        if self.failover_policy is not FailoverPolicy.WAIT:
            out[FAILOVER_POLICY] = self.failover_policy.value
        if self.encrypted:
            out[ENCRYPTED] = "true"
        return out

    def with_mutable(self, mutable: Mapping[str, str]) -> StorageParameters:
        """These parameters with a VolumeAttributesClass's ``mutable_parameters`` applied.

        Only :data:`MUTABLE` keys may appear; any other key, including a
        StorageClass-only one such as ``fsType``, is INVALID_ARGUMENT naming it.
        """
        refused = sorted(k for k in mutable if k not in MUTABLE)
        if refused:
            raise InvalidArgument(
                f"mutable parameter(s) {', '.join(map(repr, refused))} cannot be changed "
                f"on an existing volume: a VolumeAttributesClass may set "
                f"{', '.join(MUTABLE)}; remove the others from it"
            )
        changed = self
        if REPLICAS in mutable:
            changed = replace(changed, replicas=_replicas(mutable[REPLICAS]))
        if RPO_SECONDS in mutable:
            changed = replace(changed, rpo_seconds=_rpo_seconds(mutable[RPO_SECONDS]))
        if FAILOVER_POLICY in mutable:
            changed = replace(changed, failover_policy=_failover_policy(mutable[FAILOVER_POLICY]))
        return changed


def parse_parameters(parameters: Mapping[str, str]) -> StorageParameters:
    """Validate StorageClass parameters; unknown keys are refused by name.

    ``replicas`` is the number of warm copies on other nodes besides the
    primary (0 to :data:`MAX_REPLICAS`). ``provisioning`` is ``thick`` (the
    default) or ``thin``. ``rpoSeconds`` (default 0: no background schedule)
    is how often the primary ships its changes to the replicas.
    ``failoverPolicy`` is ``wait`` (the default) or ``promote``. ``encrypted`` is
    ``true`` or ``false`` (the default).
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
    return StorageParameters(
        fs_type=fs_type,
        replicas=_replicas(parameters[REPLICAS]) if REPLICAS in parameters else 0,
        provisioning=_provisioning(parameters),
        rpo_seconds=_rpo_seconds(parameters[RPO_SECONDS]) if RPO_SECONDS in parameters else 0,
        failover_policy=(
            _failover_policy(parameters[FAILOVER_POLICY])
            if FAILOVER_POLICY in parameters
            else FailoverPolicy.WAIT
        ),
        encrypted=_encrypted(parameters),
    )


def _whole_number(key: str, value: str, maximum: int, meaning: str) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or int(text) > maximum:
        raise InvalidArgument(
            f"parameter {key}={value!r} is invalid: use a whole number from 0 to "
            f"{maximum} ({meaning})"
        )
    return int(text)


def _replicas(value: str) -> int:
    return _whole_number(REPLICAS, value, MAX_REPLICAS, "warm copies besides the primary")


def _rpo_seconds(value: str) -> int:
    return _whole_number(
        RPO_SECONDS, value, MAX_RPO_SECONDS, "seconds between replication passes; 0 for none"
    )


def _failover_policy(value: str) -> FailoverPolicy:
    try:
        return FailoverPolicy(value.strip().lower())
    except ValueError:
        allowed = " or ".join(p.value for p in FailoverPolicy)
        raise InvalidArgument(
            f"parameter {FAILOVER_POLICY}={value!r} is invalid: use {allowed} (wait keeps "
            "the volume on its node until it returns; promote fails over to the freshest "
            "replica and may lose the writes since its last replication)"
        ) from None


def _encrypted(parameters: Mapping[str, str]) -> bool:
    text = parameters.get(ENCRYPTED, "false").strip().lower()
    if text not in ("true", "false"):
        raise InvalidArgument(
            f'parameter encrypted={parameters[ENCRYPTED]!r} is invalid: use "true" or '
            '"false" (fixed when the volume is made)'
        )
    return text == "true"


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
