"""Snapshots that are backups (VolumeSnapshotClass ``backup: "true"``), over CSI.

A real all-in-one Ferry whose node has a backup target (a directory, as the
chart's ``backup:`` block gives it) takes the snapshot, ships it, and reports
it ready only once the backup is committed; a *fresh* installation (new
catalog, new pool, same target and key) restores it through CreateVolume from
the ``backup-<id>`` handle, byte-identical. The backups are listed and
verified by the real ``ferry backup`` CLI in a subprocess. Unstaged block
volumes need no root: their images are files in the pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.backup.keys import BackupKey
from csi_driver.backup.snapshots import BackupSettings, SnapshotBackups
from csi_driver.chunks.manifest import BLOCK_SIZE
from csi_driver.core.encryption import ENCRYPTED_CONTEXT_KEY
from csi_driver.core.model import MiB
from csi_driver.csi.client import block_capability, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.runtime import start_node
from tests.csi.conftest import Ferry, expect_code, node_config, running
from tests.csi.test_clones import on_node

SIZE = 32 * MiB
CHUNK = 4 * MiB
BACKUP = {"backup": "true"}


@pytest.fixture
def settings(tmp_path: Path) -> BackupSettings:
    key = tmp_path / "backup.key"
    BackupKey.generate().save(key)
    return BackupSettings(str(tmp_path / "target"), key)


def installation(base: Path, settings: BackupSettings | None) -> Any:
    base.mkdir(parents=True, exist_ok=True)
    return running(base, replace(node_config(base), backup=settings))


@pytest.fixture
def backed(tmp_path: Path, settings: BackupSettings) -> Iterator[Ferry]:
    with installation(tmp_path / "one", settings) as ferry:
        yield ferry


def image(ferry: Ferry, volume_id: str) -> Path:
    return ferry.base / "node-a" / "pool" / "images" / f"{volume_id}.img"


def write_chunks(path: Path, chunks: dict[int, bytes]) -> None:
    """Writes into an unstaged block volume's image, as its pod would have."""
    with open(path, "r+b") as handle:
        for index, fill in chunks.items():
            handle.seek(index * CHUNK)
            handle.write(fill * (CHUNK // len(fill)))


def snapshot(ferry: Ferry, name: str, volume_id: str, parameters: dict[str, str]) -> Any:
    request = csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=volume_id, parameters=parameters
    )
    return ferry.client.controller.CreateSnapshot(request).snapshot


def ferry_backup(settings: BackupSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", "backup", *args, "--quiet"],
        env={
            **os.environ,
            "FERRY_BACKUP_TARGET": settings.target,
            "FERRY_BACKUP_KEY_FILE": str(settings.key_file),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def listed(settings: BackupSettings) -> list[dict[str, Any]]:
    done = ferry_backup(settings, "list", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def stored_blocks(settings: BackupSettings) -> int:
    """Blocks in the target's packs (each chunk here holds one non-zero block)."""
    return len(SnapshotBackups(settings).repository().block_map())


def restore_request(
    name: str, handle: str, parameters: dict[str, str] | None = None, capability: Any = None
) -> Any:
    source = csi_pb2.VolumeContentSource()
    source.snapshot.snapshot_id = handle
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[capability or block_capability()],
        volume_content_source=source,
        parameters=parameters or {},
    )


@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({"backups": "true"}, "unknown VolumeSnapshotClass parameter(s) backups"),
        ({"backup": "yes please"}, 'use "true" or "false"'),
    ],
)
def test_snapshot_class_parameters_are_checked(
    backed: Ferry, parameters: dict[str, str], says: str
) -> None:
    volume = backed.create("pv-params", SIZE, block_capability())
    request = csi_pb2.CreateSnapshotRequest(
        name="snap-params", source_volume_id=volume.volume_id, parameters=parameters
    )
    details = expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, backed.client.controller.CreateSnapshot, request
    )
    assert says in details
    # The sidecar's own metadata keys are not the class's parameters.
    sidecar = {"csi.storage.k8s.io/volumesnapshot/name": "snap"}
    assert snapshot(backed, "snap-sidecar", volume.volume_id, sidecar).ready_to_use
    group = csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="group-params", source_volume_ids=[volume.volume_id], parameters=parameters
    )
    details = expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, backed.client.group.CreateVolumeGroupSnapshot, group
    )
    assert says in details


