"""The typed catalog over a real SQLite store."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from csi_driver.core.errors import FailedPrecondition, NotFound
from csi_driver.core.model import (
    AccessMode,
    AccessType,
    FsType,
    NodeRecord,
    Publication,
    Topology,
    Volume,
    VolumeState,
)
from csi_driver.store.catalog import Catalog
from csi_driver.store.sqlite import SqliteStore


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    store = SqliteStore(tmp_path / "c.db")
    yield Catalog(store)
    store.close()


def _volume(volume_id: str = "vol-" + "a" * 32, name: str = "pvc-1") -> Volume:
    return Volume(
        volume_id=volume_id,
        name=name,
        capacity_bytes=1 << 30,
        access_type=AccessType.MOUNT,
        fs_type=FsType.XFS,
        primary_node="n1",
        epoch=3,
        state=VolumeState.READY,
        parameters=(("fsType", "xfs"), ("replicas", "1")),
        publications=(
            Publication("n1", True, AccessType.MOUNT, AccessMode.SINGLE_NODE_READER_ONLY),
        ),
        created_at=12.5,
    )


def test_volume_round_trip(catalog: Catalog) -> None:
    volume = _volume()
    catalog.put_volume(volume)
    assert catalog.get_volume(volume.volume_id) == volume
    with pytest.raises(NotFound):
        catalog.require_volume("vol-" + "b" * 32)


def test_node_round_trip_and_heartbeat(catalog: Catalog) -> None:
    node = NodeRecord("n1", "unix:///tmp/a.sock", Topology.of({"z": "a"}), 10, 4, 1.0)
    catalog.register_node(node)
    catalog.heartbeat("n1", 99.0)
    assert catalog.get_node("n1") == replace(node, heartbeat_at=99.0)
    assert catalog.list_nodes() == [replace(node, heartbeat_at=99.0)]
    with pytest.raises(NotFound):
        catalog.heartbeat("ghost", 1.0)


def test_heartbeat_carries_the_abnormal_volumes(catalog: Catalog) -> None:
    node = NodeRecord("n1", "unix:///a.sock", Topology.of({"zone": "z"}), 10, 0)
    catalog.register_node(node)
    catalog.heartbeat("n1", 5.0, {"vol-b": "pool short", "vol-a": "fs errors"})
    stored = catalog.get_node("n1")
    assert stored is not None
    assert stored.volume_conditions == (("vol-a", "fs errors"), ("vol-b", "pool short"))
    catalog.heartbeat("n1", 6.0)  # healthy again: the next beat clears them
    assert catalog.get_node("n1") == replace(node, heartbeat_at=6.0)


def test_name_claim_is_first_come(catalog: Catalog) -> None:
    assert catalog.claim_name("pvc-x", "vol-1") == "vol-1"
    assert catalog.claim_name("pvc-x", "vol-2") == "vol-1"
    assert catalog.volume_id_for_name("pvc-x") == "vol-1"


def test_update_volume_refusal_leaves_record_untouched(catalog: Catalog) -> None:
    volume = _volume()
    catalog.put_volume(volume)

    def refuse(v: Volume) -> Volume:
        raise FailedPrecondition("no")

    with pytest.raises(FailedPrecondition):
        catalog.update_volume(volume.volume_id, refuse)
    assert catalog.get_volume(volume.volume_id) == volume
    grown = catalog.update_volume(volume.volume_id, lambda v: replace(v, capacity_bytes=2 << 30))
    assert grown.capacity_bytes == 2 << 30


def test_delete_volume_releases_its_name_only(catalog: Catalog) -> None:
    volume = _volume()
    catalog.put_volume(volume)
    catalog.claim_name(volume.name, volume.volume_id)
    catalog.delete_volume(volume)
    assert catalog.get_volume(volume.volume_id) is None
    assert catalog.volume_id_for_name(volume.name) is None


def test_list_volumes_paginates_in_id_order(catalog: Catalog) -> None:
    ids = [f"vol-{i:032x}" for i in (3, 1, 2)]
    for i, vid in enumerate(ids):
        catalog.put_volume(_volume(vid, f"n{i}"))
    assert [v.volume_id for v in catalog.list_volumes()] == sorted(ids)
    first = catalog.list_volumes(limit=2)
    rest = catalog.list_volumes(start_after=first[-1].volume_id)
    assert [v.volume_id for v in first + rest] == sorted(ids)
