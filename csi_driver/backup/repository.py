"""A backup repository: the format of :mod:`.format` and :mod:`.packs` in a :mod:`.targets` target.

Layout (format 2)::

    config                     format, chunk size and key id, authenticated (written once)
    packs/<nn>/<pack id>       sealed 64 KiB blocks, many per pack (16-32 MiB), and their index
    index/<pack id>            a pack's sealed index (block id -> offset, lengths), alone
    manifests/<backup-id>      a sealed manifest: one backup, complete
    claims/..., sweeps/...     garbage collection's safety protocol (see :mod:`.claims`)
    chunks/<nn>/<name>         format 1 only: one object per chunk (read, never written)

Invariants:

- A pack is visible only once complete (staged, then renamed after an fsync;
  one PUT in S3); its index object only once the pack is durable; a manifest
  is put last, in one atomic durable put, after every pack and index it
  relies on is durable. The target never holds a manifest naming a missing
  block, nor an index naming a missing pack. An interrupted backup leaves
  only packs (and maybe indexes), which the retry reuses when indexed and
  which garbage collection removes otherwise.
- Blocks are immutable, named by a keyed hash and shared: deduplicated at
  64 KiB across volumes and backups. A backup uploads only blocks no index
  names, so a second backup of an unchanged volume puts one manifest (and
  its claim's small objects), and one after scattered changes about what
  changed, plus an index per new pack.
- Everything read back is authenticated before use: a restore writes no byte
  that failed its block's authentication and SHA-256 (and every chunk's
  block digests hash to the chunk digest the sealed manifest holds); a
  damaged index or manifest is never trusted, by restores or by garbage
  collection (:mod:`.collection`, which then refuses to run).
- A restore lands in a ``.part`` file next to its destination, renamed into
  place once complete and durable; a retry resumes it, keeping the chunks
  that already hold the right bytes.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from csi_driver import metrics
from csi_driver.backup.claims import DEFAULT_GRACE_S, Claim
from csi_driver.backup.format import (
    FORMAT_VERSION,
    Backup,
    BackupInfo,
    ChunkCodec,
    TargetConfig,
    decode_config,
    encode_config,
    open_manifest,
    seal_manifest,
)
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.packs import (
    PACK_BYTES,
    RECORD_OVERHEAD,
    TRAILER,
    Entry,
    Location,
    index_span,
    open_index,
)
from csi_driver.backup.retention import Dated, RetentionPolicy, kept
from csi_driver.backup.targets import Target
from csi_driver.backup.upload import (
    INDEX,
    PACKS,
    Buffers,
    ChunkRead,
    ChunkWorkers,
    Codecs,
    Compressed,
    PackWriter,
    index_key,
    pack_key,
    split_digests,
)
from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.direct import ImageIO
from csi_driver.chunks.manifest import (
    BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    HOLE_BLOCK,
    Digest,
    Manifest,
    check_chunk_size,
    chunk_count,
    chunk_digest,
    root_digest,
)
from csi_driver.chunks.scan import chunks_touching, data_ranges, read_exactly
from csi_driver.core.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi_driver.node.pool import fsync_dir, preallocate

log = logging.getLogger(__name__)

CONFIG = "config"
CHUNKS = "chunks/"
MANIFESTS = "manifests/"
#: Chunks read, claimed and checked together: the claim objects stay few, and
#: a batch (64 MiB at 4 MiB chunks) keeps both cores busy while the next is read.
BATCH_CHUNKS = 16
#: Chunk reads in flight per worker while the driving thread decides and lands others.
READ_AHEAD_PER_WORKER = 2
_BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
_ZEROS = bytes(BLOCK_SIZE)


def new_backup_id() -> str:
    """Sortable by time; says nothing about the volume (ids are visible in the target)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def check_backup_id(backup_id: str) -> str:
    if not _BACKUP_ID.match(backup_id):
        raise InvalidArgument(
            f"{backup_id!r} is not a backup id (like 20261126T233000Z-1a2b3c4d); "
            "`ferry backup list` shows them"
        )
    return backup_id


def chunk_key(name: str) -> str:
    """Where format 1 stored a chunk."""
    return f"{CHUNKS}{name[:2]}/{name}"


class Progress:
    """Where long operations report bytes done; the CLI's bars subclass it."""

    def start(self, what: str, total_bytes: int) -> None:
        """A phase of ``total_bytes`` begins."""

    def advance(self, done_bytes: int) -> None:
        """``done_bytes`` more of the phase are done."""

    def finish(self) -> None:
        """The phase is over."""