def test_a_backup_needs_a_target_on_the_node(tmp_path: Path) -> None:
    with installation(tmp_path / "plain", None) as ferry:
        volume = ferry.create("pv-no-target", SIZE, block_capability())
        request = csi_pb2.CreateSnapshotRequest(
            name="snap-no-target", source_volume_id=volume.volume_id, parameters=BACKUP
        )
        details = expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, ferry.client.controller.CreateSnapshot, request
        )
        assert "no backup target" in details and "backup.target" in details
        group = csi_pb2.CreateVolumeGroupSnapshotRequest(
            name="group-no-target", source_volume_ids=[volume.volume_id], parameters=BACKUP
        )
        details = expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, ferry.client.group.CreateVolumeGroupSnapshot, group
        )
        assert "no backup target" in details
        pool = ferry.base / "node-a" / "pool" / "snapshots"
        assert not list(pool.glob("snap-*.img"))  # nothing kept for the refused snapshots
        # No target: a backup handle cannot be resolved, and says why.
        handle = "backup-20260101T000000Z-0123abcd"
        details = expect_code(
            grpc.StatusCode.NOT_FOUND,
            ferry.client.controller.CreateVolume,
            restore_request("pv-from-nothing", handle),
        )
        assert "no backup target" in details


def group_snapshot(ferry: Ferry, name: str, volume_ids: list[str]) -> Any:
    request = csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=name, source_volume_ids=volume_ids, parameters=BACKUP
    )
    return ferry.client.group.CreateVolumeGroupSnapshot(request).group_snapshot


def test_a_group_snapshot_class_with_backup_backs_up_every_member_at_its_point(
    backed: Ferry, settings: BackupSettings
) -> None:
    volumes = [backed.create(f"pv-app-{i}", SIZE, block_capability()) for i in range(2)]
    for i, volume in enumerate(volumes):
        write_chunks(image(backed, volume.volume_id), {i: b"before-%d-" % i})
    expected = [image(backed, v.volume_id).read_bytes() for v in volumes]
    group = group_snapshot(backed, "group-app", [v.volume_id for v in volumes])
    assert group.ready_to_use and len(group.snapshots) == 2
    for volume in volumes:  # after the group's point in time: in no backup
        write_chunks(image(backed, volume.volume_id), {3: b"after-"})
    members = {s.source_volume_id: s.snapshot_id for s in group.snapshots}
    backups = {b["source"]: b for b in listed(settings)}
    assert set(backups) == {f"snapshot:{s}" for s in members.values()}
    for volume, before in zip(volumes, expected, strict=True):
        handle = backups[f"snapshot:{members[volume.volume_id]}"]["snapshot_handle"]
        restored = backed.client.controller.CreateVolume(
            restore_request(f"pv-restored-{volume.volume_id}", handle)
        ).volume
        assert image(backed, restored.volume_id).read_bytes() == before
    # A repeat finds the group (no second backup); without backup it is another group.
    assert group_snapshot(backed, "group-app", [v.volume_id for v in volumes]) == group
    assert len(listed(settings)) == 2
    plain = csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="group-app", source_volume_ids=[v.volume_id for v in volumes]
    )
    expect_code(
        grpc.StatusCode.ALREADY_EXISTS, backed.client.group.CreateVolumeGroupSnapshot, plain
    )


def test_a_failing_backup_target_is_unavailable_and_the_retry_completes(
    tmp_path: Path,
) -> None:
    key = tmp_path / "backup.key"
    BackupKey.generate().save(key)
    target = tmp_path / "target"
    target.write_text("not a directory: every backup into it fails")
    with installation(tmp_path / "one", BackupSettings(str(target), key)) as ferry:
        volume = ferry.create("pv-db", SIZE, block_capability())
        write_chunks(image(ferry, volume.volume_id), {1: b"data-"})
        request = csi_pb2.CreateSnapshotRequest(
            name="snap-failing", source_volume_id=volume.volume_id, parameters=BACKUP
        )
        details = expect_code(
            grpc.StatusCode.UNAVAILABLE, ferry.client.controller.CreateSnapshot, request
        )
        assert "backup failed" in details and "retries" in details
        snapshots = ferry.base / "node-a" / "pool" / "snapshots"
        assert len(list(snapshots.glob("snap-*.img"))) == 1  # taken, kept for the retry
        target.unlink()  # the operator repairs the target
        ends = time.monotonic() + 60
        while True:
            try:
                taken = ferry.client.controller.CreateSnapshot(request).snapshot
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc.details()
                taken = None
            if taken is not None and taken.ready_to_use:
                break
            assert time.monotonic() < ends, "the node's retry did not back the snapshot up"
            time.sleep(0.5)
        settings = BackupSettings(str(target), key)
        assert [b["source"] for b in listed(settings)] == [f"snapshot:{taken.snapshot_id}"]


