"""Ferry volumes as backup sources and restore destinations, in a node's pool.

This module reads a pool's layout (``images/<volume-id>.img`` and its
``.json``; see :mod:`csi_driver.node.pool`) without taking the pool over:
it runs beside a live node agent (``ferry backup`` / ``ferry restore`` on the
node), so it never creates, resizes or deletes images, and never touches the
agent's temporary files.

Invariants:

- A backup reads a point in time: a reflink snapshot on pools that can
  reflink (xfs, btrfs; then only chunks the target lacks are read, and
  change detection between backups costs what changed), else the image
  itself, refused while a loop device holds it (staged: it could change
  under the reader).
- A restore writes only into an image that holds no data yet (a volume just
  created for it) and that no loop device holds; the image is replaced
  whole, atomically, by the restored one, with the same size and
  provisioning, so the node agent finds a volume it made, with a filesystem
  that NodeStageVolume mounts instead of formatting. Restoring the same
  backup again into the volume it produced is a no-op.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from csi_driver.backup.repository import (
    BackupResult,
    Progress,
    Repository,
    RestoreResult,
    backup_image,
    restore_image,
)
from csi_driver.chunks.changes import ChangeTracker
from csi_driver.chunks.extents import can_reflink
from csi_driver.chunks.scan import scan_image
from csi_driver.core.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_driver.core.model import VOLUME_ID_PATTERN
from csi_driver.node.loop import LoopDevices
from csi_driver.node.pool import IMAGE_SUFFIX, META_SUFFIX
from csi_driver.node.runner import CommandRunner

log = logging.getLogger(__name__)

#: Where backups keep their reflink snapshots, per volume, under the pool root.
WORK_DIR = "backups"
_EXT_MAGIC_AT, _EXT_MAGIC = 1080, b"\x53\xef"
_XFS_MAGIC = b"XFSB"


@dataclass(frozen=True)
class PoolImage:
    volume_id: str
    path: Path
    thin: bool


def pool_image(pool_root: Path, volume_id: str) -> PoolImage:
    if not VOLUME_ID_PATTERN.match(volume_id):
        raise InvalidArgument(f"{volume_id!r} is not a Ferry volume id (vol-<32 hex>)")
    images = pool_root / "images"
    path = images / f"{volume_id}{IMAGE_SUFFIX}"
    try:
        meta = json.loads((images / f"{volume_id}{META_SUFFIX}").read_text(encoding="utf-8"))
    except FileNotFoundError:
        meta = None
    if meta is None or not path.exists():
        raise NotFound(
            f"volume {volume_id} has no image in the pool at {pool_root}; run this on the "
            "node that holds the volume (its primary)"
        )
    return PoolImage(volume_id, path, bool(meta.get("thin", True)))


def detect_fs_type(image: Path) -> str | None:
    """``ext4`` or ``xfs`` when the image holds one of Ferry's filesystems, else None."""
    with open(image, "rb") as handle:
        head = handle.read(_EXT_MAGIC_AT + len(_EXT_MAGIC))
    if head[:4] == _XFS_MAGIC:
        return "xfs"
    if head[_EXT_MAGIC_AT:] == _EXT_MAGIC:
        return "ext4"
    return None


def _in_use(image: Path) -> str | None:
    return LoopDevices(CommandRunner()).find(image)


def backup_volume(
    repo: Repository,
    pool_root: Path,
    volume_id: str,
    *,
    volume_name: str | None = None,
    progress: Progress | None = None,
) -> BackupResult:
    """Back up volume ``volume_id`` from the pool at ``pool_root`` (see the module docstring)."""
    image = pool_image(pool_root, volume_id)
    source, manifest, blocks = image.path, None, None
    if can_reflink(image.path.parent):
        work = pool_root / WORK_DIR / volume_id
        capture = ChangeTracker(image.path, work, repo.config.chunk_size).capture()
        source, manifest, blocks = capture.source, capture.manifest, capture.blocks
    elif _in_use(image.path) is not None:
        raise FailedPrecondition(
            f"volume {volume_id} is staged and the pool at {pool_root} cannot reflink, so "
            "a backup could not be a point in time; stop its pods (or unstage it), or "
            "back up a snapshot of it"
        )
    return backup_image(
        repo,
        source,
        volume_name=volume_name or volume_id,
        volume_id=volume_id,
        fs_type=detect_fs_type(source),
        manifest=manifest,
        blocks=blocks,
        progress=progress,
    )


def restore_volume(
    repo: Repository,
    backup_id: str,
    pool_root: Path,
    volume_id: str,
    *,
    progress: Progress | None = None,
) -> RestoreResult:
    """Restore ``backup_id`` into the (new, empty) image of volume ``volume_id``."""
    started = time.monotonic()
    image = pool_image(pool_root, volume_id)
    if _in_use(image.path) is not None:
        raise FailedPrecondition(
            f"volume {volume_id} is staged on this node; restore only into a volume no pod uses yet"
        )
    backup = repo.backup(backup_id)
    size = image.path.stat().st_size
    found = scan_image(image.path, backup.manifest.chunk_size).manifest
    if found.data_chunks:
        if found.chunks[: len(backup.manifest.chunks)] == backup.manifest.chunks and not any(
            found.chunks[len(backup.manifest.chunks) :]
        ):
            log.info("volume already restored", extra={"volume": volume_id, "backup": backup_id})
            return RestoreResult(backup, image.path, 0, 0, time.monotonic() - started)
        raise FailedPrecondition(
            f"volume {volume_id} already holds data; Ferry restores only into a new, empty "
            "volume (create one: `ferry restore --name`)"
        )
    return restore_image(
        repo,
        backup_id,
        image.path,
        size=size,
        reserve=not image.thin,
        replace=True,
        progress=progress,
    )
