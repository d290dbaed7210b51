"""A Ferry volume backed up from one installation and restored into a fresh one
(new catalog, new node): the "restore in another cluster" case, over real CSI
sockets, loop devices, ext4 and mounts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import Repository, restore_image
from csi_driver.backup.targets import FilesystemTarget
from csi_driver.backup.volumes import backup_volume, restore_volume
from csi_driver.chunks.manifest import BLOCK_SIZE
from csi_driver.core.errors import FailedPrecondition
from csi_driver.core.model import MiB
from csi_driver.gen import csi_pb2
from csi_driver.node.teardown import release_under
from csi_driver.sandbox.scratch import scratch_filesystem
from tests.backup.test_command import ferry
from tests.csi.conftest import Ferry, node_config, running
from tests.node.conftest import requires_root

pytestmark = [requires_root, pytest.mark.root, pytest.mark.slow]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unstage(ferry_: Ferry, volume_id: str, target: str) -> None:
    ferry_.client.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)
    )
    ferry_.client.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=ferry_.staging(volume_id)
        )
    )


def test_restore_into_a_fresh_installation_is_byte_identical(tmp_path: Path) -> None:
    key_file, target = tmp_path / "key", tmp_path / "target"
    BackupKey.generate().save(key_file)
    common = ("--target", target, "--key-file", key_file)
    payload = os.urandom(3 * MiB)
    first, second = tmp_path / "cluster-a", tmp_path / "cluster-b"
    first.mkdir()
    second.mkdir()
    try:
        with running(first, node_config(first, "node-a")) as cluster_a:
            volume_id = cluster_a.create("db", size=32 * MiB).volume_id
            cluster_a.stage(volume_id)
            mount = cluster_a.publish(volume_id)
            (Path(mount) / "data.bin").write_bytes(payload)
            (Path(mount) / "notes.txt").write_text("restored elsewhere\n")
            pool_a = first / "node-a" / "pool"
            repo = Repository.open(FilesystemTarget(target), BackupKey.load(key_file), create=True)
            with pytest.raises(FailedPrecondition, match="cannot reflink"):
                backup_volume(repo, pool_a, volume_id)  # staged, on an ext4 pool
            unstage(cluster_a, volume_id, mount)
            made = ferry(
                "backup",
                "create",
                *common,
                "--pool",
                pool_a,
                "--volume-id",
                volume_id,
                "--name",
                "db",
            )
            assert made.returncode == 0, made.stderr
            source = digest(pool_a / "images" / f"{volume_id}.img")
        release_under(first)
        backup_id = repo.backups()[0].backup_id
        assert repo.backups()[0].info.fs_type == "ext4"

        with running(second, node_config(second, "node-b")) as cluster_b:
            pool_b = second / "node-b" / "pool"
            restored = ferry(
                "restore",
                backup_id,
                *common,
                "--name",
                "db-restored",
                "--csi-endpoint",
                f"unix://{second}/csi.sock",
                "--pool",
                pool_b,
            )
            assert restored.returncode == 0, restored.stderr
            new_id = restored.stdout.split()[-1]
            assert digest(pool_b / "images" / f"{new_id}.img") == source
            # Again: the volume it produced already holds the backup, nothing is fetched.
            again = restore_volume(repo, backup_id, pool_b, new_id)
            assert again.chunks_fetched == 0
            cluster_b.stage(new_id)
            mount = Path(cluster_b.publish(new_id))
            assert (mount / "data.bin").read_bytes() == payload
            assert (mount / "notes.txt").read_text() == "restored elsewhere\n"
            with pytest.raises(FailedPrecondition, match="staged"):
                restore_volume(repo, backup_id, pool_b, new_id)
            unstage(cluster_b, new_id, str(mount))
            other = cluster_b.create("other", size=32 * MiB).volume_id
            cluster_b.stage(other)  # mkfs: it holds a filesystem now
            unstage_path = cluster_b.publish(other)
            unstage(cluster_b, other, unstage_path)
            with pytest.raises(FailedPrecondition, match="already holds data"):
                restore_volume(repo, backup_id, pool_b, other)
    finally:
        release_under(tmp_path)


def test_a_volume_on_a_reflink_pool_is_backed_up_live_reading_what_changed(
    tmp_path: Path,
) -> None:
    """On xfs the backup reads a reflink snapshot; the next one reads only the
    chunks whose extents changed, even though the image is open for writing."""
    with scratch_filesystem(tmp_path, 320 * MiB, ["mkfs.xfs", "-q", "-m", "reflink=1"]) as mount:
        pool = mount / "pool"
        (pool / "images").mkdir(parents=True)
        volume_id = "vol-" + "ab" * 16
        image = pool / "images" / f"{volume_id}.img"
        (pool / "images" / f"{volume_id}.json").write_text('{"thin": false, "epoch": 1}')
        with open(image, "wb") as handle:
            for _ in range(8):
                handle.write(os.urandom(4 * MiB))
        repo = Repository.open(
            FilesystemTarget(tmp_path / "target"), BackupKey.generate(), create=True
        )
        first = backup_volume(repo, pool, volume_id, volume_name="db")
        assert first.bytes_read == 32 * MiB
        with open(image, "r+b") as writer:  # stays open, as a loop device would hold it
            writer.seek(5 * 4 * MiB + 123)
            writer.write(b"a change")
            writer.flush()
            os.fsync(writer.fileno())
            second = backup_volume(repo, pool, volume_id, volume_name="db")
        # The capture's block table names the one changed block: only it is read.
        assert (second.bytes_read, second.chunks_uploaded, second.blocks_uploaded) == (
            BLOCK_SIZE,
            1,
            1,
        )
        restored = restore_image(repo, second.backup.backup_id, tmp_path / "restored")
        assert digest(restored.path) == digest(image)
