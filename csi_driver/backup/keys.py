"""The operator's backup key and the keys derived from it.

Invariants:

- One 256-bit secret, owned by the operator, is the only thing needed to read
  a target; nothing derived from it is stored there except its ``key_id`` (a
  keyed hash of the secret that names it without revealing it).
- Each use has its own subkey (HKDF-SHA256 with a distinct label): chunk
  names, chunk encryption, manifest sealing and the target's config MAC
  never share a key.
- A block's (format 2) or chunk's (format 1) name is HMAC(naming key, its
  digest): equal contents get equal names (deduplication across volumes and
  backups), but whoever lacks the key cannot test whether a target holds
  some known content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from csi_driver.chunks.manifest import Digest
from csi_driver.core.errors import InvalidArgument, NotFound

KEY_BYTES = 32
KEY_ID_BYTES = 8
_PREFIX = "ferry-backup-key-v1:"


def _derive(secret: bytes, label: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=f"ferry/{label}".encode()
    ).derive(secret)


@dataclass(frozen=True)
class BackupKey:
    """The operator's key; build with :meth:`generate`, :meth:`parse` or :meth:`load`."""

    secret: bytes = field(repr=False)
    naming: bytes = field(init=False, repr=False)
    chunk_cipher: AESGCM = field(init=False, repr=False)
    manifest_cipher: AESGCM = field(init=False, repr=False)
    block_cipher: AESGCM = field(init=False, repr=False)
    index_cipher: AESGCM = field(init=False, repr=False)
    config_mac: bytes = field(init=False, repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise InvalidArgument(f"a backup key has {KEY_BYTES} bytes, not {len(self.secret)}")
        derived = {
            "naming": _derive(self.secret, "chunk-names"),
            "chunk_cipher": AESGCM(_derive(self.secret, "chunk-cipher")),
            "manifest_cipher": AESGCM(_derive(self.secret, "manifest-cipher")),
            "block_cipher": AESGCM(_derive(self.secret, "block-cipher")),
            "index_cipher": AESGCM(_derive(self.secret, "pack-index-cipher")),
            "config_mac": _derive(self.secret, "config-mac"),
            "key_id": _derive(self.secret, "key-id")[:KEY_ID_BYTES],
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @classmethod
    def generate(cls) -> BackupKey:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def parse(cls, text: str) -> BackupKey:
        body = text.strip()
        if not body.startswith(_PREFIX):
            raise InvalidArgument(
                "not a Ferry backup key (it starts with "
                f"{_PREFIX!r}); make one with `ferry backup keygen`"
            )
        try:
            secret = base64.b64decode(body.removeprefix(_PREFIX), validate=True)
        except binascii.Error:
            raise InvalidArgument("the backup key is not valid base64; was it cut short?") from None
        return cls(secret)

    @classmethod
    def load(cls, path: Path) -> BackupKey:
        try:
            return cls.parse(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotFound(
                f"no backup key at {path}; make one with `ferry backup keygen --out {path}`"
            ) from None

    def dump(self) -> str:
        return _PREFIX + base64.b64encode(self.secret).decode() + "\n"

    def save(self, path: Path) -> None:
        """Write the key readable by its owner only; never overwrite an existing key."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        except FileExistsError:
            raise InvalidArgument(
                f"{path} exists: Ferry never overwrites a backup key (the backups made "
                "with it would be lost); choose another path"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.dump())
            handle.flush()
            os.fsync(handle.fileno())

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()

    def chunk_name(self, digest: Digest) -> str:
        """The name a chunk with SHA-256 ``digest`` is stored under."""
        return hmac.new(self.naming, digest, hashlib.sha256).hexdigest()

    def block_id(self, digest: bytes) -> bytes:
        """The id a block with SHA-256 ``digest`` is stored under (format 2), raw."""
        return hmac.digest(self.naming, digest, "sha256")

    def mac(self, data: bytes) -> bytes:
        return hmac.new(self.config_mac, data, hashlib.sha256).digest()