def test_a_backup_snapshot_restores_in_a_fresh_installation(
    tmp_path: Path, backed: Ferry, settings: BackupSettings
) -> None:
    volume = backed.create("pv-db", SIZE, block_capability())
    write_chunks(image(backed, volume.volume_id), {0: b"first-", 2: b"third-", 5: b"sixth-"})
    first = snapshot(backed, "snap-monday", volume.volume_id, BACKUP)
    assert first.ready_to_use
    blocks_after_first = stored_blocks(settings)
    # The three data chunks' distinct blocks; holes are not stored.
    assert 3 <= blocks_after_first <= 3 * CHUNK // BLOCK_SIZE

    write_chunks(image(backed, volume.volume_id), {2: b"changed-"})
    expected = image(backed, volume.volume_id).read_bytes()
    second = snapshot(backed, "snap-tuesday", volume.volume_id, BACKUP)
    assert second.ready_to_use
    blocks_after_second = stored_blocks(settings)
    # Incremental: at most the changed chunk's blocks are new.
    assert 0 < blocks_after_second - blocks_after_first <= CHUNK // BLOCK_SIZE
    # A repeat is idempotent: no second backup of the same snapshot.
    assert snapshot(backed, "snap-tuesday", volume.volume_id, BACKUP) == second
    expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        backed.client.controller.CreateSnapshot,
        csi_pb2.CreateSnapshotRequest(name="snap-tuesday", source_volume_id=volume.volume_id),
    )

    endpoint = f"unix://{backed.base}/csi.sock"
    command = ["snapshot", "create", "--name", "snap-cli", "--volume", volume.volume_id]
    third = subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", *command, "--backup", "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert third.returncode == 0, third.stderr
    assert ": ready in" in third.stdout and "backed up (32Mi at" in third.stdout
    cli_snapshot = third.stdout.split()[1]
    assert stored_blocks(settings) == blocks_after_second  # nothing changed since

    backups = listed(settings)
    assert backups[-1]["source"] == f"snapshot:{cli_snapshot}"
    backups = backups[:-1]
    assert [b["source"] for b in backups] == [
        f"snapshot:{first.snapshot_id}",
        f"snapshot:{second.snapshot_id}",
    ]
    assert {b["volume_name"] for b in backups} == {"pv-db"}
    verified = ferry_backup(settings, "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.count(": ok,") == 3
    handle = backups[-1]["snapshot_handle"]
    # Same installation, a node that never held it would pull it from the target too.
    restored_here = backed.client.controller.CreateVolume(restore_request("pv-here", handle))
    assert image(backed, restored_here.volume.volume_id).read_bytes() == expected

    with installation(tmp_path / "two", settings) as fresh:
        got = fresh.client.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=handle))
        assert got.snapshot.ready_to_use and got.snapshot.size_bytes == SIZE
        page = fresh.client.controller.ListSnapshots(
            csi_pb2.ListSnapshotsRequest(snapshot_id=handle)
        )
        assert [e.snapshot.snapshot_id for e in page.entries] == [handle]
        restored = fresh.client.controller.CreateVolume(restore_request("pv-db-copy", handle))
        assert restored.volume.content_source.snapshot.snapshot_id == handle
        assert image(fresh, restored.volume.volume_id).read_bytes() == expected
        missing = "backup-20260101T000000Z-0123abcd"
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            fresh.client.controller.CreateVolume,
            restore_request("pv-missing", missing),
        )
        # DeleteSnapshot of a handle keeps the backup: backups outlive snapshots.
        fresh.client.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=handle))
        assert len(listed(settings)) == 3


def test_a_copy_keeps_its_sources_encryption(backed: Ferry) -> None:
    encrypted = backed.create("pv-secret", SIZE, parameters={"encrypted": "true"})
    plain = backed.create("pv-plain", SIZE)
    secret_snap = snapshot(backed, "snap-secret", encrypted.volume_id, {})
    plain_snap = snapshot(backed, "snap-plain", plain.volume_id, {})

    def restore(name: str, snapshot_id: str, parameters: dict[str, str]) -> Any:
        return restore_request(name, snapshot_id, parameters, mount_capability())

    create = backed.client.controller.CreateVolume
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    details = expect_code(invalid, create, restore("pv-leak", secret_snap.snapshot_id, {}))
    assert "is an encrypted volume" in details and 'encrypted: "true"' in details
    details = expect_code(
        invalid, create, restore("pv-fake", plain_snap.snapshot_id, {"encrypted": "true"})
    )
    assert "is not encrypted" in details
    # A clone (through a snapshot of the volume) is held to the same rule.
    clone = csi_pb2.VolumeContentSource()
    clone.volume.volume_id = encrypted.volume_id
    request = restore("pv-clone", "", {})
    request.volume_content_source.CopyFrom(clone)
    assert "is an encrypted volume" in expect_code(invalid, create, request)
    same = create(restore("pv-secret-copy", secret_snap.snapshot_id, {"encrypted": "true"}))
    assert same.volume.volume_context[ENCRYPTED_CONTEXT_KEY] == "true"


