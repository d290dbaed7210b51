"""A backup repository: the format of :mod:`.format` laid out in a :mod:`.targets` target.

Layout::

    config                     chunk size and key id, authenticated (written once)
    chunks/<nn>/<name>         a chunk object; <name> = HMAC(key, SHA-256 of its bytes)
    manifests/<backup-id>      a sealed manifest: one backup, complete
    claims/..., sweeps/...     garbage collection's safety protocol (see :mod:`.claims`)

Invariants:

- A manifest is put last, in one atomic durable put, after every chunk it
  names is durable: the target never holds a manifest naming a missing chunk
  or a half-written manifest. An interrupted backup leaves only chunks, which
  the retry reuses (it uploads what is missing) and which garbage collection
  removes if no retry comes.
- Chunks are immutable and shared: deduplicated across volumes and backups.
  A backup uploads only chunks the target lacks, so a second backup of an
  unchanged volume puts one manifest (and its claim's small objects).
- Everything read back is authenticated before use: a restore writes no byte
  that failed its chunk's check, and a manifest that fails its check is never
  restored nor trusted by garbage collection (which then refuses to run).
- A restore lands in a ``.part`` file next to its destination, renamed into
  place once complete and durable; a retry resumes it, keeping the chunks
  that already hold the right bytes.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from csi_driver import metrics
from csi_driver.backup.claims import CLAIMS, DEFAULT_GRACE_S, Claim, Sweep, read_claims
from csi_driver.backup.format import (
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
from csi_driver.backup.retention import Dated, RetentionPolicy, kept
from csi_driver.backup.targets import Target
from csi_driver.chunks.manifest import (
    DEFAULT_CHUNK_SIZE,
    Digest,
    Manifest,
    check_chunk_size,
    chunk_count,
    chunk_digest,
)
from csi_driver.chunks.scan import chunks_touching, data_ranges, read_exactly
from csi_driver.core.errors import (
    Aborted,
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
_BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


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
    chunks_uploaded: int
    bytes_uploaded: int  # every object put, compressed and encrypted, manifest included
    elapsed_s: float
    bytes_deduplicated: int = 0  # data chunks not uploaded: the target held them


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


@dataclass(frozen=True)
class GcResult:
    chunks_deleted: int
    bytes_deleted: int
    chunks_kept: int
    stale_claims_removed: int


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
    ) -> None:
        self.target = target
        self.key = key
        self.config = config
        self.grace_s = grace_s
        self.workers = workers
        self._codecs = threading.local()

    def codec(self) -> ChunkCodec:
        """This thread's codec (codecs reuse buffers, so each thread has its own)."""
        codec: ChunkCodec | None = getattr(self._codecs, "codec", None)
        if codec is None:
            codec = self._codecs.codec = ChunkCodec(self.key)
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
        return cls(target, key, config, grace_s=grace_s, workers=workers)

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

    def chunk_names(self) -> set[str]:
        return {stored.key.rsplit("/", 1)[-1] for stored in self.target.list(CHUNKS)}

    def names_of(self, manifest: Manifest) -> list[str | None]:
        return [None if d is None else self.key.chunk_name(d) for d in manifest.chunks]

    def _fetch(
        self, name: str, digest: Digest, length: int, into: bytearray | None = None
    ) -> memoryview:
        """The chunk, checked; see :meth:`ChunkCodec.open` for where it lands."""
        try:
            blob = self.target.get(chunk_key(name))
        except NotFound:
            raise DataLoss(
                f"chunk {name} is missing from {self.target.description}; the backup "
                "cannot be restored whole"
            ) from None
        return self.codec().open(name, blob, digest, length, into)


class _Buffers:
    """Chunk-sized read buffers, reused from chunk to chunk: their number bounds
    the memory a backup holds (a batch being claimed plus what is in flight)."""

    def __init__(self, count: int, size: int) -> None:
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def take(self) -> bytearray:
        return self._free.get()

    def give(self, buffer: bytearray) -> None:
        self._free.put(buffer)


@dataclass(frozen=True)
class _Read:
    """One chunk read into a pooled buffer, and its digest (None: all zeros, a hole)."""

    index: int
    buffer: bytearray
    data: memoryview
    digest: Digest | None


