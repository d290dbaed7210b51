"""Pruning and garbage collection, including a collection racing a real backup thread."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from csi_driver.backup.claims import CLAIMS, SWEEPS
from csi_driver.backup.collection import collect_garbage
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import (
    MANIFESTS,
    Progress,
    Repository,
    backup_image,
    new_backup_id,
    prune,
    verify_backup,
)
from csi_driver.backup.retention import RetentionPolicy
from csi_driver.backup.targets import FilesystemTarget
from csi_driver.backup.upload import PACKS
from csi_driver.core.errors import Aborted, DataLoss
from tests.backup.conftest import CHUNK, random_chunks, write_image

#: Two claim batches: the first 16 chunks, then 8. Test packs hold a random
#: chunk each (see conftest), so packs are counted where chunks were.
COUNT = 24


def pack_names(repo: Repository) -> set[str]:
    return {s.key for s in repo.target.list(PACKS)}


class PauseAt(Progress):
    """Blocks the operation the first time it reports progress, until released."""

    def __init__(self) -> None:
        self.paused = threading.Event()
        self.release = threading.Event()

    def advance(self, done_bytes: int) -> None:
        if not self.paused.is_set():
            self.paused.set()
            assert self.release.wait(30), "the test never released the paused operation"


def test_prune_then_gc_frees_only_what_no_backup_uses(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(4), 1), 4)
    old = backup_image(repo, image, volume_name="db").backup.backup_id
    write_image(image, random_chunks(range(4), 2), 4)  # every chunk new
    new = backup_image(repo, image, volume_name="db").backup.backup_id
    backup_image(repo, image, volume_name="other")  # same chunks, another volume
    assert len(pack_names(repo)) == 8
    result = prune(repo, RetentionPolicy(keep_last=1))
    assert result.removed == (old,)
    assert set(result.kept) == {new, *(b.backup_id for b in repo.backups())}
    dry = collect_garbage(repo, dry_run=True)
    assert dry.packs_deleted == 4 and len(pack_names(repo)) == 8
    gc = collect_garbage(repo)
    assert (gc.packs_deleted, gc.packs_kept, gc.packs_repacked) == (4, 4, 0)
    assert gc.bytes_deleted >= 4 * CHUNK
    assert len(repo.indexes()) == 4  # the deleted packs' indexes went with them
    verify_backup(repo, new)
    assert collect_garbage(repo).packs_deleted == 0


def test_gc_keeps_chunks_a_running_backup_relies_on(repo: Repository, tmp_path: Path) -> None:
    """A backup reuses chunks no manifest names any more; a collection runs while it
    is paused after claiming its first batch. The claimed chunks survive; the
    unclaimed batch is collected, and the backup, seeing the sweep, uploads it again."""
    image = tmp_path / "image"
    write_image(image, random_chunks(range(COUNT), 3), COUNT)
    first = backup_image(repo, image, volume_name="db").backup.backup_id
    repo.target.delete(MANIFESTS + first)  # pruned: all its chunks are garbage now
    pause = PauseAt()
    outcome: dict[str, object] = {}

    def run_backup() -> None:
        try:
            outcome["result"] = backup_image(repo, image, volume_name="db", progress=pause)
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=run_backup)
    thread.start()
    assert pause.paused.wait(30)
    gc = collect_garbage(repo)
    pause.release.set()
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert (gc.packs_kept, gc.packs_deleted) == (16, 8)
    result = outcome["result"]
    assert result.chunks_uploaded == 8  # type: ignore[attr-defined]
    verify_backup(repo, result.backup.backup_id)  # type: ignore[attr-defined]


def test_a_backup_waits_for_a_sweep_in_progress(repo: Repository, tmp_path: Path) -> None:
    """A collection paused between its mark and its deletions holds a starting
    backup back; once it is over, the backup sees the chunks really there."""
    image = tmp_path / "image"
    write_image(image, random_chunks(range(4), 4), 4)
    first = backup_image(repo, image, volume_name="db").backup.backup_id
    repo.target.delete(MANIFESTS + first)
    marked, release = threading.Event(), threading.Event()

    def hold(count: int) -> None:
        marked.set()
        assert release.wait(30)

    collector = threading.Thread(
        target=collect_garbage, args=(repo,), kwargs={"before_delete": hold}
    )
    collector.start()
    assert marked.wait(30)
    outcome: dict[str, object] = {}
    backup = threading.Thread(
        target=lambda: outcome.update(result=backup_image(repo, image, volume_name="db"))
    )
    backup.start()
    time.sleep(1.0)
    assert backup.is_alive(), "the backup went ahead while a sweep was deleting"
    release.set()
    collector.join(30)
    backup.join(60)
    result = outcome["result"]
    assert result.chunks_uploaded == 4  # type: ignore[attr-defined]
    verify_backup(repo, result.backup.backup_id)  # type: ignore[attr-defined]


def test_stale_claims_protect_nothing_and_are_removed(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 5), 2)
    first = backup_image(fs_repo, image, volume_name="db")
    fs_repo.target.delete(MANIFESTS + first.backup.backup_id)
    ids = sorted(fs_repo.block_ids(first.backup))
    # A backup that died long ago: its claim names the blocks, its heartbeat is old.
    fs_repo.target.put(f"{CLAIMS}dead-op/live", json.dumps({"at": time.time() - 3600}).encode())
    fs_repo.target.put(f"{CLAIMS}dead-op/00000001", b"".join(ids))
    gc = collect_garbage(fs_repo)
    assert (gc.packs_deleted, gc.stale_claims_removed) == (2, 1)
    assert list(fs_repo.target.list(CLAIMS)) == []


def test_a_stale_sweep_holds_no_backup_back(fs_repo: Repository, tmp_path: Path) -> None:
    fs_repo.target.put(
        f"{SWEEPS}20200101T000000Z-dead", json.dumps({"state": "live", "at": 0}).encode()
    )
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 5), 2)
    assert backup_image(fs_repo, image, volume_name="db").chunks_uploaded == 2


def test_gc_refuses_to_run_over_a_damaged_manifest(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 5), 2)
    backup_id = backup_image(fs_repo, image, volume_name="db").backup.backup_id
    sealed = bytearray(fs_repo.target.get(MANIFESTS + backup_id))
    sealed[-1] ^= 1
    fs_repo.target.put(MANIFESTS + backup_id, bytes(sealed))
    with pytest.raises(DataLoss):
        collect_garbage(fs_repo)
    assert len(pack_names(fs_repo)) == 2


def test_a_backup_whose_claim_lapsed_commits_nothing(
    fs_target: FilesystemTarget, key: BackupKey, tmp_path: Path
) -> None:
    """Its heartbeat cannot be written for longer than half the grace period: a
    collector may have found it stale, so the backup must not write its manifest."""
    repo = Repository.open(fs_target, key, create=True, chunk_size=CHUNK, grace_s=1.2)
    image = tmp_path / "image"
    write_image(image, random_chunks(range(8), 6), 8)
    backup_id = new_backup_id()
    pause = PauseAt()
    outcome: dict[str, object] = {}

    def run_backup() -> None:
        try:
            backup_image(repo, image, volume_name="db", progress=pause, backup_id=backup_id)
        except Aborted as exc:
            outcome["aborted"] = exc

    thread = threading.Thread(target=run_backup)
    thread.start()
    assert pause.paused.wait(30)
    claim_dir = fs_target.root / CLAIMS / backup_id
    shutil.rmtree(claim_dir)
    claim_dir.write_bytes(b"")  # a file where the heartbeat's directory was: puts fail
    time.sleep(1.0)
    pause.release.set()
    thread.join(60)
    assert "could not renew its claim" in str(outcome["aborted"])
    assert list(repo.target.list(MANIFESTS)) == []
