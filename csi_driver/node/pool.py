"""A node's pool: one directory holding each volume as an image file.

Layout under the pool root::

    images/<volume-id>.img    the volume's bytes
    images/<volume-id>.json   its metadata: epoch, kind (thick/thin), creation time
    state/                    the node agent's persisted stage/publish intents
    replicas/<volume-id>/     a replica's generations (chunks.generations)
    captures/<volume-id>/     a primary's point-in-time captures it exports
    preserved/<volume-id>-<t>.img  a failed-over primary's divergent image, kept
                              for the operator (never deleted by Ferry)

Metadata is written atomically (temp file, fsync, rename) *before* the
image, and the image is built under a temporary name and renamed into place
once its space is settled, so a crash leaves either nothing, a record that a
retry completes, or a temporary file removed at the next start. A new image
writes and fsyncs both temporary files first, then renames the metadata and
the image (in that order, in one directory) and fsyncs the directory once;
concurrent creates share that directory fsync (:class:`DirectorySync`). An
image is acknowledged only after it. Should a filesystem ever persist the
second rename without the first, the image reads as absent (no metadata)
and the create's retry writes it again.

The pool keeps each image's size, epoch and kind in memory (it is their
only writer), so a lookup or a scan of the pool costs one ``stat`` per image
and reads no metadata file.

An image created *ahead* of its records (:meth:`Pool.create_ahead`: the
all-in-one writes the volume's records and its READY status in one catalog
transaction once the image is durable) is written straight to
``<volume-id>.json.ahead`` and ``<volume-id>.img.ahead``, invisible to
lookups and scans, with no fsync of its own: one ``syncfs(2)`` shared by
every create under way makes them durable (what it costs instead of three
fsyncs each: they need no order among them, since nothing reads them before
the transaction that follows that syncfs; the price: it also writes back
whatever else is dirty on the pool's filesystem, such as a replica being
pulled, and a create then waits for that). Once the transaction is committed
:meth:`Pool.keep_ahead` renames both into place (the image first, the
metadata last); if it provably failed, :meth:`Pool.drop_ahead` removes them.
A transaction whose outcome is unknown (etcd's answer lost: it may still
apply) leaves them in place, their space still reserved
(:meth:`Pool.leave_ahead`), and so does a crash anywhere in between: the
node settles them by the catalog once it answers: the volume's image spec
is there (the transaction was committed, so they were durable) or not, and
then, once a write has made that transaction impossible, they are removed
whatever they hold (:func:`csi_driver.node.reconcile.images.settle_left`).
Until then they are :meth:`Pool.unsettled`.

Capacity is never over-committed: the sum of image sizes never exceeds the
pool's capacity. A thick image (the default) also holds its bytes on the
pool's filesystem: they are reserved with ``fallocate(2)`` mode 0 when the
image is created or grown, as unwritten extents, so no zeros are written and
the volume can be filled to its size even after something else fills the
filesystem. A thin image allocates on first write; :meth:`Pool.shortfall`
says when the filesystem can no longer back what thin images may still
write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FerryError,
    InternalError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from csi_driver.core.model import VOLUME_ID_PATTERN

log = logging.getLogger(__name__)

IMAGE_SUFFIX = ".img"
META_SUFFIX = ".json"
#: Appended to an image's two files while it is created ahead of its records.
AHEAD_SUFFIX = ".ahead"
#: Image sizes are whole multiples of this (loop devices want 512-byte sectors;
#: whole MiB keeps filesystems and accounting simple).
SIZE_ALIGNMENT = 1024 * 1024
# Without a configured capacity, keep this share of the filesystem's free space
# out of the pool so the host itself never runs out.
HOST_RESERVE_FRACTION = 0.05


@dataclass(frozen=True)
class ImageInfo:
    volume_id: str
    size_bytes: int
    allocated_bytes: int
    epoch: int
    path: Path
    thin: bool

    @property
    def unallocated_bytes(self) -> int:
        """Bytes the image may still claim from the pool's filesystem when written."""
        return max(0, self.size_bytes - self.allocated_bytes)


@dataclass(frozen=True)
class PoolStatus:
    capacity_bytes: int
    provisioned_bytes: int
    allocated_bytes: int
    image_count: int
    filesystem: str
    reflink: bool

    @property
    def available_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.provisioned_bytes)


