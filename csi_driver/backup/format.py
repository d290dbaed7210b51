"""What a target holds, byte for byte: sealed manifests, the config, and format 1's
chunk objects (format 2 stores blocks in packs: :mod:`.packs`).

Format 1 chunk object (read, no longer written)::

    "FBC1" | flags (1: bit 0 = zstd) | nonce (12) | AES-256-GCM(payload)

The payload is the chunk compressed with zstd, or stored as is when zstd
does not make it smaller (random or already compressed data, recognised
from three 32 KiB samples before the whole chunk is tried). The GCM tag
covers the header and, as associated data, the chunk's name, so a chunk
object moved under another name fails authentication like one altered.

Manifest object (one per backup, the backup's commit point)::

    "FBM1" | key id (8) | nonce (12) | AES-256-GCM(body)

with the backup id as associated data (a manifest renamed to another id is
refused). The body is a JSON header (the backup's metadata) and the image's
chunk manifest (:mod:`csi_driver.chunks.manifest`), so the target holds no
plaintext metadata at all: volume names, sizes and digests need the key.
Format 2 adds, after the chunk manifest, the block digests of every data
chunk in chunk order (``ceil(length / 64 KiB)`` of 32 bytes each, zeros for
a block of zeros); each chunk's digests must hash to its chunk digest
(:func:`~csi_driver.chunks.manifest.root_digest`), so they are as trustworthy
as the chunk manifest they extend.

Invariants: decoding never returns bytes that were not written under this
key: a wrong key is :class:`FailedPrecondition` naming both key ids, and
anything altered is :class:`DataLoss`. Decompression is bounded by the
chunk's length from the manifest, so a hostile object cannot balloon memory.
"""

from __future__ import annotations

import hmac
import json
import mmap
import os
import struct
from dataclasses import dataclass, field

import zstandard
from cryptography.exceptions import InvalidTag

from csi_driver.backup.keys import KEY_ID_BYTES, BackupKey
from csi_driver.chunks import manifest as manifests
from csi_driver.chunks.manifest import (
    DIGEST_SIZE,
    Digest,
    Manifest,
    block_count,
    chunk_digest,
    root_digest,
)
from csi_driver.core.errors import DataLoss, FailedPrecondition, InvalidArgument

#: Written by this Ferry: blocks in packs. Format 1 (a chunk object per chunk) is
#: still read: restored, verified, pruned and collected, never written.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
NONCE_BYTES = 12
_CHUNK_MAGIC = b"FBC1"
_MANIFEST_MAGIC = b"FBM1"
_ZSTD = 0x01
#: zstd level 1: on this machine it compresses text at ~5 GiB/s and gives up on
#: random data at ~2.6 GiB/s per core; higher levels gain little on volume
#: images and cost throughput the benchmark holds us to (docs/benchmarks.md).
ZSTD_LEVEL = 1
_LENGTH = struct.Struct(">I")
_SAMPLE = 32 * 1024


def wrong_key(found: bytes, ours: bytes, what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{what} was written under backup key {found.hex()}, not the key given "
        f"({ours.hex()}): use the key the backups were made with"
    )


TAG_BYTES = 16
#: Bytes a chunk object adds to its payload: magic, flags, nonce and GCM tag.
CHUNK_OVERHEAD = len(_CHUNK_MAGIC) + 1 + NONCE_BYTES + TAG_BYTES

Blob = bytes | bytearray | memoryview