class _Uploader:
    """Reads, hashes, seals and stages chunks on worker threads.

    Every step of a chunk (pread, SHA-256, zstd, AES-GCM, the write) releases
    the GIL, so the workers use every core; the thread that drives them only
    claims names and decides what to upload. Reads and seals share the
    workers' queue in order, so the next batch is read and hashed while the
    last one is still being sealed; a pool of buffers bounds the memory.
    """

    def __init__(self, repo: Repository, fd: int, size: int) -> None:
        self._repo = repo
        self._fd = fd
        self._size = size
        self._pool = ThreadPoolExecutor(repo.workers, thread_name_prefix="backup-upload")
        self._inflight: deque[Future[int]] = deque()
        chunk_size = repo.config.chunk_size
        self._buffers = _Buffers(BATCH_CHUNKS + 2 * repo.workers, chunk_size)
        self._zero_digest = chunk_digest(bytes(chunk_size))
        self.chunks = 0

    def _read(self, index: int) -> _Read:
        chunk_size = self._repo.config.chunk_size
        offset = index * chunk_size
        length = min(chunk_size, self._size - offset)
        buffer = self._buffers.take()
        try:
            data = read_exactly(self._fd, buffer, offset, length)
            digest = chunk_digest(data)
        except BaseException:
            self._buffers.give(buffer)
            raise
        # Comparing digests, not bytes: the hash is paid anyway, off the GIL.
        zero = self._zero_digest if length == chunk_size else chunk_digest(bytes(length))
        return _Read(index, buffer, data, None if digest == zero else digest)

    def read(self, indexes: list[int]) -> Iterator[_Read]:
        """``indexes`` read and hashed on the workers, in order."""
        # A read abandoned after an error keeps its buffer: the pool goes with the run.
        for future in [self._pool.submit(self._read, index) for index in indexes]:
            yield future.result()

    def skip(self, read: _Read) -> None:
        self._buffers.give(read.buffer)

    def _put(self, name: str, read: _Read) -> int:
        try:
            header, sealed = self._repo.codec().seal(name, read.data)
            self._repo.target.stage(chunk_key(name), header, sealed)
            return len(read.data)
        finally:
            self._buffers.give(read.buffer)

    def submit(self, name: str, read: _Read, done: Callable[[int], None]) -> None:
        """Seal and stage ``read`` as ``name``; ``done`` is told the bytes as they land."""
        while self._inflight and self._inflight[0].done():
            done(self._inflight.popleft().result())
        self._inflight.append(self._pool.submit(self._put, name, read))
        self.chunks += 1

    def drain(self, done: Callable[[int], None]) -> None:
        while self._inflight:
            done(self._inflight.popleft().result())

    def __enter__(self) -> _Uploader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for future in self._inflight:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _read_chunks(
    fd: int, size: int, chunk_size: int, indexes: list[int]
) -> Iterator[tuple[int, bytes]]:
    for index in indexes:
        offset = index * chunk_size
        length = min(chunk_size, size - offset)
        data = os.pread(fd, length, offset)
        if len(data) < length:  # a short read: finish it the slow way
            data = bytes(read_exactly(fd, bytearray(length), offset, length))
        yield index, data


@dataclass
class _Run:
    """One backup's reading and uploading, under its claim (see :mod:`.claims`)."""

    repo: Repository
    claim: Claim
    uploader: _Uploader
    progress: Progress
    present: set[str]  # chunk names the target holds, as last listed
    bytes_read: int = 0
    bytes_deduplicated: int = 0

    def _relied_on(self, names: Iterable[str]) -> None:
        """Claim ``names`` before trusting ``present`` about them."""
        self.claim.add(names)
        if self.claim.quiet():
            self.present = self.repo.chunk_names()  # a sweep ran since the last listing

    def _upload(self, name: str, read: _Read) -> None:
        self.present.add(name)
        self.uploader.submit(name, read, self.progress.advance)

    def scan_and_upload(self, fd: int, size: int) -> Manifest:
        """Read and hash every data chunk once; upload those the target lacks."""
        chunk_size = self.repo.config.chunk_size
        indexes = sorted(chunks_touching(data_ranges(fd, size), chunk_size))
        self.progress.start("backup", sum(min(chunk_size, size - i * chunk_size) for i in indexes))
        digests: list[Digest | None] = [None] * chunk_count(size, chunk_size)
        for start in range(0, len(indexes), BATCH_CHUNKS):
            named: list[tuple[str, _Read]] = []
            for read in self.uploader.read(indexes[start : start + BATCH_CHUNKS]):
                self.bytes_read += len(read.data)
                if read.digest is None:
                    self.progress.advance(len(read.data))
                    self.uploader.skip(read)  # zeros: a hole
                    continue
                digests[read.index] = read.digest
                named.append((self.repo.key.chunk_name(read.digest), read))
            self._relied_on(name for name, _ in named)
            for name, read in named:
                if name in self.present:
                    self.progress.advance(len(read.data))
                    self.bytes_deduplicated += len(read.data)
                    self.uploader.skip(read)
                else:
                    self._upload(name, read)
        return Manifest(size, chunk_size, tuple(digests))

    def upload_missing(self, manifest: Manifest, source: Path) -> None:
        """Read only the chunks of ``manifest`` the target lacks, checking each."""
        self.progress.start("backup", manifest.data_bytes)
        names = self.repo.names_of(manifest)
        self._relied_on(name for name in names if name is not None)
        wanted = [
            i for i, name in enumerate(names) if name is not None and name not in self.present
        ]
        held = manifest.data_bytes - sum(manifest.chunk_length(i) for i in wanted)
        self.progress.advance(held)
        self.bytes_deduplicated += held
        for start in range(0, len(wanted), BATCH_CHUNKS):
            for read in self.uploader.read(wanted[start : start + BATCH_CHUNKS]):
                self.bytes_read += len(read.data)
                if read.digest != manifest.chunks[read.index]:
                    raise FailedPrecondition(
                        f"chunk {read.index} of {source} changed since its manifest was "
                        "taken; back up a snapshot, or a volume nobody writes to"
                    )
                name = names[read.index]
                assert name is not None
                if name in self.present:  # the same chunk twice in one image: once
                    self.bytes_deduplicated += len(read.data)
                    self.uploader.skip(read)
                else:
                    self._upload(name, read)


