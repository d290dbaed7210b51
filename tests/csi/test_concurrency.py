"""Concurrent CreateVolume calls over the CSI socket."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager

import grpc
from prometheus_client import REGISTRY

from csi_driver.core.model import MiB
from csi_driver.gen import csi_pb2
from csi_driver.store.catalog import VOLUMES
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import NODE_ID, Ferry, accounted_specs, mount_capability


def create(ferry: Ferry, name: str) -> str:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_capability()],
    )
    # Retry ABORTED like the external-provisioner does; anything else fails the test.
    for _ in range(50):
        try:
            return str(ferry.client.controller.CreateVolume(request).volume.volume_id)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.ABORTED:  # type: ignore[attr-defined]
                raise
    raise AssertionError(f"CreateVolume {name} stayed ABORTED")


def images(ferry: Ferry) -> list[str]:
    return sorted(p.stem for p in (ferry.base / NODE_ID / "pool" / "images").glob("*.img"))


def listed(ferry: Ferry) -> list[str]:
    reply = ferry.client.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    return sorted(e.volume.volume_id for e in reply.entries)


def test_twenty_concurrent_creates_of_one_name_make_one_volume(ferry: Ferry) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        ids = list(pool.map(lambda _: create(ferry, "pvc-same"), range(20)))
    assert len(set(ids)) == 1
    assert listed(ferry) == images(ferry) == [ids[0]]


def test_fifty_concurrent_creates_of_different_names_all_succeed(ferry: Ferry) -> None:
    with ThreadPoolExecutor(max_workers=50) as pool:
        ids = list(pool.map(lambda i: create(ferry, f"pvc-{i}"), range(50)))
    assert len(set(ids)) == 50
    assert listed(ferry) == images(ferry) == sorted(ids)
    capacity = ferry.client.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    assert capacity.available_capacity == 2048 * MiB - 50 * 16 * MiB


def _batch_totals() -> tuple[float, float]:
    """(placement txns, creates placed in them) so far, in this process."""
    count = REGISTRY.get_sample_value("ferry_controller_placement_batch_creates_count")
    total = REGISTRY.get_sample_value("ferry_controller_placement_batch_creates_sum")
    return count or 0.0, total or 0.0


@contextmanager
def _catalog_held(ferry: Ferry, creates: int) -> Iterator[None]:
    """Another process's write transaction holds the catalog while ``creates`` creates
    made their images ahead and queued for placement behind the first one's commit."""
    other = sqlite3.connect(ferry.catalog, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        ahead = ferry.base / NODE_ID / "pool" / "images"
        deadline = time.monotonic() + 10
        while len(list(ahead.glob("*.img.ahead"))) < creates:
            assert time.monotonic() < deadline, "the creates did not make their images"
            time.sleep(0.02)
        time.sleep(0.5)  # from their images to the placement queue
    finally:
        other.execute("ROLLBACK")
        other.close()


def _accounted(ferry: Ferry) -> list[str]:
    """The node's accounting is the sum of its image specs; returns their volume ids."""
    with closing(SqliteStore(ferry.catalog)) as store:
        return sorted(s.volume_id for s in accounted_specs(store))


def test_creates_queued_behind_a_commit_are_placed_and_committed_in_one_txn(
    ferry: Ferry,
) -> None:
    """Each create charges the accounting the one before it wrote; queued ones are
    placed in turn and committed together, each still charged exactly once."""
    txns, placed = _batch_totals()
    with ThreadPoolExecutor(max_workers=6) as pool:
        with _catalog_held(ferry, 6):
            made = [pool.submit(create, ferry, f"pvc-{i}") for i in range(6)]
        ids = [future.result(timeout=30) for future in made]
    txns_after, placed_after = _batch_totals()
    assert placed_after - placed == 6
    assert txns_after - txns < 6, "no two queued creates shared a txn"
    with closing(SqliteStore(ferry.catalog)) as store:
        revisions = [store.get(VOLUMES + volume_id) for volume_id in ids]
    assert all(revisions)
    assert len({r.revision for r in revisions if r}) < 6  # shared commits
    assert listed(ferry) == images(ferry) == _accounted(ferry) == sorted(ids)


def test_a_taken_name_in_a_batch_fails_only_its_own_create(ferry: Ferry) -> None:
    """The batch's txn fails on the name another create took: that create finds the
    volume already made under its name, and the others' volumes are committed."""
    taken = create(ferry, "pvc-taken")
    with ThreadPoolExecutor(max_workers=5) as pool:
        with _catalog_held(ferry, 5):
            made = [pool.submit(create, ferry, f"pvc-{i}") for i in range(4)]
            # Placed optimistically, image first: its name's compare fails in the batch.
            again = pool.submit(create, ferry, "pvc-taken")
        ids = [future.result(timeout=30) for future in made]
        assert again.result(timeout=30) == taken
    assert len(set(ids)) == 4 and taken not in ids
    assert listed(ferry) == images(ferry) == _accounted(ferry) == sorted([taken, *ids])
    assert not list((ferry.base / NODE_ID / "pool" / "images").glob("*.ahead"))
