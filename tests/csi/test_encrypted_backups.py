"""An encrypted volume's snapshot and backup hold no plaintext; its restore needs the key.

Real loop devices, ext4 with fscrypt, a real all-in-one Ferry whose node has
a backup target. The pattern is written through the mount; the snapshot
file's raw bytes and every backup chunk *after decryption with the backup
key* (so the backup's own AES-GCM is not what hides it) are scanned. The
same scans find the pattern for an unencrypted control volume, so the test
can fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_driver.backup.snapshots import BackupSettings, SnapshotBackups
from csi_driver.csi.client import mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.teardown import release_under
from tests.csi.conftest import Ferry
from tests.csi.test_encrypted import (
    ENCRYPTED,
    PATTERN,
    holds,
    new_key,
    stage,
    unpublish,
    unstage,
    write_pattern,
)
from tests.csi.test_snapshot_backups import BACKUP, installation, listed, settings, snapshot
from tests.node.conftest import host_can_mount

pytestmark = pytest.mark.root
__all__ = ["settings"]  # the backup target fixture, shared

NEEDLE = PATTERN[:24]


@pytest.fixture
def backed_host(tmp_path: Path, settings: BackupSettings) -> Iterator[Ferry]:
    if not host_can_mount():
        pytest.skip("needs root and /dev/loop-control (loop devices, mkfs, mount)")
    try:
        with installation(tmp_path / "one", settings) as ferry:
            yield ferry
    finally:
        release_under(tmp_path)


def backup_plaintext(settings: BackupSettings, snapshot_id: str) -> bool:
    """Whether the backup of ``snapshot_id``, its chunks decrypted, holds the pattern."""
    repo = SnapshotBackups(settings).repository()
    (entry,) = [b for b in listed(settings) if b["source"] == f"snapshot:{snapshot_id}"]
    backup = repo.backup(entry["backup_id"])
    blocks = repo.block_map()
    buffer = bytearray(backup.manifest.chunk_size)
    return any(
        NEEDLE in bytes(repo.fetch_chunk(backup, index, buffer, blocks))
        for index in backup.manifest.data_chunks
    )


def snapshot_file(ferry: Ferry, snapshot_id: str) -> Path:
    return ferry.base / "node-a" / "pool" / "snapshots" / f"{snapshot_id}.img"


def written(ferry: Ferry, name: str, key: str | None) -> Any:
    parameters = ENCRYPTED if key else {}
    volume = ferry.create(name, parameters=parameters)
    if key:
        stage(ferry, volume, key)
    else:
        ferry.stage(volume.volume_id)
    write_pattern(ferry.publish(volume.volume_id))
    unpublish(ferry, volume.volume_id)
    unstage(ferry, volume.volume_id)
    return volume


def test_snapshot_and_backup_of_an_encrypted_volume_hold_no_plaintext(
    backed_host: Ferry, settings: BackupSettings
) -> None:
    ferry = backed_host
    key = new_key()
    secret = written(ferry, "pv-secret", key)
    plain = written(ferry, "pv-plain", None)
    secret_snap = snapshot(ferry, "snap-secret", secret.volume_id, BACKUP)
    plain_snap = snapshot(ferry, "snap-plain", plain.volume_id, BACKUP)
    assert secret_snap.ready_to_use and plain_snap.ready_to_use

    assert not holds(snapshot_file(ferry, secret_snap.snapshot_id), NEEDLE)
    assert not backup_plaintext(settings, secret_snap.snapshot_id)
    # The same scans find it in the unencrypted control: they can fail.
    assert holds(snapshot_file(ferry, plain_snap.snapshot_id), NEEDLE)
    assert backup_plaintext(settings, plain_snap.snapshot_id)
    assert [b["encrypted"] for b in listed(settings)] == [True, False]

    # Restored from the backup (a node that never held the snapshot would do the
    # same): still encrypted, readable with the source's key only.
    handle = f"backup-{listed(settings)[0]['backup_id']}"
    source = csi_pb2.VolumeContentSource()
    source.snapshot.snapshot_id = handle
    restored = ferry.client.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pv-secret-restored",
            capacity_range=csi_pb2.CapacityRange(required_bytes=secret.capacity_bytes),
            volume_capabilities=[mount_capability()],
            volume_content_source=source,
            parameters=ENCRYPTED,
        )
    ).volume
    stage(ferry, restored, key)
    target = Path(ferry.publish(restored.volume_id))
    assert NEEDLE in next(target.iterdir()).read_bytes()[: len(PATTERN) * 2]
    unpublish(ferry, restored.volume_id)
    unstage(ferry, restored.volume_id)