@metrics.times_failures(metrics.BackupOperation.BACKUP)
def backup_image(
    repo: Repository,
    source: Path,
    *,
    volume_name: str,
    volume_id: str = "",
    fs_type: str | None = None,
    manifest: Manifest | None = None,
    progress: Progress | None = None,
    backup_id: str | None = None,
    encrypted: bool = False,
    described: str | None = None,
) -> BackupResult:
    """Back up the image at ``source``, which must not change while this runs (a
    snapshot, or a volume nobody uses). Returns once the backup is committed.

    With ``manifest`` (the image's, e.g. from a reflink capture), only the chunks
    the target lacks are read; each is checked against the manifest as it is
    read (FailedPrecondition when the source changed). Without it, every data
    chunk is read once and hashed. ``encrypted`` (fscrypt inside the image) and
    ``described`` (the source as the operator knows it, e.g. ``snapshot:<id>``;
    default: the path) are sealed into the manifest.
    """
    started = time.monotonic()
    progress = progress or Progress()
    backup_id = check_backup_id(backup_id or new_backup_id())
    chunk_size = repo.config.chunk_size
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
    try:
        size = os.fstat(fd).st_size
        if manifest is not None and manifest.size != size:
            raise FailedPrecondition(
                f"{source} is {size} bytes but its manifest says {manifest.size}; capture again"
            )
        with (
            Claim(repo.target, backup_id, grace_s=repo.grace_s) as claim,
            _Uploader(repo, fd, size) as uploader,
        ):
            claim.quiet()
            run = _Run(repo, claim, uploader, progress, repo.chunk_names())
            if manifest is None:
                final = run.scan_and_upload(fd, size)
            else:
                run.upload_missing(manifest, source)
                final = manifest
            bytes_read, bytes_deduplicated = run.bytes_read, run.bytes_deduplicated
            uploader.drain(progress.advance)
            progress.finish()
            repo.target.flush()  # every chunk durable before the manifest names it
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
            )
            repo.target.put(MANIFESTS + backup_id, seal_manifest(repo.key, backup), durable=True)
    finally:
        os.close(fd)
    result = BackupResult(
        backup,
        bytes_read,
        uploader.chunks,
        repo.target.uploaded.bytes - uploaded_before,
        time.monotonic() - started,
        bytes_deduplicated,
    )
    metrics.observe_backup(
        result.elapsed_s,
        read_bytes=bytes_read,
        uploaded_bytes=result.bytes_uploaded,
        deduplicated_bytes=bytes_deduplicated,
    )
    log.info(
        "backup committed",
        extra={
            "backup": backup_id,
            "volume": volume_name,
            "bytes_read": bytes_read,
            "chunks_uploaded": result.chunks_uploaded,
            "bytes_uploaded": result.bytes_uploaded,
        },
    )
    return result


