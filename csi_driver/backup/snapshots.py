"""Snapshots that are backups: a VolumeSnapshotClass with ``backup: "true"``.

The node that takes such a snapshot ships it into the cluster's backup
target (the chart's ``backup:`` block, passed to the node as
``$FERRY_BACKUP_*``) before it reports the snapshot READY; a node or a fresh
installation that never held the snapshot restores it from there.

Naming, so that another installation finds a snapshot's backup:

- The backup id is derived from the snapshot (its creation time and the
  first 8 hex digits of its id): a node that crashed after committing the
  backup but before reporting it finds the committed manifest on retry and
  ships nothing twice.
- The backup's ``volume_name`` is the source volume's name (the PV name), so
  ``ferry backup list --volume <pv>`` and retention group it with the
  volume's other backups; its ``source`` says ``snapshot:<id>``.
- Its CSI handle in any installation is ``backup-<backup id>``: a statically
  provisioned VolumeSnapshotContent with that ``snapshotHandle`` restores it
  through CreateVolume. Ferry never deletes a backup for DeleteSnapshot:
  backups outlive the snapshot (and the cluster); ``ferry backup prune``
  retires them.

Invariants: a snapshot is READY with a backup id only once that backup's
manifest is committed in the target; a restore from the backup writes only
bytes that passed their chunk's authentication and hash.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from csi_driver.backup.format import Backup
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import Progress, Repository, backup_image, restore_image
from csi_driver.backup.targets import open_target
from csi_driver.core.errors import InvalidArgument, NotFound

#: The CSI snapshot handle of a backup, in any installation: ``backup-<backup id>``.
BACKUP_HANDLE_PREFIX = "backup-"
BACKUP_HANDLE_PATTERN = re.compile(r"^backup-(\d{8}T\d{6}Z-[0-9a-f]{8})$")
#: How a backup made from a snapshot names its source (``BackupInfo.source``).
SNAPSHOT_SOURCE_PREFIX = "snapshot:"

NOT_CONFIGURED = (
    "node {node_id} has no backup target, so it cannot {what}: set the chart's backup.target "
    "and backup.keySecret (FERRY_BACKUP_TARGET and FERRY_BACKUP_KEY_FILE on the node)"
)


def snapshot_backup_id(snapshot_id: str, created_at: float) -> str:
    """The id of the backup of snapshot ``snapshot_id`` (``snap-<32 hex>``)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created_at))
    return f"{stamp}-{snapshot_id.removeprefix('snap-')[:8]}"


def backup_handle(backup_id: str) -> str:
    return BACKUP_HANDLE_PREFIX + backup_id


def handle_backup_id(snapshot_id: str) -> str | None:
    """The backup id a ``backup-<id>`` snapshot handle names, else None."""
    found = BACKUP_HANDLE_PATTERN.match(snapshot_id)
    return found.group(1) if found else None


@dataclass(frozen=True)
class BackupSettings:
    """Where this installation's backups live and the key that opens them."""

    target: str
    key_file: Path
    s3_config: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> BackupSettings | None:
        """The chart's ``backup:`` block as the node sees it; None when it is not set."""
        target = environ.get("FERRY_BACKUP_TARGET", "")
        key_file = environ.get("FERRY_BACKUP_KEY_FILE", "")
        if not target:
            return None
        if not key_file:
            raise InvalidArgument(
                "FERRY_BACKUP_TARGET is set but FERRY_BACKUP_KEY_FILE is not: set the "
                "chart's backup.keySecret"
            )
        s3 = environ.get("FERRY_BACKUP_S3_CONFIG", "")
        return cls(target, Path(key_file), Path(s3) if s3 else None)


class SnapshotBackups:
    """This installation's backup target, opened on first use (one repository)."""

    def __init__(self, settings: BackupSettings) -> None:
        self.settings = settings
        self._repo: Repository | None = None
        self._lock = threading.Lock()

    def repository(self, *, create: bool = False) -> Repository:
        """The repository; only a backup (``create``) initialises an empty target, so a
        reader pointed at the wrong place is told so (NotFound) instead of making one."""
        with self._lock:
            if self._repo is None:
                target = open_target(self.settings.target, self.settings.s3_config)
                key = BackupKey.load(self.settings.key_file)
                self._repo = Repository.open(target, key, create=create)
            return self._repo

    def ship(
        self,
        snapshot_id: str,
        created_at: float,
        image: Path,
        *,
        volume_id: str,
        volume_name: str,
        fs_type: str | None,
        encrypted: bool,
        progress: Progress | None = None,
    ) -> str:
        """Back up snapshot ``snapshot_id``'s image (never written again); its backup id.

        Incremental: only chunks the target lacks (the previous backups of the
        volume hold the rest) are uploaded. A repeat finds the committed backup.
        """
        repo = self.repository(create=True)
        backup_id = snapshot_backup_id(snapshot_id, created_at)
        try:
            repo.backup(backup_id)
        except NotFound:
            pass
        else:
            return backup_id
        backup_image(
            repo,
            image,
            volume_name=volume_name,
            volume_id=volume_id,
            fs_type=fs_type,
            encrypted=encrypted,
            described=SNAPSHOT_SOURCE_PREFIX + snapshot_id,
            progress=progress,
            backup_id=backup_id,
        )
        return backup_id

    def describe(self, backup_id: str) -> Backup:
        """The backup's sealed metadata and manifest (NotFound when the target has none)."""
        return self.repository().backup(backup_id)

    def restore(self, backup_id: str, destination: Path) -> None:
        """``destination`` (a new file) as backup ``backup_id``'s image, every chunk
        verified; a retry resumes the ``.part`` file an interrupted restore left."""
        restore_image(self.repository(), backup_id, destination, replace=True)