class ChunkCodec:
    """Seals and opens chunk objects, reusing its buffers from call to call.

    Not thread-safe (its buffers and zstd contexts are per call site): one per
    thread. Reusing the buffers is most of what it is for: a fresh 4 MiB
    object per step costs the kernel a page fault per 4 KiB to hand it out,
    which on the backup's hot path cost as much CPU as AES-GCM itself.
    """

    def __init__(self, key: BackupKey) -> None:
        self._key = key
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._decompressor = zstandard.ZstdDecompressor()
        self._out = bytearray()

    def _buffer(self, size: int) -> memoryview:
        if len(self._out) < size:
            self._out = bytearray(size)
        return memoryview(self._out)[:size]

    def _worth_compressing(self, data: Blob) -> bool:
        """Whether samples from the start, middle and end of ``data`` shrink by a few
        percent: random or already compressed chunks (half of a typical image) then
        skip zstd's full pass, the largest cost after hashing."""
        if len(data) <= 4 * _SAMPLE:
            return True
        middle = len(data) // 2
        view = memoryview(data)
        sample = b"".join(view[at : at + _SAMPLE] for at in (0, middle, len(data) - _SAMPLE))
        return len(self._compressor.compress(sample)) < len(sample) * 0.97

    def seal(self, name: str, data: Blob) -> tuple[bytes, memoryview]:
        """The chunk object for ``data`` stored as ``name``, as its header and its
        ciphertext (written one after the other, no copy joins them). The
        ciphertext is valid until this codec's next call."""
        payload: Blob = data
        flags = 0
        if self._worth_compressing(data):
            compressed = self._compressor.compress(data)
            if len(compressed) < len(data):
                flags, payload = _ZSTD, compressed
        header = _CHUNK_MAGIC + bytes([flags])
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._buffer(len(payload) + TAG_BYTES)
        self._key.chunk_cipher.encrypt_into(nonce, payload, header + name.encode(), sealed)
        return header + nonce, sealed

    def open(
        self,
        name: str,
        blob: Blob,
        digest: Digest,
        length: int,
        into: bytearray | mmap.mmap | None = None,
    ) -> memoryview:
        """The chunk stored as ``name``, checked to be the ``length`` bytes hashing to
        ``digest``. With ``into`` (at least ``length`` bytes), the result is in
        ``into`` or in bytes of its own; without, it is valid until this
        codec's next call."""
        head = len(_CHUNK_MAGIC) + 1
        if len(blob) < head + NONCE_BYTES + TAG_BYTES or blob[: len(_CHUNK_MAGIC)] != _CHUNK_MAGIC:
            raise DataLoss(f"chunk {name} is not a Ferry chunk object (damaged or replaced)")
        view = memoryview(blob)
        header, nonce = bytes(view[:head]), view[head : head + NONCE_BYTES]
        sealed = view[head + NONCE_BYTES :]  # no copy of the chunk
        # A stored chunk is never larger than its plaintext (zstd or as is).
        if len(sealed) - TAG_BYTES > length:
            raise DataLoss(f"chunk {name} is larger than the chunk it should hold")
        payload = (
            self._buffer(len(sealed) - TAG_BYTES)
            if into is None
            else memoryview(into)[: len(sealed) - TAG_BYTES]
        )
        try:
            self._key.chunk_cipher.decrypt_into(nonce, sealed, header + name.encode(), payload)
        except InvalidTag:
            raise DataLoss(
                f"chunk {name} failed authentication: it was altered in the target (or written "
                "under another key); nothing was restored from it"
            ) from None
        data: Blob = payload
        if header[-1] & _ZSTD:
            try:
                data = self._decompressor.decompress(payload, max_output_size=length)
            except zstandard.ZstdError as exc:
                raise DataLoss(f"chunk {name} does not decompress: {exc}") from None
        if len(data) != length or chunk_digest(data) != digest:
            raise DataLoss(f"chunk {name} does not hold the bytes its manifest names")
        return memoryview(data)


def seal_chunk(key: BackupKey, name: str, data: Blob) -> bytes:
    """The whole chunk object (tests and one-off writers; the backup uses a codec)."""
    header, sealed = ChunkCodec(key).seal(name, data)
    return header + sealed


def open_chunk(key: BackupKey, name: str, blob: Blob, digest: Digest, length: int) -> bytes:
    """The chunk stored as ``name``, checked (one-off readers; restores use a codec)."""
    return bytes(ChunkCodec(key).open(name, blob, digest, length))


@dataclass(frozen=True)
class BackupInfo:
    """A backup's metadata, sealed in its manifest."""

    backup_id: str
    created_at: float
    volume_id: str  # the source volume's id in its own cluster ("" for a plain image)
    volume_name: str  # what retention groups by: the PV name, or a label
    fs_type: str | None  # "ext4", "xfs", or None for a raw block volume
    source: str  # where the bytes were read from, for the operator
    #: Files encrypted at rest by fscrypt inside the image: a restore needs the volume's key.
    encrypted: bool = False


@dataclass(frozen=True)
class Backup:
    info: BackupInfo
    manifest: Manifest
    #: Format 2: per chunk, its block digests (None for a hole); format 1: empty.
    blocks: tuple[bytes | None, ...] = field(default=(), repr=False)
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format == 1:
            return
        if len(self.blocks) != len(self.manifest.chunks):
            raise InvalidArgument("a format 2 backup has the block digests of every chunk")
        pairs = zip(self.manifest.chunks, self.blocks, strict=True)
        for index, (digest, blocks) in enumerate(pairs):
            if (blocks is None) != (digest is None) or (
                blocks is not None
                and (
                    len(blocks)
                    != block_count(self.manifest.chunk_length(index), self.manifest.chunk_size)
                    * DIGEST_SIZE
                    or root_digest(blocks) != digest
                )
            ):
                raise InvalidArgument(f"chunk {index}'s block digests do not match its digest")

    @property
    def backup_id(self) -> str:
        return self.info.backup_id


def seal_manifest(key: BackupKey, backup: Backup) -> bytes:
    header = json.dumps(
        {
            "format": backup.format,
            "backup_id": backup.info.backup_id,
            "created_at": backup.info.created_at,
            "volume_id": backup.info.volume_id,
            "volume_name": backup.info.volume_name,
            "fs_type": backup.info.fs_type,
            "source": backup.info.source,
            "encrypted": backup.info.encrypted,
        },
        sort_keys=True,
    ).encode()
    encoded = manifests.encode(backup.manifest)
    body = _LENGTH.pack(len(header)) + header + encoded  # format 1
    if backup.format >= 2:
        body = (
            _LENGTH.pack(len(header))
            + header
            + _LENGTH.pack(len(encoded))
            + encoded
            + b"".join(blocks for blocks in backup.blocks if blocks is not None)
        )
    nonce = os.urandom(NONCE_BYTES)
    prefix = _MANIFEST_MAGIC + key.key_id
    sealed = key.manifest_cipher.encrypt(nonce, body, prefix + backup.backup_id.encode())
    return prefix + nonce + sealed


