"""CSI snapshots, group snapshots, clones and restores, against the spec and csi-sanity.

kubernetes-csi/csi-test's snapshot cases (``pkg/sanity/controller.go``:
CreateSnapshot, DeleteSnapshot, ListSnapshots; ``groupcontroller.go``; the
CreateVolume content-source cases) and the CSI spec's error tables restated
as rows, against a real all-in-one Ferry on real sockets. Snapshots of
volumes that are not staged need no root: the pool's images are files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.errors import (
    GROUP_MEMBERS_MISMATCH,
    SNAPSHOT_IN_GROUP,
    SNAPSHOT_NAME_CONFLICT,
    UNKNOWN_SNAPSHOT_TOKEN,
)
from csi_driver.core.model import MiB
from csi_driver.csi.client import mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.rpc.validate import REQUIRED_MESSAGE
from tests.csi.conftest import Ferry, expect_code, node_config, running

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
SIZE = 64 * MiB
#: Ids Ferry never issued: csi-sanity's shapes, Ferry's shape, and a hostile one.
FOREIGN_SNAPSHOTS = ("reallyfakesnapshotid", "snap-" + "0" * 32, "../../../etc/passwd")
FOREIGN_VOLUMES = ("fake-vol-id-28f63c1d-a", "vol-" + "0" * 32, "../../../etc/passwd")


def snap(ferry: Ferry, name: str, volume_id: str) -> Any:
    request = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
    return ferry.client.controller.CreateSnapshot(request).snapshot


def from_snapshot(name: str, snapshot_id: str = "", volume_id: str = "", size: int = SIZE) -> Any:
    source = csi_pb2.VolumeContentSource()
    if snapshot_id:
        source.snapshot.snapshot_id = snapshot_id
    if volume_id:
        source.volume.volume_id = volume_id
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_capability()],
        volume_content_source=source,
    )


def listed(ferry: Ferry, **fields: Any) -> Any:
    return ferry.client.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(**fields))


def test_capabilities_are_advertised(ferry: Ferry) -> None:
    rpc = csi_pb2.ControllerServiceCapability.RPC
    caps = ferry.client.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()
    )
    kinds = {c.rpc.type for c in caps.capabilities}
    assert {
        rpc.CREATE_DELETE_SNAPSHOT,
        rpc.LIST_SNAPSHOTS,
        rpc.CLONE_VOLUME,
        rpc.GET_SNAPSHOT,
    } <= kinds
    plugin = ferry.client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in plugin.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in services
    group = ferry.client.group.GroupControllerGetCapabilities(
        csi_pb2.GroupControllerGetCapabilitiesRequest()
    )
    assert [c.rpc.type for c in group.capabilities] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]


@pytest.mark.parametrize(
    ("fields", "missing"),
    [
        ({"source_volume_id": "testId"}, "name"),
        ({"name": "name"}, "source_volume_id"),
        ({}, "source_volume_id"),
    ],
)
def test_create_snapshot_requires_its_fields(
    ferry: Ferry, fields: dict[str, str], missing: str
) -> None:
    details = expect_code(
        INVALID, ferry.client.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(**fields)
    )
    assert details == REQUIRED_MESSAGE.format(field=missing)


@pytest.mark.parametrize(
    ("call", "request_type", "field"),
    [
        ("DeleteSnapshot", csi_pb2.DeleteSnapshotRequest, "snapshot_id"),
        ("GetSnapshot", csi_pb2.GetSnapshotRequest, "snapshot_id"),
    ],
)
def test_snapshot_id_is_required(ferry: Ferry, call: str, request_type: Any, field: str) -> None:
    details = expect_code(INVALID, getattr(ferry.client.controller, call), request_type())
    assert details == REQUIRED_MESSAGE.format(field=field)


@pytest.mark.parametrize("foreign", FOREIGN_VOLUMES)
def test_snapshot_of_an_unknown_volume_is_not_found(ferry: Ferry, foreign: str) -> None:
    request = csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=foreign)
    expect_code(NOT_FOUND, ferry.client.controller.CreateSnapshot, request)


@pytest.mark.parametrize("foreign", FOREIGN_SNAPSHOTS)
def test_unknown_snapshot_ids(ferry: Ferry, foreign: str) -> None:
    ferry.client.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=foreign))
    request = csi_pb2.GetSnapshotRequest(snapshot_id=foreign)
    expect_code(NOT_FOUND, ferry.client.controller.GetSnapshot, request)
    assert list(listed(ferry, snapshot_id=foreign).entries) == []
    expect_code(NOT_FOUND, ferry.client.controller.CreateVolume, from_snapshot("r", foreign))


def test_create_is_idempotent_by_name_and_ready_when_taken(ferry: Ferry) -> None:
    volume = ferry.create("v1", SIZE)
    first = snap(ferry, "s1", volume.volume_id)
    assert first.ready_to_use
    assert first.size_bytes == SIZE
    assert first.source_volume_id == volume.volume_id
    assert first.creation_time.seconds > 0
    again = snap(ferry, "s1", volume.volume_id)
    assert again.snapshot_id == first.snapshot_id
    assert again.creation_time == first.creation_time
    other = ferry.create("v2", SIZE)
    details = expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        ferry.client.controller.CreateSnapshot,
        csi_pb2.CreateSnapshotRequest(name="s1", source_volume_id=other.volume_id),
    )
    assert details == SNAPSHOT_NAME_CONFLICT.format(
        name="s1", snapshot_id=first.snapshot_id, source=f"volume {volume.volume_id}"
    )
    got = ferry.client.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=first.snapshot_id)
    ).snapshot
    assert got == first


def test_list_by_id_by_source_and_in_pages(ferry: Ferry) -> None:
    volumes = [ferry.create(f"v{i}", SIZE).volume_id for i in range(3)]
    taken = [snap(ferry, f"s{i}", volumes[i % 3]).snapshot_id for i in range(5)]
    everything = listed(ferry)
    assert sorted(e.snapshot.snapshot_id for e in everything.entries) == sorted(taken)
    assert everything.next_token == ""
    by_id = listed(ferry, snapshot_id=taken[1]).entries
    assert [e.snapshot.snapshot_id for e in by_id] == [taken[1]]
    by_source = listed(ferry, source_volume_id=volumes[0]).entries
    assert sorted(e.snapshot.snapshot_id for e in by_source) == sorted([taken[0], taken[3]])
    assert list(listed(ferry, source_volume_id="vol-" + "0" * 32).entries) == []
    page = listed(ferry, max_entries=2)
    assert len(page.entries) == 2 and page.next_token
    rest = listed(ferry, starting_token=page.next_token)
    seen = [e.snapshot.snapshot_id for e in (*page.entries, *rest.entries)]
    assert sorted(seen) == sorted(taken) and len(set(seen)) == 5
    details = expect_code(
        grpc.StatusCode.ABORTED,
        ferry.client.controller.ListSnapshots,
        csi_pb2.ListSnapshotsRequest(starting_token="bogus"),
    )
    assert details == UNKNOWN_SNAPSHOT_TOKEN.format(token="bogus")
    ferry.client.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=taken[0]))
    assert len(listed(ferry).entries) == 4


def test_snapshots_outlive_their_volume_and_restore(ferry: Ferry) -> None:
    volume = ferry.create("v", SIZE)
    image = ferry.base / "node-a" / "pool" / "images" / f"{volume.volume_id}.img"
    with open(image, "r+b") as handle:
        handle.seek(5 * MiB)
        handle.write(b"point in time" * 1000)
    taken = snap(ferry, "s", volume.volume_id)
    ferry.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert not image.exists()
    assert [e.snapshot.snapshot_id for e in listed(ferry).entries] == [taken.snapshot_id]
    restored = ferry.client.controller.CreateVolume(
        from_snapshot("r", taken.snapshot_id, size=2 * SIZE)
    ).volume
    assert restored.capacity_bytes == 2 * SIZE
    assert restored.content_source.snapshot.snapshot_id == taken.snapshot_id
    copy = ferry.base / "node-a" / "pool" / "images" / f"{restored.volume_id}.img"
    data = copy.read_bytes()
    assert len(data) == 2 * SIZE
    assert data[5 * MiB : 5 * MiB + 13000] == b"point in time" * 1000
    assert data[SIZE:].count(0) == SIZE  # the growth reads as zeros
    again = ferry.client.controller.CreateVolume(
        from_snapshot("r", taken.snapshot_id, size=2 * SIZE)
    ).volume
    assert again.volume_id == restored.volume_id


@pytest.mark.parametrize(
    ("size", "code"),
    [(SIZE // 2, grpc.StatusCode.OUT_OF_RANGE), (SIZE, OK), (SIZE + 8 * MiB, OK)],
)
def test_restore_size_rules(ferry: Ferry, size: int, code: grpc.StatusCode) -> None:
    volume = ferry.create("v", SIZE)
    taken = snap(ferry, "s", volume.volume_id)
    request = from_snapshot("r", taken.snapshot_id, size=size)
    if code is OK:
        assert ferry.client.controller.CreateVolume(request).volume.capacity_bytes == size
    else:
        expect_code(code, ferry.client.controller.CreateVolume, request)


def test_clone_of_a_volume(ferry: Ferry) -> None:
    volume = ferry.create("v", SIZE)
    image = ferry.base / "node-a" / "pool" / "images" / f"{volume.volume_id}.img"
    with open(image, "r+b") as handle:
        handle.write(b"cloned" * 100)
    for foreign in FOREIGN_VOLUMES:
        request = from_snapshot(f"c-{len(foreign)}", volume_id=foreign)
        expect_code(NOT_FOUND, ferry.client.controller.CreateVolume, request)
    clone = ferry.client.controller.CreateVolume(from_snapshot("c", volume_id=volume.volume_id))
    assert clone.volume.content_source.volume.volume_id == volume.volume_id
    copy = ferry.base / "node-a" / "pool" / "images" / f"{clone.volume.volume_id}.img"
    assert copy.read_bytes() == image.read_bytes()
    source_bytes = image.read_bytes()
    # The snapshot taken only to clone is gone once the clone is made.
    assert list(listed(ferry).entries) == []
    # A repeat needs nothing of the source, which may be gone by then.
    ferry.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    again = ferry.client.controller.CreateVolume(from_snapshot("c", volume_id=volume.volume_id))
    assert again.volume.volume_id == clone.volume.volume_id
    assert copy.exists() and list(listed(ferry).entries) == []
    assert copy.read_bytes() == source_bytes
    taken = snap(ferry, "s", ferry.create("v2", SIZE).volume_id)
    other = from_snapshot("c", snapshot_id=taken.snapshot_id)
    expect_code(grpc.StatusCode.ALREADY_EXISTS, ferry.client.controller.CreateVolume, other)


def test_group_snapshots(ferry: Ferry) -> None:
    group = ferry.client.group
    missing = expect_code(
        INVALID, group.CreateVolumeGroupSnapshot, csi_pb2.CreateVolumeGroupSnapshotRequest()
    )
    assert missing == REQUIRED_MESSAGE.format(field="name")
    for call, request in (
        (group.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest()),
        (group.DeleteVolumeGroupSnapshot, csi_pb2.DeleteVolumeGroupSnapshotRequest()),
    ):
        expect_code(INVALID, call, request)
    for foreign in ("fake-group", "group-" + "0" * 32):
        group.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=foreign)
        )
        expect_code(
            NOT_FOUND,
            group.GetVolumeGroupSnapshot,
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=foreign),
        )
    volumes = [ferry.create(f"v{i}", SIZE).volume_id for i in range(2)]
    request = csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=volumes)
    made = group.CreateVolumeGroupSnapshot(request).group_snapshot
    assert made.ready_to_use
    assert sorted(s.source_volume_id for s in made.snapshots) == sorted(volumes)
    assert {s.group_snapshot_id for s in made.snapshots} == {made.group_snapshot_id}
    assert group.CreateVolumeGroupSnapshot(request).group_snapshot == made
    ids = [s.snapshot_id for s in made.snapshots]
    got = group.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=made.group_snapshot_id)
    ).group_snapshot
    assert got == made
    details = expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        ferry.client.controller.DeleteSnapshot,
        csi_pb2.DeleteSnapshotRequest(snapshot_id=ids[0]),
    )
    assert details == SNAPSHOT_IN_GROUP.format(snapshot_id=ids[0], group_id=made.group_snapshot_id)
    details = expect_code(
        INVALID,
        group.DeleteVolumeGroupSnapshot,
        csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=made.group_snapshot_id, snapshot_ids=ids[:1]
        ),
    )
    assert details == GROUP_MEMBERS_MISMATCH.format(
        group_id=made.group_snapshot_id, members=", ".join(sorted(ids))
    )
    restored = ferry.client.controller.CreateVolume(from_snapshot("r", ids[1])).volume
    assert restored.capacity_bytes == SIZE
    group.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=made.group_snapshot_id, snapshot_ids=ids
        )
    )
    assert list(listed(ferry).entries) == []
    snapshots_dir = ferry.base / "node-a" / "pool" / "snapshots"
    assert not list(snapshots_dir.glob("snap-*"))


def test_cli_creates_lists_and_deletes(ferry: Ferry) -> None:
    volume = ferry.create("v", SIZE).volume_id
    endpoint = f"unix://{ferry.base}/csi.sock"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "csi_driver.cli", "snapshot", *args, "--endpoint", endpoint],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = cli("create", "--name", "from-cli", "--volume", volume)
    assert made.returncode == 0, made.stderr
    snapshot_id = made.stdout.split()[1]
    assert f"of {volume}: ready in" in made.stdout
    table = cli("list", "--volume", volume).stdout.splitlines()
    assert table[0].split()[0] == "SNAPSHOT"
    assert table[1].split()[:4] == [snapshot_id, volume, "64Mi", "yes"]
    assert cli("delete", snapshot_id).returncode == 0
    assert len(cli("list").stdout.splitlines()) == 1
    refused = cli("create", "--name", "x", "--volume", "vol-" + "0" * 32)
    assert refused.returncode == 1
    assert "NOT_FOUND" in refused.stderr and "Traceback" not in refused.stderr


def test_a_restore_keeps_its_source_filesystem(ferry: Ferry) -> None:
    volume = ferry.create("v", SIZE)
    taken = snap(ferry, "s", volume.volume_id)
    other_fs = from_snapshot("x", taken.snapshot_id)
    other_fs.volume_capabilities[0].mount.fs_type = "xfs"
    expect_code(INVALID, ferry.client.controller.CreateVolume, other_fs)
    restored = ferry.client.controller.CreateVolume(from_snapshot("r", taken.snapshot_id))
    assert restored.volume.volume_context["fsType"] == "ext4"


def test_no_room_says_how_much_snapshots_hold(tmp_path: Path) -> None:
    """A pool of 160 MiB: a 64 MiB volume and its snapshot (charged 64 MiB) leave
    32 MiB; the next 64 MiB volume, and growing the first, are RESOURCE_EXHAUSTED
    with a message that names what snapshots hold and what to do."""
    with running(tmp_path, node_config(tmp_path, capacity=160 * MiB)) as small:
        volume_id = small.create("held", SIZE).volume_id
        snap(small, "held-snap", volume_id)
        request = csi_pb2.CreateVolumeRequest(
            name="no-room",
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
            volume_capabilities=[mount_capability()],
        )
        details = expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED, small.client.controller.CreateVolume, request
        )
        assert f"most free: {32 * MiB} bytes" in details
        assert f"snapshots hold {SIZE} bytes of it" in details
        assert "delete the VolumeSnapshots no longer needed" in details
        grow = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE + 48 * MiB),
        )
        details = expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED, small.client.controller.ControllerExpandVolume, grow
        )
        assert f"snapshots hold {SIZE} bytes of it there" in details
