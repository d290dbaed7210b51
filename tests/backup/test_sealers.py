"""Backups sealed in worker processes: the same backups as on threads, bounded
shared memory that never outlives a run, and workers that die or outlive
nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.backup import sealers
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import (
    Progress,
    Repository,
    backup_image,
    restore_image,
    verify_backup,
)
from csi_driver.backup.targets import FilesystemTarget, Target
from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.manifest import BLOCK_SIZE, block_digests
from csi_driver.chunks.scan import scan_image
from csi_driver.core.errors import BackupFailed, FailedPrecondition
from tests.backup.conftest import CHUNK, child_env, mixed_image, open_repo

COUNT = 24


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{sealers.SEGMENT_PREFIX}{pid}-")]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def in_processes(target: Target, key: BackupKey) -> Repository:
    repo = open_repo(target, key)
    repo.process_min_bytes = 0
    return repo


@pytest.fixture
def pool() -> Iterator[None]:
    """A test's own pool of workers, ended after it (and checked to end)."""
    sealers.shutdown()
    yield
    pids = sealers.worker_pids()
    sealers.shutdown()
    assert not [pid for pid in pids if alive(pid)]
    assert segments(os.getpid()) == []


def test_backups_in_processes_restore_and_deduplicate_as_threads(
    pool: None, fs_target: Target, key: BackupKey, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    mixed_image(image, COUNT)
    repo = in_processes(fs_target, key)
    first = backup_image(repo, image, volume_name="db")
    assert sealers.worker_pids(), "the backup ran on threads, not in worker processes"
    assert first.blocks_uploaded > 0
    assert segments(os.getpid()) == []  # the run's ring is gone with the run
    restored = restore_image(repo, first.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)
    assert verify_backup(repo, first.backup.backup_id).chunks_checked > 0
    # The same blocks under the same ids as the thread path: nothing new to upload.
    on_threads = open_repo(fs_target, key)
    on_threads.process_min_bytes = None
    again = backup_image(on_threads, image, volume_name="db")
    # Everything read but the written zero chunk (a hole to both) was deduplicated.
    assert (again.blocks_uploaded, again.bytes_deduplicated) == (0, first.bytes_read - CHUNK)


def test_thread_and_process_backups_store_the_same_blocks(
    pool: None, key: BackupKey, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    mixed_image(image, COUNT, seed=3)
    ids = []
    for name, process_min_bytes in (("threads", None), ("processes", 0)):
        repo = open_repo(FilesystemTarget(tmp_path / name), key)
        repo.process_min_bytes = process_min_bytes
        backup = backup_image(repo, image, volume_name="db").backup
        ids.append(sorted(e.block_id for es in repo.indexes().values() for e in es))
        assert repo.backup(backup.backup_id).manifest == backup.manifest
    assert ids[0] == ids[1] and ids[0]


def table_of(image: Path, path: Path) -> Path:
    """A capture's block table of ``image``, as the node keeps one."""
    size = image.stat().st_size
    table = BlockTable.create(path, size, CHUNK)
    data = image.read_bytes()
    for index in range(size // CHUNK):
        table.write(index, block_digests(data[index * CHUNK : (index + 1) * CHUNK], CHUNK))
    table.close()
    return path


def test_with_a_block_table_workers_read_only_new_blocks_and_check_them(
    pool: None, fs_target: Target, key: BackupKey, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    mixed_image(image, COUNT)
    repo = in_processes(fs_target, key)
    backup_image(repo, image, volume_name="db")
    with open(image, "r+b") as handle:
        handle.seek(9 * CHUNK + BLOCK_SIZE)
        handle.write(b"new bytes")
    manifest = scan_image(image, CHUNK).manifest
    blocks = table_of(image, tmp_path / "blocks")
    result = backup_image(repo, image, volume_name="db", manifest=manifest, blocks=blocks)
    assert (result.bytes_read, result.blocks_uploaded) == (BLOCK_SIZE, 1)
    restored = restore_image(repo, result.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)
    with open(image, "r+b") as handle:
        handle.seek(12 * CHUNK)
        handle.write(b"changed before the capture")
    manifest = scan_image(image, CHUNK).manifest
    blocks = table_of(image, tmp_path / "blocks")
    with open(image, "r+b") as handle:
        handle.seek(12 * CHUNK)
        handle.write(b"and changed after it")
    with pytest.raises(FailedPrecondition, match="changed since its manifest"):
        backup_image(repo, image, volume_name="db", manifest=manifest, blocks=blocks)
    assert len(repo.backups()) == 2


class KillWorker(Progress):
    """Kills a sealing worker once some bytes are done."""

    def __init__(self) -> None:
        self.done = 0
        self.killed: list[int] = []

    def advance(self, done_bytes: int) -> None:
        self.done += done_bytes
        if self.done >= 6 * CHUNK and not self.killed:
            self.killed = sealers.worker_pids()[:1]
            os.kill(self.killed[0], signal.SIGKILL)


def test_a_worker_that_dies_fails_the_backup_cleanly_and_a_retry_succeeds(
    pool: None, fs_target: Target, key: BackupKey, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    mixed_image(image, COUNT)
    repo = in_processes(fs_target, key)
    killer = KillWorker()
    with pytest.raises(BackupFailed, match=r"worker process died.*retry"):
        backup_image(repo, image, volume_name="db", progress=killer)
    assert killer.killed and repo.backups() == []
    assert segments(os.getpid()) == []
    dead = killer.killed
    retried = backup_image(repo, image, volume_name="db")
    assert not set(dead) & set(sealers.worker_pids())  # a new pool
    restored = restore_image(repo, retried.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)


CHILD = """
import os, signal, sys
from pathlib import Path
from csi_driver.backup import sealers
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import Progress, Repository, backup_image
from csi_driver.backup.targets import FilesystemTarget

root, key_file, image, crash = sys.argv[1:5]
repo = Repository.open(FilesystemTarget(Path(root)), BackupKey.load(Path(key_file)),
                       grace_s=30, pack_bytes=256 << 10)
repo.process_min_bytes = 0


class Crash(Progress):
    done = 0

    def advance(self, done_bytes):
        self.done += done_bytes
        if crash == "True" and self.done >= 8 * 256 * 1024:
            os.kill(os.getpid(), signal.SIGKILL)


backup_image(repo, Path(image), volume_name="db", progress=Crash())
print("pids", *sealers.worker_pids())
"""


def marked(mark: str) -> list[int]:
    """Processes whose environment carries ``mark``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if mark.encode() in handle.read():
                    found.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


@pytest.mark.parametrize("crash", [False, True], ids=["exits", "killed"])
def test_nothing_outlives_the_backups_process(
    crash: bool, fs_target: Target, key: BackupKey, tmp_path: Path
) -> None:
    """Workers, the forkserver and the ring go with the process that started them,
    whether it exits without a word or is killed mid-backup; a retry completes."""
    image = tmp_path / "image"
    mixed_image(image, COUNT)
    open_repo(fs_target, key)
    key_file = tmp_path / "key"
    key.save(key_file)
    assert isinstance(fs_target, FilesystemTarget)
    mark = f"FERRY_TEST_MARK={uuid.uuid4().hex}"
    name, value = mark.split("=")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(fs_target.root), str(key_file), str(image), str(crash)],
        env={**child_env(), name: value},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
        child.wait()
    if crash:
        assert child.returncode == -signal.SIGKILL, err
    else:
        assert child.returncode == 0, err
        assert len(out.split()) > 1, "the child did not use worker processes"
    deadline = time.monotonic() + 30
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked(mark) == []
    assert segments(child.pid) == []
    repo = Repository.open(fs_target, key)
    assert len(repo.backups()) == (0 if crash else 1)
    retried = backup_image(repo, image, volume_name="db")
    restored = restore_image(repo, retried.backup.backup_id, tmp_path / "restored")
    assert digest(restored.path) == digest(image)