def test_a_node_that_never_held_the_snapshot_restores_it_from_the_target(
    tmp_path: Path, backed: Ferry, settings: BackupSettings
) -> None:
    # node-a serves no chunks, so the only way to node-b is through the backup target.
    config_b = replace(node_config(backed.base, "node-b"), backup=settings)
    node_b = start_node(f"unix://{backed.base}/csi-b.sock", config_b, backed.catalog)
    try:
        volume = backed.create("pv-moving", SIZE, block_capability())
        write_chunks(image(backed, volume.volume_id), {1: b"second-", 7: b"last-"})
        expected = image(backed, volume.volume_id).read_bytes()
        taken = snapshot(backed, "snap-moving", volume.volume_id, BACKUP)
        assert taken.ready_to_use
        request = on_node(restore_request("pv-moved", taken.snapshot_id), "node-b")
        moved = backed.client.controller.CreateVolume(request).volume
        path = backed.base / "node-b" / "pool" / "images" / f"{moved.volume_id}.img"
        assert path.read_bytes() == expected
    finally:
        node_b.stop(grace_s=0)


def test_a_handle_never_initialises_an_empty_target(
    tmp_path: Path, settings: BackupSettings
) -> None:
    with installation(tmp_path / "reader", settings) as ferry:
        handle = "backup-20260101T000000Z-0123abcd"
        details = expect_code(
            grpc.StatusCode.NOT_FOUND,
            ferry.client.controller.GetSnapshot,
            csi_pb2.GetSnapshotRequest(snapshot_id=handle),
        )
        assert "no Ferry backups in" in details
        assert not Path(settings.target, "config").exists()


def parts(ferry: Ferry) -> list[Path]:
    return sorted((ferry.base / "node-a" / "pool").rglob("*.part"))


class Tampered:
    """A backup whose first stored block can be made to fail its check, and repaired."""

    def __init__(self, ferry: Ferry, settings: BackupSettings) -> None:
        volume = ferry.create("pv-src", SIZE, block_capability())
        write_chunks(image(ferry, volume.volume_id), {0: b"zero-", 3: b"three-", 6: b"six-"})
        self.expected = image(ferry, volume.volume_id).read_bytes()
        assert snapshot(ferry, "snap-src", volume.volume_id, BACKUP).ready_to_use
        self.handle = listed(settings)[-1]["snapshot_handle"]
        self.chunk = next(p for p in Path(settings.target, "packs").rglob("*") if p.is_file())
        self.sealed = self.chunk.read_bytes()

    def interrupt(self, ferry: Ferry, name: str) -> str:
        """A restore cut short by a chunk that fails its check (left tampered); the
        volume it was for."""
        data = bytearray(self.sealed)
        data[100] ^= 1  # inside the pack's first block
        self.chunk.write_bytes(bytes(data))
        with pytest.raises(grpc.RpcError):
            ferry.client.controller.CreateVolume(restore_request(name, self.handle), timeout=3)
        assert parts(ferry), "the interrupted restore kept its .part file for the retry"
        (work,) = (ferry.base / "node-a" / "pool" / "incoming").iterdir()
        return work.name

    def resumed(self, ferry: Ferry, name: str) -> None:
        """Repaired, the restore completes on a retry (the node's, with backoff) and
        leaves no .part file."""
        self.chunk.write_bytes(self.sealed)
        ends = time.monotonic() + 60
        while True:
            try:
                request = restore_request(name, self.handle)
                restored = ferry.client.controller.CreateVolume(request).volume
                break
            except grpc.RpcError:
                assert time.monotonic() < ends, "the retried restore did not complete"
                time.sleep(0.5)
        assert image(ferry, restored.volume_id).read_bytes() == self.expected
        assert parts(ferry) == []


def test_an_interrupted_restore_resumes_or_is_abandoned_and_leaves_no_part_file(
    backed: Ferry, settings: BackupSettings
) -> None:
    backup = Tampered(backed, settings)
    backup.interrupt(backed, "pv-retried")
    backup.resumed(backed, "pv-retried")
    # A restore given up (its volume deleted before it finished) leaves nothing either.
    volume_id = backup.interrupt(backed, "pv-abandoned")
    backed.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    assert parts(backed) == []
    assert not list((backed.base / "node-a" / "pool" / "incoming").iterdir())


def test_a_restore_interrupted_by_a_restart_resumes_and_leaves_no_part_file(
    tmp_path: Path, settings: BackupSettings
) -> None:
    with installation(tmp_path / "one", settings) as ferry:
        backup = Tampered(ferry, settings)
        backup.interrupt(ferry, "pv-restarted")
    with installation(tmp_path / "one", settings) as again:
        backup.resumed(again, "pv-restarted")
