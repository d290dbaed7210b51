"""Packs (backup format 2): 64 KiB blocks, each sealed on its own, stored many to an object.

A block is a 64 KiB piece of a chunk (the chunk machinery's block,
:data:`~csi_driver.chunks.manifest.BLOCK_SIZE`, so a capture's block table
gives a backup its block digests without reading the image again). Its id is
``HMAC(naming key, SHA-256 of its bytes)`` (:meth:`BackupKey.block_id`).

Block record, as stored in a pack::

    flags (1: bit 0 = zstd) | nonce (12) | AES-256-GCM(payload)

with ``"FBB2" | flags | block id`` as associated data: a record moved under
another id, or with its flag flipped, fails authentication like an altered
one. The payload is the block compressed with zstd, or as is when that does
not make it smaller.

Pack object (``packs/<nn>/<pack id>``, 16 to 32 MiB)::

    block records, one after another | sealed index | index length (u32) | "FBP2"

Index (the pack's table of contents; also stored alone as ``index/<pack id>``
so that opening a repository reads a few KiB per pack, not the packs)::

    key id (8) | nonce (12) | AES-256-GCM("FBI2" | pack id (32) | count (u32) |
                                          count x (block id (32) | offset (u32) |
                                                   stored length (u32) | length (u32)))

with ``"FBI2" | pack id`` as associated data: an index under another pack's
name is refused.

Invariants: nothing here returns bytes that were not sealed under this key
for this id: an altered record, index or a wrong key is :class:`DataLoss`
(or FailedPrecondition naming both key ids). Decompression is bounded by the
block's length from its index entry. A pack id and a block id are 32 bytes,
like the names claims carry (see :mod:`.claims`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, cast

import zstandard
from cryptography.exceptions import InvalidTag

from csi_driver.backup.format import wrong_key
from csi_driver.backup.keys import KEY_ID_BYTES, BackupKey
from csi_driver.core.errors import DataLoss

if TYPE_CHECKING:
    from typing_extensions import Buffer

_RECORD_AAD = b"FBB2"
_INDEX_MAGIC = b"FBI2"
PACK_MAGIC = b"FBP2"
_ZSTD = 0x01
NONCE_BYTES = 12
TAG_BYTES = 16
ID_BYTES = 32
#: Bytes a record adds to its payload: flags, nonce and GCM tag.
RECORD_OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES
#: zstd level 1, as format 1 (docs/decisions/0003-backup-format.md).
ZSTD_LEVEL = 1
#: A block whose first 8 KiB do not shrink by 3% is stored as is: random or
#: already compressed data skips zstd's full pass.
_SAMPLE = 8 * 1024
#: A record's associated data starts with these, by its flags (built once, not per block).
_AAD_PREFIX = {flags: _RECORD_AAD + bytes([flags]) for flags in (0, _ZSTD)}
_HEAD = 1 + NONCE_BYTES  # flags and nonce, before the ciphertext
_ENTRY = struct.Struct(">32sIII")
_COUNT = struct.Struct(">32sI")
TRAILER = struct.Struct(">I4s")
#: A pack is closed once its records reach this many bytes (then it holds at
#: most one more block): few objects per GiB, small enough to repack.
PACK_BYTES = 16 * 1024 * 1024

Blob = bytes | bytearray | memoryview


def new_pack_id() -> bytes:
    return os.urandom(ID_BYTES)


class Entry(NamedTuple):
    """Where a block is in its pack, and how long it is stored and restored.

    An immutable named tuple rather than a frozen dataclass: a backup makes one per
    new block (16 384 per GiB) on its driving thread, and a frozen dataclass's
    ``__init__`` cost three times as much while holding the GIL."""

    block_id: bytes
    offset: int
    stored: int  # the record's bytes in the pack
    length: int  # the block's bytes


@dataclass(frozen=True)
class Location:
    pack_id: bytes
    entry: Entry


def new_nonces(count: int) -> bytes:
    """Random nonces for ``count`` records, from one call: a getrandom per block was
    a system call per 64 KiB, releasing and taking the GIL back each time."""
    return os.urandom(NONCE_BYTES * count)


def seal_record(
    key: BackupKey,
    out: memoryview | mmap.mmap,
    at: int,
    block_id: bytes,
    data: Blob,
    payload: Blob | None,
    nonces: bytes,
    n: int,
) -> int:
    """Write the record of block ``block_id`` at ``out[at:]``: ``payload`` (its zstd
    frame) when not None, else ``data`` as is, sealed under nonce number ``n`` of
    ``nonces``; how many bytes it takes. AES-GCM writes the ciphertext where the
    record goes, so a record costs no copy of its own."""
    flags = _ZSTD
    if payload is None:
        flags, payload = 0, data
    stored = _HEAD + len(payload) + TAG_BYTES
    nonce = nonces[n * NONCE_BYTES : (n + 1) * NONCE_BYTES]
    out[at] = flags
    out[at + 1 : at + _HEAD] = nonce
    key.block_cipher.encrypt_into(
        nonce, payload, _AAD_PREFIX[flags] + block_id, memoryview(out)[at + _HEAD : at + stored]
    )
    return stored


class BlockCodec:
    """Seals and opens block records; one per thread (it keeps zstd contexts)."""

    def __init__(self, key: BackupKey) -> None:
        self._key = key
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._decompressor = zstandard.ZstdDecompressor()

    def compress(self, blocks: Sequence[Blob]) -> list[Blob | None]:
        """Each of ``blocks`` compressed, or None where zstd does not make it smaller;
        a block whose first :data:`_SAMPLE` bytes do not shrink by 3% is not tried.

        Two calls for all of them (samples, then the blocks worth it), each
        compressing every block in C without the GIL: a call per 64 KiB block made
        the workers hand the GIL to each other twice per block, which on two cores
        cost more than the Python around it."""
        found: list[Blob | None] = [None] * len(blocks)
        probed = [i for i, data in enumerate(blocks) if len(data) > 2 * _SAMPLE]
        skip: set[int] = set()
        if probed:
            samples = self._compressor.multi_compress_to_buffer(
                [memoryview(blocks[i])[:_SAMPLE] for i in probed]
            )
            skip = {i for n, i in enumerate(probed) if len(samples[n]) >= _SAMPLE * 0.97}
        tried = [i for i in range(len(blocks)) if i not in skip]
        if tried:
            compressed = self._compressor.multi_compress_to_buffer([blocks[i] for i in tried])
            for n, i in enumerate(tried):
                if len(compressed[n]) < len(blocks[i]):
                    # zstandard's stubs omit that segments are buffers (they are).
                    found[i] = memoryview(cast("Buffer", compressed[n]))
        return found

    def seal_many(
        self, blocks: Sequence[tuple[bytes, Blob]], out: memoryview
    ) -> list[tuple[bytes, int, int, int]]:
        """Write the records of ``blocks`` (block id, bytes each) one after another at
        the start of ``out`` (room for each block plus :data:`RECORD_OVERHEAD`);
        (block id, offset in ``out``, stored length, block length) of each."""
        records = []
        at = 0
        compressed = self.compress([data for _, data in blocks])
        nonces = new_nonces(len(blocks))
        for n, ((block_id, data), payload) in enumerate(zip(blocks, compressed, strict=True)):
            stored = seal_record(self._key, out, at, block_id, data, payload, nonces, n)
            records.append((block_id, at, stored, len(data)))
            at += stored
        return records

    def open_into(self, entry: Entry, record: memoryview, digest: bytes, into: memoryview) -> None:
        """Write the block ``record`` holds into ``into`` (``entry.length`` bytes),
        checked to be the bytes hashing to ``digest``."""
        self.open_many([(entry, record, digest, into)])

    def open_many(self, blocks: Sequence[tuple[Entry, memoryview, bytes, memoryview]]) -> None:
        """:meth:`open_into` for each of ``blocks`` (entry, record, digest, into), the
        compressed ones decompressed in one call without the GIL (see
        :meth:`compress`). A frame is decompressed together with the others
        only when its header declares the block's length, so the output stays
        bounded by the index; any other is decompressed alone, bounded the same."""
        pending: list[tuple[Entry, bytes, memoryview]] = []
        for entry, record, _, into in blocks:
            payload = self._decrypt(entry, record, into)
            if payload is None:
                continue
            try:
                declared = zstandard.frame_content_size(payload)
            except zstandard.ZstdError as exc:
                raise DataLoss(f"block {entry.block_id.hex()} does not decompress: {exc}") from None
            if declared == entry.length:
                pending.append((entry, payload, into))
            else:
                self._decompress_into(entry, payload, into)
        if pending:
            try:
                found = self._decompressor.multi_decompress_to_buffer([p for _, p, _ in pending])
            except zstandard.ZstdError:
                for entry, payload, into in pending:  # alone, to name the block at fault
                    self._decompress_into(entry, payload, into)
            else:
                for n, (entry, _, into) in enumerate(pending):
                    data = found[n]
                    if len(data) != entry.length:
                        raise DataLoss(
                            f"block {entry.block_id.hex()} does not hold the bytes its index names"
                        )
                    into[:] = memoryview(cast("Buffer", data))
        for entry, _, digest, into in blocks:
            if hashlib.sha256(into).digest() != digest:
                raise DataLoss(
                    f"block {entry.block_id.hex()} does not hold the bytes its manifest names"
                )

    def _decrypt(self, entry: Entry, record: memoryview, into: memoryview) -> bytes | None:
        """Authenticate ``record``: its block decrypted into ``into`` when stored as is
        (None), else its zstd frame."""
        name = entry.block_id.hex()
        if len(record) < RECORD_OVERHEAD or len(record) - RECORD_OVERHEAD > entry.length:
            raise DataLoss(f"block {name} has an impossible length in its pack (damaged)")
        flags = record[0]
        nonce, sealed = record[1:_HEAD], record[_HEAD:]
        aad = _RECORD_AAD + bytes([flags]) + entry.block_id
        try:
            if flags & _ZSTD:
                return self._key.block_cipher.decrypt(nonce, sealed, aad)
            if len(sealed) - TAG_BYTES != entry.length:
                raise DataLoss(f"block {name} does not hold the bytes its index names")
            self._key.block_cipher.decrypt_into(nonce, sealed, aad, into)
            return None
        except InvalidTag:
            raise DataLoss(
                f"block {name} failed authentication: it was altered in the target (or "
                "written under another key); nothing was restored from it"
            ) from None

    def _decompress_into(self, entry: Entry, payload: bytes, into: memoryview) -> None:
        name = entry.block_id.hex()
        try:
            data = self._decompressor.decompress(payload, max_output_size=entry.length)
        except zstandard.ZstdError as exc:
            raise DataLoss(f"block {name} does not decompress: {exc}") from None
        if len(data) != entry.length:
            raise DataLoss(f"block {name} does not hold the bytes its index names")
        into[:] = data

    def authenticate(self, block_id: bytes, record: Blob) -> None:
        """DataLoss unless ``record`` is block ``block_id``'s, as sealed (repacking)."""
        view = memoryview(record)
        if len(view) < RECORD_OVERHEAD:
            raise DataLoss(f"block {block_id.hex()} is truncated in its pack")
        aad = _RECORD_AAD + bytes([view[0]]) + block_id
        try:
            self._key.block_cipher.decrypt(view[1 : 1 + NONCE_BYTES], view[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            raise DataLoss(f"block {block_id.hex()} failed authentication in its pack") from None


def seal_index(key: BackupKey, pack_id: bytes, entries: list[Entry]) -> bytes:
    body = bytearray(_INDEX_MAGIC + _COUNT.pack(pack_id, len(entries)))
    for entry in entries:
        body += _ENTRY.pack(entry.block_id, entry.offset, entry.stored, entry.length)
    nonce = os.urandom(NONCE_BYTES)
    sealed = key.index_cipher.encrypt(nonce, bytes(body), _INDEX_MAGIC + pack_id)
    return key.key_id + nonce + sealed


def open_index(key: BackupKey, pack_id: bytes, blob: Blob) -> list[Entry]:
    """The entries of pack ``pack_id``'s index, authenticated."""
    name = pack_id.hex()
    view = memoryview(blob)
    if len(view) < KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES:
        raise DataLoss(f"the index of pack {name} is truncated (damaged)")
    found = bytes(view[:KEY_ID_BYTES])
    if found != key.key_id:
        raise wrong_key(found, key.key_id, f"pack {name}")
    nonce = view[KEY_ID_BYTES : KEY_ID_BYTES + NONCE_BYTES]
    try:
        body = key.index_cipher.decrypt(
            nonce, view[KEY_ID_BYTES + NONCE_BYTES :], _INDEX_MAGIC + pack_id
        )
    except InvalidTag:
        raise DataLoss(
            f"the index of pack {name} failed authentication: it was altered or renamed "
            "in the target"
        ) from None
    head = len(_INDEX_MAGIC) + _COUNT.size
    found_id, count = _COUNT.unpack_from(body, len(_INDEX_MAGIC))
    if body[: len(_INDEX_MAGIC)] != _INDEX_MAGIC or found_id != pack_id:
        raise DataLoss(f"the index of pack {name} names another pack")
    if len(body) != head + count * _ENTRY.size:
        raise DataLoss(f"the index of pack {name} cannot be read (written by a newer Ferry?)")
    return [Entry(*_ENTRY.unpack_from(body, head + i * _ENTRY.size)) for i in range(count)]


class PackBuilder:
    """Records appended into one pack's bytes, then closed with its index.

    The bytes go into ``buffer`` (reused from pack to pack by the caller), or a
    new one of ``capacity``; a pack that outgrows it moves to a larger one.
    Buffers are anonymous maps: page-aligned, so a directory target writes the
    pack with O_DIRECT (see :func:`~csi_driver.backup.targets._write_file`).
    """

    def __init__(self, key: BackupKey, buffer: mmap.mmap | None, capacity: int) -> None:
        self._key = key
        self.pack_id = new_pack_id()
        self.entries: list[Entry] = []
        self.buffer = buffer if buffer is not None else mmap.mmap(-1, capacity)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def _room(self, end: int) -> None:
        if end > len(self.buffer):  # rare: a new buffer, never a resize of a shared one
            grown = mmap.mmap(-1, max(end, 2 * len(self.buffer)))
            grown[: self._length] = memoryview(self.buffer)[: self._length]
            self.buffer = grown

    def _append(self, data: Blob) -> None:
        end = self._length + len(data)
        self._room(end)
        self.buffer[self._length : end] = data
        self._length = end

    def seal(
        self, block_id: bytes, data: Blob, payload: Blob | None, nonces: bytes, n: int
    ) -> None:
        """Seal block ``block_id`` (see :func:`seal_record`) straight into the pack."""
        at = self._length
        self._room(at + RECORD_OVERHEAD + len(data if payload is None else payload))
        stored = seal_record(self._key, self.buffer, at, block_id, data, payload, nonces, n)
        self._length = at + stored
        self.entries.append(Entry(block_id, at, stored, len(data)))

    def add(self, block_id: bytes, record: Blob, length: int) -> Entry:
        entry = Entry(block_id, self._length, len(record), length)
        self._append(record)
        self.entries.append(entry)
        return entry

    def close(self) -> tuple[memoryview, bytes]:
        """The pack's bytes (a view of :attr:`buffer`) and its sealed index (also at the
        pack's end)."""
        index = seal_index(self._key, self.pack_id, self.entries)
        self._append(index + TRAILER.pack(len(index), PACK_MAGIC))
        return memoryview(self.buffer)[: self._length], index


def index_span(pack_id: bytes, pack_size: int, trailer: Blob) -> tuple[int, int]:
    """Where a pack of ``pack_size`` bytes ending in ``trailer`` (its last
    :data:`TRAILER` bytes) keeps its index: offset and length."""
    if len(trailer) != TRAILER.size:
        raise DataLoss(f"pack {pack_id.hex()} is truncated")
    length, magic = TRAILER.unpack(trailer)
    if magic != PACK_MAGIC or length > pack_size - TRAILER.size:
        raise DataLoss(f"pack {pack_id.hex()} has no index at its end (damaged)")
    return pack_size - TRAILER.size - length, length
