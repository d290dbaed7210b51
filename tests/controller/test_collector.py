"""The leader's garbage collector on a real SQLite catalog and a real node pool.

Intents are written by the controller's own code (``ImageIntents``) and then
left, as a controller killed mid-RPC leaves them; the node's real image
reconciler acts on them; the collector must settle each exactly as the RPC
would have, and write nothing once its leadership is gone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.controller.collector import Collector, Sweep
from csi_driver.controller.images import Deposed, ImageIntents
from csi_driver.core.errors import Unavailable
from csi_driver.core.model import AccessType, FsType, GiB, MiB, Volume, VolumeState
from csi_driver.core.records import ImageSpec, NodeAccounting, node_accounting_key
from csi_driver.node.agent import NodeAgent
from csi_driver.node.reconcile.images import ImageReconciler
from csi_driver.store.catalog import Catalog
from csi_driver.store.leader import LeaderElection, leader_key
from csi_driver.store.records import put, read
from csi_driver.store.sqlite import SqliteStore
from tests.node.conftest import new_volume_id

SIZE = 8 * MiB


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    store = SqliteStore(tmp_path / "catalog.db")
    yield Catalog(store)
    store.close()


@pytest.fixture
def election(catalog: Catalog) -> Iterator[LeaderElection]:
    with catalog.store.election("controller", "leader-a") as leading:
        assert leading.campaign(timeout=5)
        yield leading


@pytest.fixture
def collector(catalog: Catalog, election: LeaderElection) -> Collector:
    return Collector(catalog, election.fence)


def _intend(catalog: Catalog, n: int, size: int = SIZE) -> Volume:
    """A create's intent as CreateVolume writes it, whose RPC then died."""
    volume = Volume(
        volume_id=new_volume_id(n),
        name=f"pvc-{n}",
        capacity_bytes=size,
        access_type=AccessType.MOUNT,
        fs_type=FsType.EXT4,
        primary_node="node-a",
        epoch=1,
        state=VolumeState.CREATING,
    )
    image = ImageSpec(volume.volume_id, "node-a", size, 1, thin=True)
    ImageIntents(catalog).provision(
        volume, image, catalog.accounts().get("node-a"), claim_name=True
    )
    return volume


def _account(catalog: Catalog) -> NodeAccounting:
    found = read(catalog.store, NodeAccounting, node_accounting_key("node-a"))
    return found.value if found else NodeAccounting("node-a")


def _gone(catalog: Catalog, volume: Volume) -> bool:
    return (
        catalog.get_volume(volume.volume_id) is None
        and catalog.volume_id_for_name(volume.name) is None
        and catalog.read_image("node-a", volume.volume_id) is None
        and catalog.store.get(ImageSpec(volume.volume_id, "node-a", 0, 1).status_key) is None
    )


def test_a_create_the_node_finished_is_marked_ready(
    catalog: Catalog, collector: Collector, agent: NodeAgent
) -> None:
    volume = _intend(catalog, 1)
    assert collector.sweep() == Sweep()  # the node has not acted: nothing to decide
    ImageReconciler(catalog.store, agent)(volume.volume_id)
    assert collector.sweep() == Sweep(finished=1)
    stored = catalog.read_volume(volume.volume_id, stored=True)
    assert stored is not None and stored.value.state is VolumeState.READY
    assert collector.sweep() == Sweep()
    assert _account(catalog) == NodeAccounting("node-a", SIZE, 1)


def test_a_create_the_node_refused_leaves_nothing(
    catalog: Catalog, collector: Collector, agent: NodeAgent
) -> None:
    volume = _intend(catalog, 2, size=64 * GiB)  # larger than the 4 GiB pool: too-large
    ImageReconciler(catalog.store, agent)(volume.volume_id)
    assert collector.sweep() == Sweep(rolled_back=1)
    assert _gone(catalog, volume)
    assert _account(catalog) == NodeAccounting("node-a", 0, 0)


