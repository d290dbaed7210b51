"""Encrypted volumes: which volumes can be encrypted, and the key a node stages them with.

A StorageClass with ``encrypted: "true"`` makes ext4 filesystem volumes
whose files are encrypted at rest by the kernel (fscrypt, see
``csi_driver.node.fscrypt``). The key comes with each NodeStageVolume as
the CSI node-stage secret (the StorageClass names the Kubernetes Secret
with ``csi.storage.k8s.io/node-stage-secret-name`` and ``-namespace``);
Ferry never stores it, so a node can read an encrypted volume only while
kubelet hands it the key.

Invariants: a :class:`VolumeKey` never shows its bytes (not in ``repr``,
not in any message), and no error about a key quotes the secret's value.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import AccessType, FsType

#: The key in the node-stage Secret that holds the volume's key.
SECRET_KEY = "encryptionKey"
#: volume_context key the controller sets on encrypted volumes, read by NodeStageVolume.
ENCRYPTED_CONTEXT_KEY = "ferry.csi.dev/encrypted"
#: The one size of key Ferry uses: fscrypt's largest master key.
KEY_BYTES = 64
#: How to make a key, for messages and docs.
KEY_RECIPE = "head -c 64 /dev/urandom | base64 -w0"


@dataclass(frozen=True)
class VolumeKey:
    """A volume's master key: 64 random bytes that only the kernel and this value hold."""

    raw: bytes = field(repr=False)

    def __str__(self) -> str:
        return "VolumeKey(<hidden>)"


def check_encryptable(access_type: AccessType, fs_type: FsType | None) -> None:
    """Refuse, with the reason, a volume that ``encrypted: "true"`` cannot protect."""
    if access_type is AccessType.BLOCK:
        raise InvalidArgument(
            'encrypted: "true" needs a filesystem volume: Ferry encrypts files with the '
            "kernel's filesystem encryption (fscrypt), and a raw block device has no files "
            "(this node offers no device-mapper to encrypt blocks). Use volumeMode: "
            "Filesystem, or encrypt in the application"
        )
    if fs_type is not None and fs_type is not FsType.EXT4:
        raise InvalidArgument(
            f'encrypted: "true" needs fsType ext4, not {fs_type.value}: the kernel\'s xfs '
            "has no filesystem encryption (fscrypt); use ext4 for encrypted volumes"
        )


def encrypted_context(value: str) -> bool:
    """Whether a volume_context's :data:`ENCRYPTED_CONTEXT_KEY` value says "encrypted".

    Anything but ``true``, ``false`` or nothing is refused rather than read
    as "not encrypted": a mistyped PersistentVolume must not stage an
    encrypted volume's filesystem without its key.
    """
    text = value.strip().lower()
    if text not in ("", "true", "false"):
        raise InvalidArgument(
            f'volume_context {ENCRYPTED_CONTEXT_KEY}={value!r} is invalid: use "true" or '
            '"false" (CreateVolume sets it; check the PersistentVolume\'s volumeAttributes)'
        )
    return text == "true"


def volume_key(secrets: Mapping[str, str]) -> VolumeKey:
    """The volume's key from the node-stage secret; never quotes what it was given."""
    text = secrets.get(SECRET_KEY)
    if text is None:
        present = ", ".join(sorted(secrets)) or "none"
        raise InvalidArgument(
            f"this volume is encrypted and NodeStageVolume carried no {SECRET_KEY!r} secret "
            f"(keys present: {present}). Set the StorageClass parameters "
            "csi.storage.k8s.io/node-stage-secret-name and "
            "csi.storage.k8s.io/node-stage-secret-namespace to a Secret holding "
            f"{SECRET_KEY} (make one with: {KEY_RECIPE})"
        )
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(
            f"the node-stage secret's {SECRET_KEY} is not base64; it must be "
            f"{KEY_BYTES} random bytes in base64 (make one with: {KEY_RECIPE})"
        ) from None
    if len(raw) != KEY_BYTES:
        raise InvalidArgument(
            f"the node-stage secret's {SECRET_KEY} decodes to {len(raw)} bytes; it must be "
            f"{KEY_BYTES} random bytes in base64 (make one with: {KEY_RECIPE})"
        )
    return VolumeKey(raw)