@dataclass(frozen=True)
class BackupResult:
    backup: Backup
    bytes_read: int  # from the source image
    chunks_uploaded: int  # chunks with at least one new block
    bytes_uploaded: int  # every object put, compressed and encrypted, manifest included
    elapsed_s: float
    bytes_deduplicated: int = 0  # data bytes not uploaded: the target held their blocks
    blocks_uploaded: int = 0
    packs_uploaded: int = 0


@dataclass(frozen=True)
class RestoreResult:
    backup: Backup
    path: Path
    chunks_fetched: int
    chunks_kept: int  # already right in a resumed .part file
    elapsed_s: float


@dataclass(frozen=True)
class VerifyResult:
    backup: Backup
    chunks_checked: int
    bytes_checked: int


@dataclass(frozen=True)
class PruneResult:
    kept: tuple[str, ...]
    removed: tuple[str, ...]


BlockMap = dict[bytes, Location]


class Repository:
    """The backups in one target, read and written with one key."""

    def __init__(
        self,
        target: Target,
        key: BackupKey,
        config: TargetConfig,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        workers: int = 2,
        pack_bytes: int = PACK_BYTES,
    ) -> None:
        self.target = target
        self.key = key
        self.config = config
        self.grace_s = grace_s
        self.workers = workers
        self.pack_bytes = pack_bytes
        self.codecs = Codecs(key)
        self._scratch = threading.local()
        self._chunk_codecs = threading.local()

    def chunk_codec(self) -> ChunkCodec:
        """This thread's format 1 codec (codecs reuse buffers)."""
        codec: ChunkCodec | None = getattr(self._chunk_codecs, "codec", None)
        if codec is None:
            codec = self._chunk_codecs.codec = ChunkCodec(self.key)
        return codec

    @classmethod
    def open(
        cls,
        target: Target,
        key: BackupKey,
        *,
        create: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        grace_s: float = DEFAULT_GRACE_S,
        workers: int = 2,
        pack_bytes: int = PACK_BYTES,
    ) -> Repository:
        """The repository in ``target``; with ``create``, made there if it holds none."""
        try:
            raw = target.get(CONFIG)
        except NotFound:
            if not create:
                raise NotFound(
                    f"no Ferry backups in {target.description}; `ferry backup create` "
                    "makes the first"
                ) from None
            config = TargetConfig(check_chunk_size(chunk_size), key.key_id, time.time())
            target.put(CONFIG, encode_config(key, config), durable=True)
            log.info("backup target initialised", extra={"target": target.description})
            raw = target.get(CONFIG)
        config = decode_config(key, raw)
        return cls(target, key, config, grace_s=grace_s, workers=workers, pack_bytes=pack_bytes)

    # -- reading ---------------------------------------------------------------

    def backup(self, backup_id: str) -> Backup:
        key = MANIFESTS + check_backup_id(backup_id)
        try:
            blob = self.target.get(key)
        except NotFound:
            raise NotFound(
                f"no backup {backup_id} in {self.target.description}; `ferry backup list` "
                "shows the backups there"
            ) from None
        return open_manifest(self.key, backup_id, blob)

    def backups(self) -> list[Backup]:
        """Every backup, oldest first; DataLoss if any manifest fails its check."""
        found = [
            self.backup(stored.key.removeprefix(MANIFESTS))
            for stored in self.target.list(MANIFESTS)
        ]
        return sorted(found, key=lambda b: (b.info.created_at, b.backup_id))

    def latest(self, volume_name: str, *, among: int = 8) -> Backup | None:
        """The newest format 2 backup of ``volume_name`` among the ``among`` newest
        backups (ids sort by time), or None: an incremental backup's parent."""
        keys = sorted((s.key for s in self.target.list(MANIFESTS)), reverse=True)
        for key in keys[:among]:
            backup = self.backup(key.removeprefix(MANIFESTS))
            if backup.format >= 2 and backup.info.volume_name == volume_name:
                return backup
        return None

    def chunk_names(self) -> set[str]:
        """Format 1's chunk objects."""
        return {stored.key.rsplit("/", 1)[-1] for stored in self.target.list(CHUNKS)}

    def names_of(self, manifest: Manifest) -> list[str | None]:
        """Format 1's chunk names of ``manifest``."""
        return [None if d is None else self.key.chunk_name(d) for d in manifest.chunks]

    def indexes(self) -> dict[bytes, list[Entry]]:
        """Every pack's index, authenticated (DataLoss for a damaged one), by pack id."""
        ids = []
        for stored in self.target.list(INDEX):
            try:
                ids.append(bytes.fromhex(stored.key.removeprefix(INDEX)))
            except ValueError:
                continue  # not Ferry's
        with ThreadPoolExecutor(8, thread_name_prefix="backup-index") as pool:
            blobs = list(pool.map(lambda pack_id: self.target.get(index_key(pack_id)), ids))
        return {
            pack_id: open_index(self.key, pack_id, blob)
            for pack_id, blob in zip(ids, blobs, strict=True)
        }

    def adopt_packs(self) -> int:
        """Index the packs that have none (their backup died between its packs and
        their indexes), from the index at each pack's end, so a retry reuses them. A
        visible pack is complete and durable, so indexing it is always safe."""
        indexed = {stored.key.removeprefix(INDEX) for stored in self.target.list(INDEX)}
        adopted = 0
        for stored in list(self.target.list(PACKS)):
            name = stored.key.rsplit("/", 1)[-1]
            if name in indexed:
                continue
            try:
                pack_id = bytes.fromhex(name)
                trailer = self.target.get_range(
                    stored.key, stored.size - TRAILER.size, TRAILER.size
                )
                start, length = index_span(pack_id, stored.size, trailer)
                index = bytes(self.target.get_range(stored.key, start, length))
                open_index(self.key, pack_id, index)
            except (ValueError, DataLoss, NotFound) as exc:
                log.warning("pack not adopted", extra={"pack": name, "error": str(exc)})
                continue
            self.target.put(index_key(pack_id), index, durable=True)
            adopted += 1
        return adopted

    def block_map(self) -> BlockMap:
        """Where every indexed block is."""
        found: BlockMap = {}
        for pack_id, entries in self.indexes().items():
            for entry in entries:
                found.setdefault(entry.block_id, Location(pack_id, entry))
        return found

    def block_ids(self, backup: Backup) -> set[bytes]:
        """The ids of the blocks ``backup`` (format 2) is made of."""
        return {
            self.key.block_id(digest)
            for blocks in backup.blocks
            if blocks is not None
            for digest in split_digests(blocks)
            if digest != HOLE_BLOCK
        }

    def fetch_chunk(
        self, backup: Backup, index: int, buffer: bytearray | mmap.mmap, blocks: BlockMap
    ) -> memoryview:
        """Chunk ``index`` of ``backup``, checked, in ``buffer`` (or, format 1, in bytes
        of its own): every block authenticated and hashed, read from its pack with
        one ranged read per run of blocks stored one after another."""
        manifest = backup.manifest
        digest, length = manifest.chunks[index], manifest.chunk_length(index)
        assert digest is not None
        if backup.format == 1:
            return self._fetch_v1(self.key.chunk_name(digest), digest, length, buffer)
        digests = backup.blocks[index]
        assert digests is not None
        view = memoryview(buffer)[:length]
        codec = self.codecs.get()
        run: list[tuple[int, bytes, Location]] = []
        scratch = self._scratch_buffer(manifest.chunk_size)

        def read_run() -> None:
            first, last = run[0][2], run[-1][2]
            start = first.entry.offset
            try:
                data = memoryview(
                    self.target.get_range(
                        pack_key(first.pack_id),
                        start,
                        last.entry.offset + last.entry.stored - start,
                        into=scratch,
                    )
                )
            except NotFound:
                raise DataLoss(
                    f"pack {first.pack_id.hex()} (chunk {index}) is missing from "
                    f"{self.target.description}; the backup cannot be restored whole"
                ) from None
            codec.open_many(
                [
                    (
                        where.entry,
                        data[
                            where.entry.offset - start : where.entry.offset
                            - start
                            + where.entry.stored
                        ],
                        block_digest,
                        view[block * BLOCK_SIZE : block * BLOCK_SIZE + where.entry.length],
                    )
                    for block, block_digest, where in run
                ]
            )
            run.clear()

        for block, block_digest in enumerate(split_digests(digests)):
            span = view[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE]
            if block_digest == HOLE_BLOCK:
                span[:] = _ZEROS[: len(span)]
                continue
            block_id = self.key.block_id(block_digest)
            where = blocks.get(block_id)
            if where is None:
                raise DataLoss(
                    f"block {block_id.hex()} (chunk {index}) is in no pack of "
                    f"{self.target.description}; the backup cannot be restored whole"
                )
            if where.entry.length != len(span):
                raise DataLoss(f"block {block_id.hex()}'s index gives it a wrong length")
            if run and (
                run[-1][2].pack_id != where.pack_id
                or run[-1][2].entry.offset + run[-1][2].entry.stored != where.entry.offset
            ):
                read_run()
            run.append((block, block_digest, where))
        if run:
            read_run()
        return view

    def _scratch_buffer(self, chunk_size: int) -> bytearray:
        """This thread's buffer for a chunk's records (reused: fresh megabytes per read
        cost a page fault per 4 KiB)."""
        size = chunk_size + (chunk_size // BLOCK_SIZE + 1) * RECORD_OVERHEAD
        scratch: bytearray | None = getattr(self._scratch, "buffer", None)
        if scratch is None or len(scratch) < size:
            scratch = self._scratch.buffer = bytearray(size)
        return scratch

    def _fetch_v1(
        self, name: str, digest: Digest, length: int, into: bytearray | mmap.mmap | None = None
    ) -> memoryview:
        try:
            blob = self.target.get(chunk_key(name))
        except NotFound:
            raise DataLoss(
                f"chunk {name} is missing from {self.target.description}; the backup "
                "cannot be restored whole"
            ) from None
        return self.chunk_codec().open(name, blob, digest, length, into)


@dataclass
class _Run:
    """One backup's reading and uploading, under its claim (see :mod:`.claims`)."""

    repo: Repository
    claim: Claim
    workers: ChunkWorkers
    packs: PackWriter
    progress: Progress
    present: BlockMap  # the blocks indexed in the target, as last listed
    size: int  # the image's
    written: set[bytes] = field(default_factory=set)  # block ids this run put in its packs
    claimed: set[bytes] = field(default_factory=set)  # pack ids this run relies on
    bytes_read: int = 0
    bytes_deduplicated: int = 0
    chunks_uploaded: int = 0
    unsettled_bytes: int = 0  # deduplicated in this batch, before its claim
    inflight: deque[Future[Compressed]] = field(default_factory=deque)

    def _relied_on(self, ids: set[bytes]) -> None:
        """Claim the packs holding ``ids`` before trusting ``present`` about them, again
        after every collection that ran meanwhile (it may have moved or removed
        them): a collection leaves a claimed pack alone. A claim of packs rather
        than blocks is a few ids per batch, not one per 64 KiB."""
        while True:
            packs = {self.present[i].pack_id for i in ids if i in self.present} - self.claimed
            self.claim.add(sorted(pack_id.hex() for pack_id in packs))
            self.claimed |= packs
            if not self.claim.quiet():
                return
            self.present = self.repo.block_map()  # a sweep ran since the last listing

    def _land(self, compressed: Compressed) -> None:
        self.bytes_read += compressed.bytes_read
        self.packs.seal(compressed)
        self.progress.advance(sum(len(data) for _, data in compressed.blocks))
        self.workers.give(compressed)

    def _submit(self, start: Callable[[], Future[Compressed]]) -> None:
        """Land what is done (and the oldest while too many are in flight), then call
        ``start``: a task that takes a chunk buffer acquires its slot only once the
        chunks landed here gave theirs back."""
        while self.inflight and (
            self.inflight[0].done() or len(self.inflight) >= 2 * self.repo.workers
        ):
            self._land(self.inflight.popleft().result())
        self.inflight.append(start())

    def drain(self) -> None:
        while self.inflight:
            self._land(self.inflight.popleft().result())

    def _new_blocks(self, index: int, blocks: bytes) -> list[tuple[int, bytes]]:
        """The blocks of chunk ``index`` to upload (block number, id); counts the rest."""
        wanted: list[tuple[int, bytes]] = []
        chunk_size = self.repo.config.chunk_size
        length = min(chunk_size, self.size - index * chunk_size)
        for block, digest in enumerate(split_digests(blocks)):
            if digest == HOLE_BLOCK:
                continue
            block_id = self.repo.key.block_id(digest)
            if block_id in self.present or block_id in self.written:
                size = min(BLOCK_SIZE, length - block * BLOCK_SIZE)
                self.bytes_deduplicated += size
                self.progress.advance(size)
            else:
                self.written.add(block_id)
                wanted.append((block, block_id))
        if wanted:
            self.chunks_uploaded += 1
        return wanted

    def _claim_present(self, chunks: list[bytes]) -> None:
        ids = {
            self.repo.key.block_id(digest)
            for blocks in chunks
            for digest in split_digests(blocks)
            if digest != HOLE_BLOCK
        }
        self._relied_on(ids)

    def _decide(self, read: ChunkRead) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        """Blocks of ``read`` to upload, and those the target's packs already hold
        (block number, id each), as ``present`` says before this batch's claim:
        :meth:`_settle` claims them, uploads any a collection took meanwhile, and
        only then counts the rest as deduplicated."""
        wanted: list[tuple[int, bytes]] = []
        relied: list[tuple[int, bytes]] = []
        present, written = self.present, self.written
        deduplicated = 0
        for block, block_id in enumerate(read.ids):
            if block_id is None:
                continue
            if block_id in present:
                relied.append((block, block_id))
            elif block_id not in written:
                written.add(block_id)
                wanted.append((block, block_id))
                continue
            deduplicated += min(BLOCK_SIZE, len(read.data) - block * BLOCK_SIZE)
        self.unsettled_bytes += deduplicated
        if wanted:
            self.chunks_uploaded += 1
        return wanted, relied

    def _settle(
        self, relied: dict[int, list[tuple[int, bytes]]], blocks: list[bytes | None]
    ) -> None:
        """Claim the packs holding the blocks a batch relied on, and upload again (read
        from the image, checked against its digests) any a collection removed since
        ``present`` was listed. Deciding first and claiming after keeps the workers
        reading while the driving thread claims; nothing is trusted unclaimed."""
        ids = {block_id for found in relied.values() for _, block_id in found}
        self._relied_on(ids)
        deduplicated, self.unsettled_bytes = self.unsettled_bytes, 0
        if not all(block_id in self.present for block_id in ids):
            chunk_size = self.repo.config.chunk_size
            for index, found in relied.items():
                length = min(chunk_size, self.size - index * chunk_size)
                wanted = []
                for block, block_id in found:
                    if block_id in self.present or block_id in self.written:
                        continue
                    self.written.add(block_id)
                    wanted.append((block, block_id))
                    deduplicated -= min(BLOCK_SIZE, length - block * BLOCK_SIZE)
                digests = blocks[index]
                if wanted and digests is not None:
                    self.chunks_uploaded += 1
                    self._submit(partial(self.workers.read_and_compress, index, wanted, digests))
        if deduplicated:
            self.bytes_deduplicated += deduplicated
            self.progress.advance(deduplicated)

    def scan_and_upload(self, fd: int, size: int) -> tuple[Manifest, tuple[bytes | None, ...]]:
        """Read and hash every data chunk once; upload the blocks the target lacks."""
        chunk_size = self.repo.config.chunk_size
        indexes = sorted(chunks_touching(data_ranges(fd, size), chunk_size))
        self.progress.start("backup", sum(min(chunk_size, size - i * chunk_size) for i in indexes))
        count = chunk_count(size, chunk_size)
        digests: list[Digest | None] = [None] * count
        blocks: list[bytes | None] = [None] * count
        relied: dict[int, list[tuple[int, bytes]]] = {}
        seen = 0
        for read in self.workers.read_ahead(indexes, READ_AHEAD_PER_WORKER * self.repo.workers):
            self.bytes_read += len(read.data)
            digest = root_digest(read.blocks)
            if digest is None:  # zeros: a hole
                self.progress.advance(len(read.data))
                self.workers.release(read)
                continue
            digests[read.index], blocks[read.index] = digest, read.blocks
            wanted, relied_on = self._decide(read)
            if relied_on:
                relied[read.index] = relied_on
            if wanted:
                self._submit(partial(self.workers.compress, read, wanted))
            else:
                self.workers.release(read)
            seen += 1
            if seen % BATCH_CHUNKS == 0:
                self._settle(relied, blocks)
                relied = {}
        self._settle(relied, blocks)
        return Manifest(size, chunk_size, tuple(digests)), tuple(blocks)

    def upload_missing(
        self, manifest: Manifest, table: BlockTable | None, parent: Backup | None, source: Path
    ) -> tuple[bytes | None, ...]:
        """Upload the blocks of ``manifest`` the target lacks. Block digests come from
        ``table`` (a capture's, checked against the manifest), else from ``parent``
        (a backup holding the same chunk), else from reading the chunk; every block
        read is checked against its digest."""
        inherited: dict[Digest, bytes] = {}
        if parent is not None:
            for digest, entries in zip(parent.manifest.chunks, parent.blocks, strict=True):
                if digest is not None and entries is not None:
                    inherited[digest] = entries
        self.progress.start("backup", manifest.data_bytes)
        blocks: list[bytes | None] = [None] * len(manifest.chunks)
        data = list(manifest.data_chunks)
        for start in range(0, len(data), BATCH_CHUNKS):
            batch = data[start : start + BATCH_CHUNKS]
            known: dict[int, bytes] = {}
            if table is not None:
                for index in batch:
                    found = table.read(index)
                    if root_digest(found) == manifest.chunks[index]:
                        known[index] = found
            for index in batch:
                digest = manifest.chunks[index]
                if index not in known and digest in inherited:
                    known[index] = inherited[digest]
            reads = {
                read.index: read for read in self.workers.read([i for i in batch if i not in known])
            }
            for index, read in reads.items():
                self.bytes_read += len(read.data)
                if root_digest(read.blocks) != manifest.chunks[index]:
                    raise FailedPrecondition(
                        f"chunk {index} of {source} changed since its manifest was "
                        "taken; back up a snapshot, or a volume nobody writes to"
                    )
                known[index] = read.blocks
            self._claim_present([known[i] for i in batch])
            for index in batch:
                blocks[index] = known[index]
                wanted = self._new_blocks(index, known[index])
                held = reads.get(index)
                if held is not None and wanted:
                    self._submit(partial(self.workers.compress, held, wanted))
                elif held is not None:
                    self.workers.release(held)
                elif wanted:
                    digests = known[index]
                    self._submit(partial(self.workers.read_and_compress, index, wanted, digests))
        return tuple(blocks)


@metrics.times_failures(metrics.BackupOperation.BACKUP)
def backup_image(
    repo: Repository,
    source: Path,
    *,
    volume_name: str,
    volume_id: str = "",
    fs_type: str | None = None,
    manifest: Manifest | None = None,
    blocks: Path | None = None,
    progress: Progress | None = None,
    backup_id: str | None = None,
    encrypted: bool = False,
    described: str | None = None,
) -> BackupResult:
    """Back up the image at ``source``, which must not change while this runs (a
    snapshot, or a volume nobody uses). Returns once the backup is committed.

    With ``manifest`` (the image's, e.g. from a reflink capture), only chunks
    holding blocks the target lacks are read, and with ``blocks`` (that
    capture's block table) only those blocks; each is checked against the
    manifest as it is read (FailedPrecondition when the source changed).
    Without it, every data chunk is read once and hashed. ``encrypted``
    (fscrypt inside the image) and ``described`` (the source as the operator
    knows it, e.g. ``snapshot:<id>``; default: the path) are sealed into the
    manifest.
    """
    started = time.monotonic()
    progress = progress or Progress()
    backup_id = check_backup_id(backup_id or new_backup_id())
    chunk_size = repo.config.chunk_size
    if repo.config.format != FORMAT_VERSION:
        raise FailedPrecondition(
            f"{repo.target.description} holds format {repo.config.format} backups, which "
            f"this Ferry restores, verifies and collects but no longer writes: back up into "
            "a new target (format 2: blocks in packs)"
        )
    if manifest is not None and manifest.chunk_size != chunk_size:
        raise InvalidArgument(
            f"the manifest's chunks are {manifest.chunk_size} bytes; this target's are "
            f"{chunk_size}: scan the image with the target's chunk size"
        )
    uploaded_before = repo.target.uploaded.bytes
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no image at {source} to back up") from None
    table: BlockTable | None = None
    try:
        size = os.fstat(fd).st_size
        if manifest is not None and manifest.size != size:
            raise FailedPrecondition(
                f"{source} is {size} bytes but its manifest says {manifest.size}; capture again"
            )
        if manifest is not None and blocks is not None:
            table = BlockTable(blocks, size, chunk_size)
        workers = ChunkWorkers(repo.key, fd, size, chunk_size, repo.workers, BATCH_CHUNKS)
        with (
            Claim(repo.target, backup_id, grace_s=repo.grace_s) as claim,
            PackWriter(
                repo.target,
                repo.key,
                lambda pack_id: claim.add([pack_id.hex()]),
                repo.pack_bytes,
            ) as packs,
        ):
            try:
                claim.quiet()
                repo.adopt_packs()
                run = _Run(repo, claim, workers, packs, progress, repo.block_map(), size)
                if manifest is None:
                    final, block_digests = run.scan_and_upload(fd, size)
                else:
                    parent = None if table is not None else repo.latest(volume_name)
                    block_digests = run.upload_missing(manifest, table, parent, source)
                    final = manifest
                run.drain()
            finally:
                workers.close()
            progress.finish()
            packs.commit()  # every pack durable, then its index staged
            claim.check_alive()
            backup = Backup(
                BackupInfo(
                    backup_id=backup_id,
                    created_at=time.time(),
                    volume_id=volume_id,
                    volume_name=volume_name,
                    fs_type=fs_type,
                    source=described or str(source),
                    encrypted=encrypted,
                ),
                final,
                block_digests,
            )
            # Durable: with the indexes staged before it.
            repo.target.put(MANIFESTS + backup_id, seal_manifest(repo.key, backup), durable=True)
    finally:
        if table is not None:
            table.close()
        os.close(fd)
    result = BackupResult(
        backup,
        run.bytes_read,
        run.chunks_uploaded,
        repo.target.uploaded.bytes - uploaded_before,
        time.monotonic() - started,
        run.bytes_deduplicated,
        packs.blocks,
        len(packs.indexes),
    )
    metrics.observe_backup(
        result.elapsed_s,
        read_bytes=result.bytes_read,
        uploaded_bytes=result.bytes_uploaded,
        deduplicated_bytes=result.bytes_deduplicated,
    )
    log.info(
        "backup committed",
        extra={
            "backup": backup_id,
            "volume": volume_name,
            "bytes_read": result.bytes_read,
            "blocks_uploaded": result.blocks_uploaded,
            "bytes_uploaded": result.bytes_uploaded,
        },
    )
    return result


def _read_chunks(
    fd: int, size: int, chunk_size: int, indexes: list[int]
) -> Iterable[tuple[int, bytes]]:
    for index in indexes:
        offset = index * chunk_size
        length = min(chunk_size, size - offset)
        data = os.pread(fd, length, offset)
        if len(data) < length:  # a short read: finish it the slow way
            data = bytes(read_exactly(fd, bytearray(length), offset, length))
        yield index, data


def part_path(destination: Path, backup_id: str) -> Path:
    """Where a restore of ``backup_id`` to ``destination`` lands until it is whole."""
    return destination.with_name(f".{destination.name}.{check_backup_id(backup_id)}.part")


@metrics.times_failures(metrics.BackupOperation.RESTORE)
def restore_image(
    repo: Repository,
    backup_id: str,
    destination: Path,
    *,
    size: int | None = None,
    reserve: bool = False,
    replace: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    """Restore backup ``backup_id`` into a new image file at ``destination``.

    ``size`` (at least the backup's) makes a larger image, zeros past the
    backup's end; ``reserve`` allocates its space up front (a thick Ferry
    image). ``destination`` must not exist unless ``replace``. The image
    appears whole at ``destination`` or not at all; a retry after a crash
    resumes the ``.part`` file.
    """
    started = time.monotonic()
    progress = progress or Progress()
    backup = repo.backup(backup_id)
    manifest = backup.manifest
    size = manifest.size if size is None else size
    if size < manifest.size:
        raise FailedPrecondition(
            f"backup {backup_id} is {manifest.size} bytes; it does not fit in {size}"
        )
    if destination.exists() and not replace:
        raise AlreadyExists(f"{destination} exists; restore to a new path")
    part = part_path(destination, backup_id)
    fetched = kept_chunks = written = 0
    with Claim(repo.target, f"restore-{uuid.uuid4().hex[:12]}", grace_s=repo.grace_s) as claim:
        blocks = _claim_for_reading(repo, backup, claim)
        resumed = part.exists() and part.stat().st_size == size
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not resumed:
                os.ftruncate(fd, 0)
                if reserve:
                    preallocate(fd, 0, size, f"restore backup {backup_id}")
                else:
                    os.ftruncate(fd, size)
            wanted = manifest.data_chunks
            progress.start("restore", manifest.data_bytes)
            if resumed:
                wanted, kept_chunks = _still_wanted(fd, manifest, wanted, progress)
                log.info(
                    "restore resumed",
                    extra={"backup": backup_id, "chunks_kept": kept_chunks},
                )
            written = sum(manifest.chunk_length(i) for i in wanted)
            writer = ImageIO(part, write=True, buffer_size=manifest.chunk_size)
            fetched = _fetch_into(repo, writer, backup, blocks, wanted, progress)
            os.fsync(fd)
        finally:
            os.close(fd)
        progress.finish()
    os.replace(part, destination)
    fsync_dir(destination.parent)
    log.info(
        "backup restored",
        extra={"backup": backup_id, "path": str(destination), "chunks_fetched": fetched},
    )
    result = RestoreResult(backup, destination, fetched, kept_chunks, time.monotonic() - started)
    metrics.observe_restore(result.elapsed_s, written)
    return result


def _claim_for_reading(repo: Repository, backup: Backup, claim: Claim) -> BlockMap:
    """Claim what a restore of ``backup`` reads, and where it is: the packs holding its
    blocks (format 1: its chunks), again until no collection ran in between."""
    if backup.format == 1:
        claim.add(sorted({name for name in repo.names_of(backup.manifest) if name is not None}))
        claim.quiet()
        return {}
    # The manifest names the blocks, so a collection keeps them while the backup
    # exists; claiming the packs holding them (again after every collection that
    # ran in between) keeps the restore's reads valid even if the backup is
    # pruned, or a collection repacks, meanwhile.
    ids = repo.block_ids(backup)
    claim.quiet()
    while True:
        blocks = repo.block_map()
        claim.add(sorted({blocks[i].pack_id.hex() for i in ids if i in blocks}))
        if not claim.quiet():
            return blocks


def _still_wanted(
    fd: int, manifest: Manifest, wanted: tuple[int, ...], progress: Progress
) -> tuple[tuple[int, ...], int]:
    """The chunks of ``wanted`` that a resumed part file does not hold yet."""
    missing: list[int] = []
    for index, data in _read_chunks(fd, manifest.size, manifest.chunk_size, list(wanted)):
        if chunk_digest(data) == manifest.chunks[index]:
            progress.advance(len(data))
        else:
            missing.append(index)
    return tuple(missing), len(wanted) - len(missing)


def _fetch_into(
    repo: Repository,
    writer: ImageIO,
    backup: Backup,
    blocks: BlockMap,
    wanted: tuple[int, ...],
    progress: Progress,
) -> int:
    """Fetch and check chunks ``wanted`` on worker threads (ranged reads, decrypt,
    decompress, SHA-256 per block), write them in order from this one, a chunk per
    write: one writer, so the workers never wait on the file's lock, and reused
    page-aligned buffers (anonymous maps), so no chunk costs fresh pages and
    whole chunks are written with O_DIRECT straight from them.

    Writing a restore through the page cache cost 0.2 to 2 s of kernel CPU per
    GiB on the shared machine (allocating and reclaiming cache pages under
    memory pressure), more than decrypting and hashing it; O_DIRECT costs a few
    hundredths, and the restore is fsynced anyway. ``writer`` falls back to the
    page cache where the filesystem has no direct I/O."""
    manifest = backup.manifest
    window: deque[tuple[int, mmap.mmap, Future[memoryview]]] = deque()
    free = [mmap.mmap(-1, manifest.chunk_size) for _ in range(3 * repo.workers)]

    def fetch(index: int, buffer: mmap.mmap) -> memoryview:
        return repo.fetch_chunk(backup, index, buffer, blocks)

    def write(index: int, buffer: mmap.mmap, future: Future[memoryview]) -> None:
        data = future.result()
        # Format 1's compressed chunks come back in bytes of their own: copied.
        writer.write(manifest.span(index)[0], data, page_aligned=data.obj is buffer)
        data.release()
        free.append(buffer)
        progress.advance(manifest.chunk_length(index))

    try:
        with ThreadPoolExecutor(repo.workers, thread_name_prefix="restore-fetch") as pool:
            try:
                for index in wanted:
                    if len(window) >= 2 * repo.workers:
                        write(*window.popleft())
                    buffer = free.pop()
                    window.append((index, buffer, pool.submit(fetch, index, buffer)))
                while window:
                    write(*window.popleft())
            finally:
                for _, _, future in window:
                    future.cancel()
    finally:
        writer.close()
    return len(wanted)


def verify_backup(
    repo: Repository, backup_id: str, *, progress: Progress | None = None
) -> VerifyResult:
    """Read every chunk of backup ``backup_id`` back and check it (every block
    authenticated and hashed); DataLoss naming the bad ones (all of them, not just
    the first) if any fails."""
    progress = progress or Progress()
    backup = repo.backup(backup_id)
    manifest = backup.manifest
    unique = {manifest.chunks[i]: i for i in manifest.data_chunks}
    progress.start("verify", sum(manifest.chunk_length(i) for i in unique.values()))
    blocks = repo.block_map() if backup.format >= 2 else {}
    buffers = Buffers(3 * repo.workers, manifest.chunk_size)
    bad: list[str] = []
    checked = 0

    def check(index: int) -> int:
        buffer = buffers.take()
        try:
            return len(repo.fetch_chunk(backup, index, buffer, blocks))
        finally:
            buffers.give(buffer)

    with ThreadPoolExecutor(repo.workers, thread_name_prefix="verify") as pool:
        futures = [(i, pool.submit(check, i)) for i in unique.values()]
        for index, future in futures:
            try:
                checked += future.result()
            except DataLoss as exc:
                bad.append(f"chunk {index}: {exc.message}")
                log.error("chunk failed verification", extra={"chunk": index, "error": exc.message})
            progress.advance(manifest.chunk_length(index))
    progress.finish()
    if bad:
        raise DataLoss(
            f"backup {backup_id}: {len(bad)} of {len(unique)} chunks are missing or damaged "
            f"in {repo.target.description} (first: {'; '.join(bad[:2])}); restore an older "
            "backup, and make a new one"
        )
    return VerifyResult(backup, len(unique), checked)


def prune(repo: Repository, policy: RetentionPolicy, *, dry_run: bool = False) -> PruneResult:
    """Delete the manifests ``policy`` does not keep, per volume; chunks go at the next
    :func:`collect_garbage`."""
    by_volume: dict[str, list[Backup]] = {}
    for backup in repo.backups():
        by_volume.setdefault(backup.info.volume_name, []).append(backup)
    keep: set[str] = set()
    remove: list[str] = []
    for backups in by_volume.values():
        dated = [Dated(b.backup_id, b.info.created_at) for b in backups]
        chosen = kept(policy, dated)
        keep.update(chosen)
        remove.extend(b.backup_id for b in backups if b.backup_id not in chosen)
    if not dry_run:
        for backup_id in remove:
            repo.target.delete(MANIFESTS + backup_id)
        repo.target.flush()
    log.info(
        "backups pruned", extra={"kept": len(keep), "removed": len(remove), "dry_run": dry_run}
    )
    return PruneResult(tuple(sorted(keep)), tuple(sorted(remove)))
