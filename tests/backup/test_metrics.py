"""Backup and restore metrics count what the operations report, in bytes read,
uploaded, deduplicated and restored, and a failure is timed as one."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from csi_driver.backup.repository import Repository, backup_image, restore_image
from csi_driver.backup.upload import PACKS
from csi_driver.core.errors import DataLoss
from tests.backup.conftest import CHUNK, random_chunks, write_image


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_backup_and_restore_metrics_follow_the_results(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    chunks = random_chunks(range(4), 7)
    chunks[4] = chunks[0]  # the same data twice in one image: stored once
    write_image(image, chunks, 6)
    before = {
        name: sample(name)
        for name in (
            "ferry_backup_read_bytes_total",
            "ferry_backup_uploaded_bytes_total",
            "ferry_backup_deduplicated_bytes_total",
            "ferry_restore_bytes_total",
        )
    }
    done = sample("ferry_backup_duration_seconds_count", operation="backup", outcome="done")
    first = backup_image(fs_repo, image, volume_name="db")
    second = backup_image(fs_repo, image, volume_name="db")  # nothing new: all deduplicated
    restore_image(fs_repo, first.backup.backup_id, tmp_path / "restored")

    assert first.bytes_deduplicated == CHUNK
    assert second.bytes_deduplicated == 5 * CHUNK
    read = sample("ferry_backup_read_bytes_total") - before["ferry_backup_read_bytes_total"]
    assert read == first.bytes_read + second.bytes_read == 2 * 5 * CHUNK
    assert (
        sample("ferry_backup_uploaded_bytes_total") - before["ferry_backup_uploaded_bytes_total"]
        == first.bytes_uploaded + second.bytes_uploaded
    )
    assert (
        sample("ferry_backup_deduplicated_bytes_total")
        - before["ferry_backup_deduplicated_bytes_total"]
        == 6 * CHUNK
    )
    assert sample("ferry_restore_bytes_total") - before["ferry_restore_bytes_total"] == 5 * CHUNK
    after = sample("ferry_backup_duration_seconds_count", operation="backup", outcome="done")
    assert after - done == 2


def test_a_failed_restore_is_timed_as_failed(fs_repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "image"
    write_image(image, random_chunks(range(2), 8), 2)
    backup = backup_image(fs_repo, image, volume_name="db").backup
    for stored in fs_repo.target.list(PACKS):
        fs_repo.target.put(stored.key, bytes(40))  # damaged in the target
    failed = sample("ferry_backup_duration_seconds_count", operation="restore", outcome="failed")
    with pytest.raises(DataLoss):
        restore_image(fs_repo, backup.backup_id, tmp_path / "restored")
    assert (
        sample("ferry_backup_duration_seconds_count", operation="restore", outcome="failed")
        == failed + 1
    )