def _part_path(destination: Path, backup_id: str) -> Path:
    return destination.with_name(f".{destination.name}.{backup_id}.part")


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
    part = _part_path(destination, backup_id)
    names = repo.names_of(manifest)
    fetched = kept_chunks = written = 0
    with Claim(repo.target, f"restore-{uuid.uuid4().hex[:12]}", grace_s=repo.grace_s) as claim:
        claim.add(sorted({name for name in names if name is not None}))
        claim.quiet()
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
            fetched = _fetch_into(repo, fd, manifest, names, wanted, progress)
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
    fd: int,
    manifest: Manifest,
    names: list[str | None],
    wanted: tuple[int, ...],
    progress: Progress,
) -> int:
    """Fetch and check chunks ``wanted`` on worker threads, write them in order from
    this one: one writer, so the workers never wait on the file's lock, and
    reused buffers, so no chunk costs fresh pages."""
    window: deque[tuple[int, bytearray, Future[memoryview]]] = deque()
    buffers = _Buffers(3 * repo.workers, manifest.chunk_size)

    def fetch(index: int, buffer: bytearray) -> memoryview:
        name, digest = names[index], manifest.chunks[index]
        assert name is not None and digest is not None
        # In ``buffer``, or (decompressed) in bytes of its own: never in the
        # codec's buffer, which this worker reuses for its next chunk.
        return repo._fetch(name, digest, manifest.chunk_length(index), into=buffer)

    def write(index: int, buffer: bytearray, future: Future[memoryview]) -> None:
        data, offset = future.result(), manifest.span(index)[0]
        length = len(data)
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
        buffers.give(buffer)
        progress.advance(length)

    with ThreadPoolExecutor(repo.workers, thread_name_prefix="restore-fetch") as pool:
        try:
            for index in wanted:
                if len(window) >= 2 * repo.workers:
                    write(*window.popleft())
                buffer = buffers.take()
                window.append((index, buffer, pool.submit(fetch, index, buffer)))
            while window:
                write(*window.popleft())
        finally:
            for _, _, future in window:
                future.cancel()
    return len(wanted)


def verify_backup(
    repo: Repository, backup_id: str, *, progress: Progress | None = None
) -> VerifyResult:
    """Read every chunk of backup ``backup_id`` back and check it; DataLoss naming the
    bad ones (all of them, not just the first) if any fails."""
    progress = progress or Progress()
    backup = repo.backup(backup_id)
    manifest = backup.manifest
    names = repo.names_of(manifest)
    unique = {names[i]: i for i in manifest.data_chunks}
    progress.start("verify", sum(manifest.chunk_length(i) for i in unique.values()))
    bad: list[str] = []
    checked = 0

    def check(name: str, index: int) -> int:
        digest = manifest.chunks[index]
        assert digest is not None
        return len(repo._fetch(name, digest, manifest.chunk_length(index)))

    with ThreadPoolExecutor(repo.workers, thread_name_prefix="verify") as pool:
        futures = [(name, i, pool.submit(check, name, i)) for name, i in unique.items() if name]
        for name, index, future in futures:
            try:
                checked += future.result()
            except DataLoss as exc:
                bad.append(name)
                log.error("chunk failed verification", extra={"chunk": name, "error": exc.message})
            progress.advance(manifest.chunk_length(index))
    progress.finish()
    if bad:
        raise DataLoss(
            f"backup {backup_id}: {len(bad)} of {len(unique)} chunks are missing or damaged "
            f"in {repo.target.description} (first: {', '.join(bad[:4])}); restore an older "
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


def collect_garbage(
    repo: Repository,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    before_delete: Callable[[int], None] | None = None,
    keep_sweeps_s: float = 86400.0,
) -> GcResult:
    """Delete chunks no manifest and no live claim names (see :mod:`.claims`).

    ``before_delete`` is told how many chunks are about to go, once, after
    the mark and before the first deletion, while the sweep holds new
    backups back (a caller may report, or pause there).
    """
    progress = progress or Progress()
    target = repo.target
    with Sweep(target, repo.grace_s) as sweep:
        claims = read_claims(target, repo.grace_s)
        referenced = set(claims.names)
        for backup in repo.backups():  # DataLoss on a damaged manifest: delete nothing
            referenced.update(name for name in repo.names_of(backup.manifest) if name)
        garbage = []
        chunks_kept = 0
        for stored in target.list(CHUNKS):
            if stored.key.rsplit("/", 1)[-1] in referenced:
                chunks_kept += 1
            else:
                garbage.append(stored)
        if before_delete is not None:
            before_delete(len(garbage))
        deleted = deleted_bytes = 0
        progress.start("gc", sum(s.size for s in garbage))
        if not dry_run:
            for stored in garbage:
                if not sweep.fresh():
                    raise Aborted(
                        "garbage collection could not renew its sweep record in time and "
                        f"stopped after {deleted} chunks (a backup may now rely on the "
                        "others); run it again"
                    )
                target.delete(stored.key)
                deleted += 1
                deleted_bytes += stored.size
                progress.advance(stored.size)
            for op in claims.stale_ops:
                for stored in list(target.list(f"{CLAIMS}{op}/")):
                    target.delete(stored.key)
            sweep.forget_old(keep_sweeps_s)
            target.remove_leftovers(repo.grace_s)
        progress.finish()
    log.info(
        "garbage collected",
        extra={"chunks_deleted": deleted, "bytes_deleted": deleted_bytes, "dry_run": dry_run},
    )
    return GcResult(
        deleted if not dry_run else len(garbage),
        deleted_bytes if not dry_run else sum(s.size for s in garbage),
        chunks_kept,
        len(claims.stale_ops) if not dry_run else 0,
    )
