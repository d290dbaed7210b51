"""A node's pool: one directory holding each volume as a sparse image file.

Layout under the pool root::

    images/<volume-id>.img    the volume's bytes (sparse)
    images/<volume-id>.json   its metadata: size, epoch, creation time
    state/                    the node agent's persisted stage/publish intents

Metadata is written atomically (temp file, fsync, rename) *before* the
image is created, so a crash leaves either nothing or a record that a retry
completes. Capacity is thin but never over-committed: the sum of image
sizes never exceeds the pool's capacity, so every provisioned byte can be
written.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from csi_driver.core.model import VOLUME_ID_PATTERN

log = logging.getLogger(__name__)

IMAGE_SUFFIX = ".img"
META_SUFFIX = ".json"
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


def write_json_atomic(path: Path, document: dict[str, object]) -> None:
    """Replace ``path`` with ``document`` so readers see the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(document, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """The sparse images of one node, with capacity accounting."""

    def __init__(self, root: Path, capacity_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.state_dir = self.root / "state"
        for directory in (self.root, self.images_dir, self.state_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._remove_temp_files()
        self.filesystem = _filesystem_of(self.root)
        if capacity_bytes is None:
            capacity_bytes = self._default_capacity()
        if capacity_bytes <= 0:
            raise InvalidArgument(f"pool capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes // SIZE_ALIGNMENT * SIZE_ALIGNMENT
        # Image sizes, kept current under the lock so that reservations and
        # metrics need no listing of the whole pool.
        self._sizes = {i.volume_id: i.size_bytes for i in self.images()}

    def _default_capacity(self) -> int:
        stat = os.statvfs(self.root)
        free = stat.f_bavail * stat.f_frsize
        usable = int(free * (1 - HOST_RESERVE_FRACTION))
        # Bytes images already occupy are part of the pool, not missing from it.
        return usable + sum(i.allocated_bytes for i in self.images())

    def _remove_temp_files(self) -> None:
        for stale in self.images_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    # -- paths -------------------------------------------------------------------

    def image_path(self, volume_id: str) -> Path:
        return self.images_dir / f"{_checked(volume_id)}{IMAGE_SUFFIX}"

    def _meta_path(self, volume_id: str) -> Path:
        return self.images_dir / f"{_checked(volume_id)}{META_SUFFIX}"

    # -- queries -------------------------------------------------------------------

    def get(self, volume_id: str) -> ImageInfo | None:
        meta_path = self._meta_path(volume_id)
        image = self.image_path(volume_id)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            stat = image.stat()
        except FileNotFoundError:
            return None
        return ImageInfo(
            volume_id=volume_id,
            size_bytes=stat.st_size,
            allocated_bytes=stat.st_blocks * 512,
            epoch=int(meta.get("epoch", 0)),
            path=image,
        )

    def require(self, volume_id: str) -> ImageInfo:
        info = self.get(volume_id)
        if info is None:
            raise NotFound(f"volume {volume_id} has no image in the pool at {self.images_dir}")
        return info

    def images(self) -> list[ImageInfo]:
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
        return sum(self._sizes.values())

    @property
    def image_count(self) -> int:
        return len(self._sizes)

    def status(self) -> PoolStatus:
        images = self.images()
        return PoolStatus(
            capacity_bytes=self.capacity_bytes,
            provisioned_bytes=sum(i.size_bytes for i in images),
            allocated_bytes=sum(i.allocated_bytes for i in images),
            image_count=len(images),
            filesystem=self.filesystem,
            reflink=self.filesystem in ("xfs", "btrfs"),
        )

    # -- changes -------------------------------------------------------------------

    def create_image(self, volume_id: str, size_bytes: int, epoch: int) -> ImageInfo:
        """Allocate a sparse image; a repeat with the same size returns the existing one."""
        size = _aligned(size_bytes)
        with self._lock:
            existing = self.get(volume_id)
            if existing is not None:
                if existing.size_bytes != size:
                    raise AlreadyExists(
                        f"volume {volume_id} already has a {existing.size_bytes}-byte image, "
                        f"not {size}"
                    )
                return existing
            self._reserve(size, f"create volume {volume_id}")
            write_json_atomic(
                self._meta_path(volume_id),
                {"volume_id": volume_id, "epoch": epoch, "created_at": time.time()},
            )
            image = self.image_path(volume_id)
            with open(image, "wb") as handle:
                handle.truncate(size)
                os.fsync(handle.fileno())
            os.chmod(image, 0o600)
            fsync_dir(self.images_dir)
            self._sizes[volume_id] = size
        log.info("image created", extra={"volume": volume_id, "bytes": size})
        return self.require(volume_id)

    def delete_image(self, volume_id: str) -> None:
        """Remove an image and its metadata; unknown ids are already deleted."""
        with self._lock:
            self.image_path(volume_id).unlink(missing_ok=True)
            self._meta_path(volume_id).unlink(missing_ok=True)
            fsync_dir(self.images_dir)
            self._sizes.pop(volume_id, None)
        log.info("image deleted", extra={"volume": volume_id})

    def expand_image(self, volume_id: str, size_bytes: int) -> ImageInfo:
        """Grow an image to at least ``size_bytes`` (never shrinks)."""
        size = _aligned(size_bytes)
        with self._lock:
            current = self.require(volume_id)
            if size <= current.size_bytes:
                return current
            self._reserve(size - current.size_bytes, f"expand volume {volume_id}")
            with open(current.path, "r+b") as handle:
                handle.truncate(size)
                os.fsync(handle.fileno())
            self._sizes[volume_id] = size
        log.info("image expanded", extra={"volume": volume_id, "bytes": size})
        return self.require(volume_id)

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


def _checked(volume_id: str) -> str:
    if not VOLUME_ID_PATTERN.match(volume_id):
        raise InvalidArgument(f"{volume_id!r} is not a Ferry volume id")
    return volume_id


def _aligned(size_bytes: int) -> int:
    if size_bytes <= 0:
        raise InvalidArgument(f"image size must be positive, got {size_bytes}")
    return -(-size_bytes // SIZE_ALIGNMENT) * SIZE_ALIGNMENT