def _write_json(path: Path, document: dict[str, object], *, named: Path, sync: bool) -> None:
    """Write ``document`` to ``path``, fsync'd if ``sync`` (``named``: the file it
    will become, for the message of a full filesystem)."""
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(document, handle, sort_keys=True)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(
                f"cannot record {named.name}: the filesystem holding {named.parent} is full; "
                "free space on it and retry"
            ) from exc
        raise


def write_json_atomic(path: Path, document: dict[str, object]) -> None:
    """Replace ``path`` with ``document`` so readers see the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_json_durably(tmp, path, document)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_durably(tmp: Path, path: Path, document: dict[str, object]) -> None:
    """Write ``document`` to ``tmp`` and fsync it (``path``: what it will become)."""
    _write_json(tmp, document, named=path, sync=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySync:
    """fsync of one directory, shared by the threads that need it at once.

    A caller's changes to the directory (renames, unlinks) are durable once
    an fsync that *started* after them has finished: a caller that finds an
    fsync running waits for the next one, which also serves everyone who
    arrived meanwhile, so N concurrent creates cost about two fsyncs, not N.
    """

    def __init__(self, path: Path, flush: Callable[[Path], None] | None = None) -> None:
        """``flush``: what makes the changes durable (default: an fsync of ``path``)."""
        self._path = path
        self._flush = flush or fsync_dir
        self._changed = threading.Condition()
        self._next = 1  # the number the next fsync to start will have
        self._done = 0  # the last fsync finished
        self._running = False

    def sync(self) -> None:
        """Return once this caller's earlier changes to the directory are durable."""
        with self._changed:
            mine = self._next
            while self._done < mine:
                if self._running:
                    self._changed.wait()
                    continue
                self._running = True
                number = self._next
                self._next += 1
                self._changed.release()
                try:
                    self._flush(self._path)
                finally:
                    self._changed.acquire()
                    self._running = False
                    self._changed.notify_all()
                self._done = number


def _libc_syncfs() -> Callable[[int], int]:
    call = ctypes.CDLL(None, use_errno=True).syncfs
    call.argtypes = (ctypes.c_int,)
    call.restype = ctypes.c_int
    return call


_SYNCFS = _libc_syncfs()


def syncfs(path: Path) -> None:
    """syncfs(2): every change on the filesystem holding ``path`` made durable
    (files' data and metadata, directory entries), in one journal commit."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "fallocate64", None) or libc.fallocate
    call.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    call.restype = ctypes.c_int
    return call


# fallocate(2) itself, not os.posix_fallocate: glibc's posix_fallocate writes
# zeros, block by block, wherever the filesystem cannot preallocate — slow
# for a large image, and wrong for a reservation Ferry must be able to
# refuse. Mode 0 either reserves the range as unwritten extents (reading as
# zeros, nothing written) or fails with an errno Ferry maps to a domain error.
# A syscall on the descriptor Ferry just opened, so no external command.
_FALLOCATE = _libc_fallocate()


def preallocate(fd: int, offset: int, length: int, what: str) -> None:
    """Reserve ``length`` bytes at ``offset`` of ``fd`` (growing the file) without writing."""
    if _FALLOCATE(fd, 0, offset, length) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.ENOSPC:
        raise ResourceExhausted(
            f"cannot {what}: the pool's filesystem has no room left to reserve "
            f"{length} bytes (something besides Ferry uses it); free space on it"
        )
    if code in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise FailedPrecondition(
            f"cannot {what}: the pool's filesystem cannot reserve space (fallocate is "
            "unsupported); put the pool on ext4, xfs or btrfs, or use a StorageClass "
            "with provisioning: thin and accept its risk"
        )
    raise InternalError(f"cannot {what}: fallocate failed: {os.strerror(code)}")


_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``length`` bytes at ``offset`` of ``fd`` so they read as zeros."""
    if _FALLOCATE(fd, _PUNCH_HOLE, offset, length) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise FailedPrecondition(
            "cannot punch holes on this filesystem (fallocate PUNCH_HOLE is unsupported); "
            "keep pools and replicas on ext4, xfs or btrfs"
        )
    raise InternalError(f"punching a hole at {offset}+{length} failed: {os.strerror(code)}")