def test_a_delete_the_node_finished_is_completed(
    catalog: Catalog, collector: Collector, agent: NodeAgent
) -> None:
    volume = _intend(catalog, 3)
    reconcile = ImageReconciler(catalog.store, agent)
    reconcile(volume.volume_id)
    collector.sweep()
    read_as = catalog.read_volume(volume.volume_id)
    assert read_as is not None
    intents = ImageIntents(catalog, wait_s=0.5)
    try:
        with pytest.raises(Unavailable):  # the RPC gives up waiting: DELETING stays
            intents.delete(read_as)
    finally:
        intents.close()  # its status watch, started by the wait
    assert catalog.require_volume(volume.volume_id).state is VolumeState.DELETING
    reconcile(volume.volume_id)
    assert collector.sweep() == Sweep(deleted=1)
    assert _gone(catalog, volume)
    assert agent.pool.get(volume.volume_id) is None
    assert _account(catalog) == NodeAccounting("node-a", 0, 0)


def test_an_image_spec_without_a_volume_is_deleted_and_uncharged(
    catalog: Catalog, collector: Collector, agent: NodeAgent
) -> None:
    spec = ImageSpec(new_volume_id(4), "node-a", SIZE, 1, thin=True)
    catalog.store.txn([], [put(spec), put(NodeAccounting("node-a", SIZE, 1))])
    reconcile = ImageReconciler(catalog.store, agent)
    reconcile(spec.volume_id)
    assert agent.pool.get(spec.volume_id) is not None
    assert collector.sweep() == Sweep(orphans=1)  # marked deleted
    reconcile(spec.volume_id)
    assert agent.pool.get(spec.volume_id) is None
    assert collector.sweep() == Sweep(orphans=1)  # records removed, charge released
    assert catalog.read_image("node-a", spec.volume_id) is None
    assert catalog.store.get(spec.status_key) is None
    assert _account(catalog) == NodeAccounting("node-a", 0, 0)


def test_a_deposed_leader_writes_nothing(
    catalog: Catalog, collector: Collector, agent: NodeAgent
) -> None:
    volume = _intend(catalog, 5)
    ImageReconciler(catalog.store, agent)(volume.volume_id)
    # A newer leader took the key (as after this one's lease lapsed unnoticed).
    catalog.store.put(leader_key("controller"), b"leader-b")
    with pytest.raises(Deposed):
        collector.sweep()
    stored = catalog.read_volume(volume.volume_id, stored=True)
    assert stored is not None and stored.value.state is VolumeState.CREATING


def _settled(collector: Collector, want: Sweep, timeout: float = 60.0) -> Sweep:
    """Passes over what changed until one did ``want``'s work (the caches trail the store)."""
    ends = time.monotonic() + timeout
    while True:
        done = collector.settle_changed()
        if done == want or time.monotonic() > ends:
            return done
        time.sleep(0.05)


def _echoed(collector: Collector, writes: int, timeout: float = 60.0) -> None:
    """Passes until the collector has looked at its own ``writes`` volume writes, which
    its caches receive some time after it made them: later passes then look at what
    changes next alone (the echoes would otherwise be counted with it)."""
    ends = time.monotonic() + timeout
    seen = 0
    while seen < writes:
        assert time.monotonic() < ends, f"the collector saw {seen} of its {writes} writes"
        done = collector.settle_changed()
        assert done == Sweep()  # its own READY writes leave nothing to do
        seen += done.examined
        time.sleep(0.05)


def test_running_it_looks_only_at_what_changed_and_batches_ready(
    catalog: Catalog, election: LeaderElection, agent: NodeAgent
) -> None:
    reconcile = ImageReconciler(catalog.store, agent)
    existing = [_intend(catalog, n) for n in range(10, 22)]
    for volume in existing:
        reconcile(volume.volume_id)
    collector = Collector(catalog, election.fence, resync_s=3600)
    collector.start()
    try:
        assert collector.wait_synced(10)
        collector.resync()
        first = collector.settle_changed()  # every cached record, one txn for all READY
        assert first == Sweep(finished=len(existing))
        assert first.examined == 2 * len(existing)
        assert all(v.state is VolumeState.READY for v in catalog.list_volumes(stored=True))
        _echoed(collector, len(existing))
        volume = _intend(catalog, 30)
        reconcile(volume.volume_id)
        done = _settled(collector, Sweep(finished=1))
        assert done == Sweep(finished=1)
        assert done.examined <= 2  # that volume and its image spec, not the catalog
        stored = catalog.read_volume(volume.volume_id, stored=True)
        assert stored is not None and stored.value.state is VolumeState.READY
        assert collector.settle_changed() == Sweep()
        assert _account(catalog) == NodeAccounting("node-a", 13 * SIZE, 13)
    finally:
        collector.stop()
