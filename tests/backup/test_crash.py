"""A backup or restore process killed (SIGKILL) halfway: the target holds no
manifest for it, and a retry completes, reusing what the dead one did."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import MANIFESTS, Repository, backup_image, restore_image
from csi_driver.backup.targets import FilesystemTarget
from csi_driver.backup.upload import INDEX, PACKS
from tests.backup.conftest import CHUNK, child_env, location_of, random_chunks, write_image

COUNT = 32
#: The child kills itself once this many bytes are done: mid-way, several batches in.
KILL_AFTER = 12 * CHUNK

CHILD = """
import os, signal, sys
from pathlib import Path
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import Progress, Repository, backup_image, restore_image
from csi_driver.backup.targets import open_target

operation, location, config, key_file, path, limit = sys.argv[1:7]
target = open_target(location, Path(config) if config else None)
repo = Repository.open(target, BackupKey.load(Path(key_file)), grace_s=30, pack_bytes=256 << 10)


class Crash(Progress):
    done = 0

    def advance(self, done_bytes):
        self.done += done_bytes
        if self.done >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)


if operation == "backup":
    backup_image(repo, Path(path), volume_name="db", progress=Crash())
else:
    restore_image(repo, sys.argv[7], Path(path), progress=Crash())
print("finished without crashing")
"""


def run_child(repo: Repository, tmp_path: Path, key: BackupKey, *args: str) -> None:
    location, config = location_of(repo.target, tmp_path)
    key_file = tmp_path / "key"
    if not key_file.exists():
        key.save(key_file)
    operation, path, *rest = args
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            operation,
            location,
            str(config or ""),
            str(key_file),
            path,
            str(KILL_AFTER),
            *rest,
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_killed_backup_leaves_no_manifest_and_its_retry_completes(
    repo: Repository, key: BackupKey, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(COUNT), 11), COUNT)
    run_child(repo, tmp_path, key, "backup", str(image))
    assert list(repo.target.list(MANIFESTS)) == []
    assert repo.backups() == []
    landed = len(list(repo.target.list(PACKS)))
    assert landed < COUNT
    assert list(repo.target.list(INDEX)) == []  # indexes come only after every pack
    if isinstance(repo.target, FilesystemTarget):
        # Packs staged but never flushed: invisible, and swept away later.
        assert landed == 0
        assert repo.target.remove_leftovers(older_than_s=0) > 0
    else:
        assert landed > 0  # every answered PUT is an object
    retry = backup_image(repo, image, volume_name="db")
    # The packs that landed are indexed from their own ends and reused.
    assert retry.chunks_uploaded == retry.packs_uploaded == COUNT - landed
    restored = restore_image(repo, retry.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)


def test_a_killed_restore_resumes_and_ends_byte_identical(
    repo: Repository, key: BackupKey, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(COUNT), 12), COUNT)
    backup_id = backup_image(repo, image, volume_name="db").backup.backup_id
    destination = tmp_path / "restored"
    run_child(repo, tmp_path, key, "restore", str(destination), backup_id)
    assert not destination.exists()
    retry = restore_image(repo, backup_id, destination)
    assert retry.chunks_kept >= KILL_AFTER // CHUNK - 1
    assert retry.chunks_kept + retry.chunks_fetched == COUNT
    assert digest(destination) == digest(image)
    assert [p.name for p in tmp_path.glob(".restored*")] == []