def _filesystem_of(path: Path) -> str:
    """The filesystem type mounted at (or above) ``path``, from /proc/self/mounts."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            mountpoint = fields[1].replace("\\040", " ")
            inside = resolved == mountpoint or resolved.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best):
                best, kind = mountpoint, fields[2]
    return kind


class Pool:
    """The images of one node, with capacity accounting."""

    def __init__(self, root: Path, capacity_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.state_dir = self.root / "state"
        self.replicas_dir = self.root / "replicas"
        self.captures_dir = self.root / "captures"
        self.preserved_dir = self.root / "preserved"
        for directory in (
            self.root,
            self.preserved_dir,
            self.images_dir,
            self.state_dir,
            self.replicas_dir,
            self.captures_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        # Signalled when a create that runs outside the lock ends (see _creating).
        self._created = threading.Condition(self._lock)
        self._creating: set[str] = set()
        self._directory = DirectorySync(self.images_dir)
        # Images created ahead need no order among their writes (nothing sees them
        # before their txn, which waits for this): one syncfs serves every create
        # under way, in place of three fsyncs each.
        self._ahead_sync = DirectorySync(self.images_dir, flush=syncfs)
        # What create_ahead made, until kept or dropped (keep_ahead reads nothing back).
        self._made_ahead: dict[str, ImageInfo] = {}
        # Images created ahead, not being made now, whose txn is undecided: a crash's
        # leftovers (found here) and those whose txn's answer was lost (leave_ahead).
        self._unsettled: set[str] = set()
        # Each image's epoch and kind, as its metadata file says (the pool writes it).
        self._kinds: dict[str, tuple[int, bool]] = {}
        # Each image as a scan last found it (see images(restat=...)); the pool
        # drops an image's entry, under its lock, whenever it changes that image.
        self._stats: dict[str, ImageInfo] = {}
        self._remove_temp_files()
        self.filesystem = _filesystem_of(self.root)
        if capacity_bytes is None:
            capacity_bytes = self._default_capacity()
        if capacity_bytes <= 0:
            raise InvalidArgument(f"pool capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes // SIZE_ALIGNMENT * SIZE_ALIGNMENT
        # Image sizes, kept current under the lock so that reservations and
        # metrics need no listing of the whole pool.
        found = self._scan()
        self._sizes = _Sizes({i.volume_id: i.size_bytes for i in found})
        self._kinds = {i.volume_id: (i.epoch, i.thin) for i in found}
        self._unsettled = set(self.ahead())

    def _default_capacity(self) -> int:
        stat = os.statvfs(self.root)
        free = stat.f_bavail * stat.f_frsize
        usable = int(free * (1 - HOST_RESERVE_FRACTION))
        # Bytes images already occupy are part of the pool, not missing from it.
        return usable + sum(i.allocated_bytes for i in self._scan())

    def _remove_temp_files(self) -> None:
        for stale in self.images_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    # -- paths -------------------------------------------------------------------

    def image_path(self, volume_id: str) -> Path:
        return self.images_dir / f"{_checked(volume_id)}{IMAGE_SUFFIX}"

    def _meta_path(self, volume_id: str) -> Path:
        return self.images_dir / f"{_checked(volume_id)}{META_SUFFIX}"

    def _ahead_paths(self, volume_id: str) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
        """(ahead, final) for the image, then for its metadata (the marker)."""
        image, meta = self.image_path(volume_id), self._meta_path(volume_id)
        return (
            (image.with_name(image.name + AHEAD_SUFFIX), image),
            (meta.with_name(meta.name + AHEAD_SUFFIX), meta),
        )

    # -- queries -------------------------------------------------------------------

    def get(self, volume_id: str) -> ImageInfo | None:
        image = self.image_path(volume_id)
        kind = self._kinds.get(volume_id)
        try:
            # The image first: a create asks about a volume that has none (one failed
            # stat, not a metadata file's open and an exception through json).
            stat = os.stat(image)
            if kind is None:
                kind = self._read_kind(volume_id)
        except FileNotFoundError:
            return None
        return ImageInfo(
            volume_id=volume_id,
            size_bytes=stat.st_size,
            allocated_bytes=stat.st_blocks * 512,
            epoch=kind[0],
            path=image,
            thin=kind[1],
        )

    def _read_kind(self, volume_id: str, path: Path | None = None) -> tuple[int, bool]:
        """The image's epoch and kind from its metadata file (``path``: that file)."""
        meta = json.loads((path or self._meta_path(volume_id)).read_text(encoding="utf-8"))
        # Images made before thick provisioning existed were sparse.
        return int(meta.get("epoch", 0)), bool(meta.get("thin", True))

    def require(self, volume_id: str) -> ImageInfo:
        info = self.get(volume_id)
        if info is None:
            raise NotFound(f"volume {volume_id} has no image in the pool at {self.images_dir}")
        return info

    def images(self, *, restat: Collection[str] | None = None) -> list[ImageInfo]:
        """Every image in the pool, in volume id order.

        ``restat``: the only images that may have changed since the last scan
        without the pool knowing (those attached to a loop device, written
        through it); every other image is as that scan found it, unless the
        pool changed it since (it then takes a ``stat`` again). A periodic
        scan of a big pool then costs what is in use, not what exists.
        None: a ``stat`` each.
        """
        found = []
        for volume_id in sorted(self._kinds):
            info = None
            if restat is not None and volume_id not in restat:
                info = self._stats.get(volume_id)
            if info is None:
                info = self._stat(volume_id)
            if info is not None:
                found.append(info)
        return found

    def _stat(self, volume_id: str) -> ImageInfo | None:
        # Under the lock: a change of the image by the pool is either before this
        # stat (which sees it) or after it (and drops what it stored).
        with self._lock:
            info = self.get(volume_id)
            if info is None:
                self._stats.pop(volume_id, None)
            else:
                self._stats[volume_id] = info
        return info

    def _changed(self, volume_id: str) -> None:
        """The pool changed ``volume_id``'s image (call under the lock): scan it again."""
        self._stats.pop(volume_id, None)

    def written(self, volume_id: str) -> None:
        """``volume_id``'s image was written outside the pool (through a loop device now
        detached): the next scan takes a ``stat`` of it again."""
        with self._lock:
            self._changed(volume_id)

    def _scan(self) -> list[ImageInfo]:
        """The images on disk, metadata read from each file (at start)."""
        found = []
        for meta in sorted(self.images_dir.glob(f"vol-*{META_SUFFIX}")):
            volume_id = meta.name.removesuffix(META_SUFFIX)
            if VOLUME_ID_PATTERN.match(volume_id):
                info = self.get(volume_id)
                if info is not None:
                    found.append(info)
        return found

    @property
    def provisioned_bytes(self) -> int:
        return self._sizes.total

    @property
    def image_count(self) -> int:
        return len(self._sizes)

    def status(self, images: Sequence[ImageInfo] | None = None) -> PoolStatus:
        """``images``: a scan of the pool just taken (else one is taken)."""
        images = self.images() if images is None else images
        return PoolStatus(
            capacity_bytes=self.capacity_bytes,
            provisioned_bytes=sum(i.size_bytes for i in images),
            allocated_bytes=sum(i.allocated_bytes for i in images),
            image_count=len(images),
            filesystem=self.filesystem,
            reflink=self.filesystem in ("xfs", "btrfs"),
        )

    # -- changes -------------------------------------------------------------------

    def create_image(
        self, volume_id: str, size_bytes: int, epoch: int, *, thin: bool = False
    ) -> ImageInfo:
        """Allocate an image (its space reserved unless ``thin``); a repeat with the
        same size and kind returns the existing one.

        The space is reserved under the pool's lock; the files are written
        outside it, so creates of different volumes overlap (and share their
        directory fsync), while a second create of the same volume waits.
        """
        size = _aligned(size_bytes)
        kind = "thin" if thin else "thick"
        existing = self._reserve_new(volume_id, size, thin)
        if existing is not None:
            return existing
        created = False
        try:
            info = self._write_new(volume_id, size, epoch, thin)
            created = True
        finally:
            with self._created:
                self._creating.discard(volume_id)
                if created:
                    self._kinds[volume_id] = (epoch, thin)
                else:
                    self._sizes.pop(volume_id, None)
                self._changed(volume_id)
                self._created.notify_all()
        log.info("image created", extra={"volume": volume_id, "bytes": size, "kind": kind})
        return info

    def _reserve_new(self, volume_id: str, size: int, thin: bool) -> ImageInfo | None:
        """Reserve ``size`` for a new image and mark it being created; the image
        already there instead, if it is of this size and kind."""
        with self._created:
            while volume_id in self._creating:
                self._created.wait()
            existing = self.get(volume_id)
            if existing is not None:
                if existing.size_bytes != size or existing.thin != thin:
                    raise AlreadyExists(
                        f"volume {volume_id} already has a {existing.size_bytes}-byte "
                        f"{'thin' if existing.thin else 'thick'} image, not a {size}-byte "
                        f"{'thin' if thin else 'thick'} one"
                    )
                return existing
            self._reserve(size, f"create volume {volume_id}")
            self._sizes[volume_id] = size  # reserved while its files are written
            self._creating.add(volume_id)
        return None

    # -- images created ahead of their records ---------------------------------

    def create_ahead(
        self, volume_id: str, size_bytes: int, epoch: int, *, thin: bool = False
    ) -> ImageInfo:
        """A new image, durable but invisible, its space reserved, until
        :meth:`keep_ahead` or :meth:`drop_ahead` (see the module docstring).

        Raises AlreadyExists when the volume has an image already.
        """
        size = _aligned(size_bytes)
        if self._reserve_new(volume_id, size, thin) is not None:
            raise AlreadyExists(f"volume {volume_id} already has an image")
        (image, _), (meta, _) = self._ahead_paths(volume_id)
        try:
            # Written in place, no fsync each: until the txn that follows the shared
            # syncfs is committed, a crash's leftovers are removed whatever they hold.
            _write_json(meta, _metadata(volume_id, epoch, thin), named=meta, sync=False)
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                if thin:
                    os.ftruncate(fd, size)
                else:
                    preallocate(fd, 0, size, f"create volume {volume_id}")
                allocated = os.fstat(fd).st_blocks * 512
            finally:
                os.close(fd)
            self._ahead_sync.sync()
        except BaseException:
            self.drop_ahead(volume_id)
            raise
        made = ImageInfo(volume_id, size, allocated, epoch, self.image_path(volume_id), thin)
        with self._lock:
            self._made_ahead[volume_id] = made
        return made

    def keep_ahead(self, volume_id: str) -> ImageInfo:
        """The image created ahead becomes the volume's (its records are committed).

        Idempotent, and works on what a crash left (one file renamed, or none).
        No fsync: a crash that undoes a rename leaves the marker for the next
        start to settle again.
        """
        (image_ahead, image), (meta_ahead, meta) = self._ahead_paths(volume_id)
        with self._lock:
            made = self._made_ahead.pop(volume_id, None)
        if made is None:  # a crash's leftover: what it is, its metadata says
            kind = self._read_kind(volume_id, meta_ahead if meta_ahead.exists() else meta)
        else:
            kind = (made.epoch, made.thin)
        try:
            for ahead, final in ((image_ahead, image), (meta_ahead, meta)):
                with contextlib.suppress(FileNotFoundError):  # renamed before a crash
                    os.replace(ahead, final)
        except BaseException:
            # Not in place: no longer being made either, so that a reconcile of its
            # spec (which exists) keeps it (:meth:`kept_ahead`) instead of calling it lost.
            self._end_ahead(volume_id, kept=None)
            raise
        self._end_ahead(volume_id, kept=kind)
        log.info("image created ahead kept", extra={"volume": volume_id})
        return made or self.require(volume_id)

    def kept_ahead(self, volume_id: str) -> ImageInfo | None:
        """The image left created ahead for ``volume_id`` (not being made now), kept:
        for a caller that holds the volume's spec, which proves the txn committed.
        None when there is none."""
        (image_ahead, _), (meta_ahead, _) = self._ahead_paths(volume_id)
        if volume_id in self._creating or not (image_ahead.exists() or meta_ahead.exists()):
            return None
        return self.keep_ahead(volume_id)

    def leave_ahead(self, volume_id: str) -> None:
        """The txn of the image created ahead may or may not be committed (its answer
        was lost): its files stay, and its space stays reserved, no longer being made,
        until :meth:`keep_ahead` or :meth:`drop_ahead` settles it (see the module doc)."""
        with self._created:
            self._unsettled.add(volume_id)
            self._creating.discard(volume_id)
            self._created.notify_all()
        log.warning(
            "image created ahead left for settling: its records' commit is undecided",
            extra={"volume": volume_id},
        )

    def unsettled(self, volume_id: str) -> bool:
        """True while an image created ahead for ``volume_id`` awaits settling: left by
        an undecided txn or by a crash (not one being made now)."""
        return volume_id in self._unsettled

    def drop_ahead(self, volume_id: str) -> None:
        """Remove the image created ahead (its records were never committed)."""
        (image_ahead, _), (meta_ahead, _) = self._ahead_paths(volume_id)
        image_ahead.unlink(missing_ok=True)
        meta_ahead.unlink(missing_ok=True)
        self._directory.sync()  # its space is free again once the unlinks are durable
        self._end_ahead(volume_id, kept=None)
        log.info("image created ahead dropped", extra={"volume": volume_id})

    def _end_ahead(self, volume_id: str, kept: tuple[int, bool] | None) -> None:
        with self._created:
            self._made_ahead.pop(volume_id, None)
            self._unsettled.discard(volume_id)
            if kept is None:
                self._sizes.pop(volume_id, None)
            else:
                self._kinds[volume_id] = kept
                if volume_id not in self._creating:  # settled at start: not reserved yet
                    info = self.get(volume_id)
                    if info is not None:
                        self._sizes[volume_id] = info.size_bytes
            self._creating.discard(volume_id)
            self._changed(volume_id)
            self._created.notify_all()

    def ahead(self) -> list[str]:
        """The volumes whose image a process created ahead of its records and left
        unsettled (it crashed); those being created now are not listed."""
        found = set()
        for suffix in (META_SUFFIX, IMAGE_SUFFIX):
            marker = f"{suffix}{AHEAD_SUFFIX}"
            for path in self.images_dir.glob(f"vol-*{marker}"):
                volume_id = path.name.removesuffix(marker)
                if VOLUME_ID_PATTERN.match(volume_id) and volume_id not in self._creating:
                    found.add(volume_id)
        return sorted(found)

    def _write_new(self, volume_id: str, size: int, epoch: int, thin: bool) -> ImageInfo:
        """Write a new image and its metadata durably (see the module docstring)."""
        meta, image = self._meta_path(volume_id), self.image_path(volume_id)
        meta_tmp = meta.with_name(f".{meta.name}.tmp")
        image_tmp = image.with_name(f".{image.name}.tmp")
        renamed: list[Path] = []
        try:
            fd = os.open(image_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                if thin:
                    os.ftruncate(fd, size)
                else:
                    preallocate(fd, 0, size, f"create volume {volume_id}")
                write_json_durably(meta_tmp, meta, _metadata(volume_id, epoch, thin))
                os.fsync(fd)  # after the metadata's: one journal commit serves both
                allocated = os.fstat(fd).st_blocks * 512
            finally:
                os.close(fd)
            for tmp, final in ((meta_tmp, meta), (image_tmp, image)):
                os.replace(tmp, final)
                renamed.append(final)
            self._directory.sync()
        except BaseException:
            for path in (meta_tmp, image_tmp, *renamed):
                path.unlink(missing_ok=True)
            if renamed:
                self._directory.sync()
            raise
        return ImageInfo(volume_id, size, allocated, epoch, image, thin)

    def create_image_from(
        self,
        volume_id: str,
        size_bytes: int,
        epoch: int,
        fill: Callable[[Path], None],
        *,
        thin: bool = False,
    ) -> ImageInfo:
        """An image whose first bytes ``fill(path)`` writes (a clone or a restore),
        grown to ``size_bytes``; a repeat returns the existing image.

        ``fill`` builds a temporary file that is renamed into place only once
        it is whole, so an image of this volume is either absent or complete.
        Unless ``thin``, every block the filled file leaves unallocated (its
        growth, a copied source's holes) is reserved like a new image's; the
        blocks it shares with a snapshot by reflink are allocated, but an
        overwrite of one needs a new block (copy on write), which the pool's
        filesystem must find then.
        """
        size = _aligned(size_bytes)
        with self._lock:
            existing = self.get(volume_id)
            if existing is not None:
                return existing
            self._reserve(size, f"create volume {volume_id}")
            meta = self._record(volume_id, epoch, thin)
            self._sizes[volume_id] = size  # reserved while filling, outside the lock
        image = self.image_path(volume_id)
        tmp = image.with_name(f".{image.name}.tmp")
        try:
            fill(tmp)
            self._fit(tmp, volume_id, size, thin)
            os.replace(tmp, image)
            self._directory.sync()
        except BaseException:
            with self._lock:
                tmp.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                fsync_dir(self.images_dir)
                self._sizes.pop(volume_id, None)
                self._changed(volume_id)
            raise
        with self._lock:
            self._kinds[volume_id] = (epoch, thin)
            self._changed(volume_id)
        log.info("image created from a source", extra={"volume": volume_id, "bytes": size})
        return self.require(volume_id)

    def _record(self, volume_id: str, epoch: int, thin: bool) -> Path:
        """Write the image's metadata (before its bytes: see the module docstring)."""
        meta = self._meta_path(volume_id)
        write_json_atomic(meta, _metadata(volume_id, epoch, thin))
        return meta

    @staticmethod
    def _fit(path: Path, volume_id: str, size: int, thin: bool) -> None:
        """Grow a filled image to ``size``; unless ``thin``, reserve every block it does
        not hold yet (a copy keeps its source's holes), as :meth:`keep_reserved` does."""
        filled = path.stat().st_size
        if filled > size:
            raise OutOfRange(
                f"volume {volume_id}'s source holds {filled} bytes, more than its "
                f"{size}-byte size; ask for at least the source's size"
            )
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if thin:
                os.ftruncate(fd, size)
            else:
                preallocate(fd, 0, size, f"create volume {volume_id}")
            os.fsync(fd)
        finally:
            os.close(fd)

    def adopt_image(self, volume_id: str, source: Path, epoch: int, *, thin: bool) -> ImageInfo:
        """Make the file at ``source`` (on the pool's filesystem) the volume's image.

        A replica promoted to primary: its verified generation becomes the pool
        image by one rename, never a copy. The metadata is written first, so a
        crash between the two leaves a record whose image is still at ``source``
        for the promotion to rename again.
        """
        with self._lock:
            if self.get(volume_id) is not None:
                raise AlreadyExists(f"volume {volume_id} already has an image in the pool")
            size = source.stat().st_size
            self._reserve(size, f"promote volume {volume_id}'s replica")
            write_json_atomic(self._meta_path(volume_id), _metadata(volume_id, epoch, thin))
            os.rename(source, self.image_path(volume_id))
            fsync_dir(self.images_dir)
            fsync_dir(source.parent)
            self._sizes[volume_id] = size
            self._kinds[volume_id] = (epoch, thin)
            self._changed(volume_id)
        log.info("image adopted", extra={"volume": volume_id, "bytes": size, "epoch": epoch})
        return self.require(volume_id)

    def release_image(self, volume_id: str, destination: Path) -> None:
        """Move the volume's image out of the pool to ``destination`` (same filesystem):
        a demoted primary's image becomes its replica's first generation."""
        with self._lock:
            os.rename(self.image_path(volume_id), destination)
            fsync_dir(destination.parent)
            self._meta_path(volume_id).unlink(missing_ok=True)
            fsync_dir(self.images_dir)
            self._sizes.pop(volume_id, None)
            self._kinds.pop(volume_id, None)
            self._changed(volume_id)
        log.info("image released from the pool", extra={"volume": volume_id})

    def delete_image(self, volume_id: str) -> None:
        """Remove an image and its metadata; unknown ids are already deleted."""
        with self._created:
            while volume_id in self._creating:
                self._created.wait()
            image = self.image_path(volume_id)
            image.unlink(missing_ok=True)
            self._meta_path(volume_id).unlink(missing_ok=True)
            # An interrupted `ferry restore` into the volume waits beside its image
            # (backup/repository.py part_path) for a retry that cannot come now.
            for part in self.images_dir.glob(f".{image.name}.*.part"):
                part.unlink(missing_ok=True)
            self._sizes.pop(volume_id, None)
            self._kinds.pop(volume_id, None)
            self._changed(volume_id)
        self._directory.sync()
        log.info("image deleted", extra={"volume": volume_id})

    def expand_image(self, volume_id: str, size_bytes: int) -> ImageInfo:
        """Grow an image to at least ``size_bytes`` (never shrinks); a thick image's
        new range is reserved like its first bytes were."""
        size = _aligned(size_bytes)
        with self._lock:
            current = self.require(volume_id)
            if size <= current.size_bytes:
                return current
            self._reserve(size - current.size_bytes, f"expand volume {volume_id}")
            fd = os.open(current.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if current.thin:
                    os.ftruncate(fd, size)
                else:
                    self._grow_reserved(fd, current, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sizes[volume_id] = size
            self._changed(volume_id)
        log.info("image expanded", extra={"volume": volume_id, "bytes": size})
        return self.require(volume_id)

    def _grow_reserved(self, fd: int, current: ImageInfo, size: int) -> None:
        growth = size - current.size_bytes
        try:
            preallocate(fd, current.size_bytes, growth, f"expand volume {current.volume_id}")
        except BaseException:
            # A failed fallocate may have reserved part of the range. Nothing
            # beyond the old size holds data: the loop device is still the old
            # size, so cutting back releases the space and loses nothing.
            os.ftruncate(fd, current.size_bytes)
            raise

    def keep_reserved(self, images: Sequence[ImageInfo] | None = None) -> list[str]:
        """Reserve again the blocks thick images lost; return the volumes that needed it.

        A loop device turns its filesystem's discard and "write zeroes"
        requests into holes punched in the image (ext4 zeroes small extents
        that way), so a thick image can lose part of its reservation while in
        use. fallocate mode 0 over the image allocates only the holes, as
        unwritten extents that read as zeros, which is what the punched ranges
        read as: data is untouched. Called periodically by the node service.

        ``images``: a scan just taken (else one is taken); an image deleted
        since is skipped.
        """
        restored = []
        scanned = self.images() if images is None else images
        with self._lock:
            for image in scanned:
                if image.thin or not image.unallocated_bytes:
                    continue
                if self._kinds.get(image.volume_id) != (image.epoch, image.thin):
                    continue  # deleted (or replaced) since the scan
                fd = os.open(image.path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    what = f"keep volume {image.volume_id}'s space reserved"
                    preallocate(fd, 0, image.size_bytes, what)
                    restored.append(image.volume_id)
                    self._changed(image.volume_id)
                except FerryError as exc:
                    log.warning(
                        "thick image lost part of its reservation",
                        extra={"volume": image.volume_id, "error": exc.message},
                    )
                finally:
                    os.close(fd)
        if restored:
            log.info("thick images reserved again", extra={"volumes": restored})
        return restored

    def shortfall(self, images: Sequence[ImageInfo] | None = None) -> int:
        """Bytes the pool's filesystem lacks to back every image fully; 0 when it can.

        Thick images hold all their bytes already, so this is what thin images
        (or a thick one whose blocks were punched out by discard) may still
        need beyond the filesystem's free space. Positive means a write to
        such an image can fail with an I/O error.
        """
        wanted = sum(i.unallocated_bytes for i in (self.images() if images is None else images))
        if not wanted:
            return 0
        stat = os.statvfs(self.root)
        return max(0, wanted - stat.f_bavail * stat.f_frsize)

    def _reserve(self, extra_bytes: int, what: str) -> None:
        if extra_bytes > self.capacity_bytes:
            raise OutOfRange(
                f"cannot {what}: {extra_bytes} bytes exceeds the whole pool "
                f"({self.capacity_bytes} bytes)"
            )
        provisioned = self.provisioned_bytes
        if provisioned + extra_bytes > self.capacity_bytes:
            raise ResourceExhausted(
                f"cannot {what}: pool has {self.capacity_bytes - provisioned} bytes free, "
                f"{extra_bytes} needed; delete volumes or grow the pool"
            )


class _Sizes:
    """Each image's size and their sum, kept as they change: a create checks the
    pool's room and reports it without summing every image (10,000 of them)."""

    __slots__ = ("_by_volume", "total")

    def __init__(self, sizes: dict[str, int]) -> None:
        self._by_volume = sizes
        self.total = sum(sizes.values())

    def __setitem__(self, volume_id: str, size: int) -> None:
        self.total += size - self._by_volume.get(volume_id, 0)
        self._by_volume[volume_id] = size

    def pop(self, volume_id: str, default: int | None = None) -> int | None:
        size = self._by_volume.pop(volume_id, None)
        if size is None:
            return default
        self.total -= size
        return size

    def get(self, volume_id: str) -> int | None:
        return self._by_volume.get(volume_id)

    def __contains__(self, volume_id: object) -> bool:
        return volume_id in self._by_volume

    def __len__(self) -> int:
        return len(self._by_volume)


def _metadata(volume_id: str, epoch: int, thin: bool) -> dict[str, object]:
    return {"volume_id": volume_id, "epoch": epoch, "thin": thin, "created_at": time.time()}


def _checked(volume_id: str) -> str:
    if not VOLUME_ID_PATTERN.match(volume_id):
        raise InvalidArgument(f"{volume_id!r} is not a Ferry volume id")
    return volume_id


def _aligned(size_bytes: int) -> int:
    if size_bytes <= 0:
        raise InvalidArgument(f"image size must be positive, got {size_bytes}")
    return -(-size_bytes // SIZE_ALIGNMENT) * SIZE_ALIGNMENT