def open_manifest(key: BackupKey, backup_id: str, blob: bytes) -> Backup:
    head = len(_MANIFEST_MAGIC) + KEY_ID_BYTES
    if len(blob) < head + NONCE_BYTES or blob[: len(_MANIFEST_MAGIC)] != _MANIFEST_MAGIC:
        raise DataLoss(f"backup {backup_id}'s manifest is not a Ferry manifest (damaged)")
    found = blob[len(_MANIFEST_MAGIC) : head]
    if found != key.key_id:
        raise wrong_key(found, key.key_id, f"backup {backup_id}")
    nonce = blob[head : head + NONCE_BYTES]
    try:
        body = key.manifest_cipher.decrypt(
            nonce, blob[head + NONCE_BYTES :], blob[:head] + backup_id.encode()
        )
    except InvalidTag:
        raise DataLoss(
            f"backup {backup_id}'s manifest failed authentication: it was altered or "
            "renamed in the target; do not restore it"
        ) from None
    try:
        (length,) = _LENGTH.unpack_from(body)
        doc = json.loads(body[_LENGTH.size : _LENGTH.size + length])
        info = BackupInfo(
            backup_id=str(doc["backup_id"]),
            created_at=float(doc["created_at"]),
            volume_id=str(doc["volume_id"]),
            volume_name=str(doc["volume_name"]),
            fs_type=None if doc["fs_type"] is None else str(doc["fs_type"]),
            source=str(doc["source"]),
            encrypted=bool(doc.get("encrypted", False)),  # absent before encrypted volumes
        )
        version = int(doc.get("format", 1))
        rest = body[_LENGTH.size + length :]
        if version == 1:
            backup = Backup(info, manifests.decode(rest), format=1)
        elif version == 2:
            (encoded,) = _LENGTH.unpack_from(rest)
            manifest = manifests.decode(rest[_LENGTH.size : _LENGTH.size + encoded])
            backup = Backup(
                info, manifest, _split_blocks(manifest, rest[_LENGTH.size + encoded :]), 2
            )
        else:
            raise ValueError(f"backup format {version} is newer than this Ferry's")
    except (struct.error, ValueError, KeyError, TypeError, InvalidArgument) as exc:
        # Authenticated yet unreadable: written by a newer Ferry, or a bug.
        raise DataLoss(f"backup {backup_id}'s manifest cannot be read: {exc}") from None
    if info.backup_id != backup_id:
        raise DataLoss(f"backup {backup_id}'s manifest names another backup ({info.backup_id})")
    return backup


def _split_blocks(manifest: Manifest, data: bytes) -> tuple[bytes | None, ...]:
    blocks: list[bytes | None] = []
    at = 0
    for index, digest in enumerate(manifest.chunks):
        if digest is None:
            blocks.append(None)
            continue
        size = block_count(manifest.chunk_length(index), manifest.chunk_size) * DIGEST_SIZE
        blocks.append(data[at : at + size])
        at += size
    if at != len(data):
        raise ValueError(f"{len(data) - at} stray bytes after the block digests")
    return tuple(blocks)


@dataclass(frozen=True)
class TargetConfig:
    """What every client of a target must agree on, authenticated with the key."""

    chunk_size: int
    key_id: bytes
    created_at: float
    format: int = FORMAT_VERSION


def encode_config(key: BackupKey, config: TargetConfig) -> bytes:
    doc = {
        "format": config.format,
        "chunk_size": config.chunk_size,
        "key_id": config.key_id.hex(),
        "created_at": config.created_at,
    }
    body = json.dumps(doc, sort_keys=True)
    return json.dumps({**doc, "mac": key.mac(body.encode()).hex()}, sort_keys=True).encode()


def decode_config(key: BackupKey, raw: bytes) -> TargetConfig:
    try:
        doc = json.loads(raw)
        mac = bytes.fromhex(doc.pop("mac"))
        found = bytes.fromhex(doc["key_id"])
        version = int(doc["format"])
        config = TargetConfig(int(doc["chunk_size"]), found, float(doc["created_at"]), version)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataLoss(f"the target's config is damaged: {exc}") from None
    if found != key.key_id:
        raise wrong_key(found, key.key_id, "this backup target")
    if not hmac.compare_digest(key.mac(json.dumps(doc, sort_keys=True).encode()), mac):
        raise DataLoss("the target's config failed authentication: it was altered")
    if version not in READABLE_FORMATS:
        raise FailedPrecondition(
            f"the target uses backup format {version}; this Ferry reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}: use a newer release"
        )
    return config
