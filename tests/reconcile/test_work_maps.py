"""Which catalog changes queue work for the move and replica reconcilers.

Both reconcilers act on a few volumes only (those moving; a node's replicas),
but follow prefixes that hold a record for every volume. Their key maps
decide from their informers' caches, so neither the changes of the other
volumes nor a resync over every cached key reads the catalog. These tests
show that what they skip is only what the reconciler would do nothing for,
and that a change the cache has not caught up with is picked up by the
event that brings it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.controller.moves import move_work
from csi_driver.core.records import (
    MOVE_SPECS,
    ImageRole,
    ImageSpec,
    MoveSpec,
    export_status_key,
    image_spec_key,
    image_specs_on,
    image_status_key,
)
from csi_driver.node.reconcile.replicas import replica_work
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.runner import strip_prefix
from csi_driver.store.base import CatalogStore, Delete
from csi_driver.store.records import put
from csi_driver.store.url import open_store
from tests.reconcile.conftest import SETTLE_S, eventually

NODE = "node-b"
MiB = 1 << 20
MOVING, STILL = "vol-" + "1" * 32, "vol-" + "2" * 32
R, P, X, BAD = ("vol-" + c * 32 for c in "abcd")


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[CatalogStore]:
    store = open_store(str(tmp_path / "catalog.db"))
    yield store
    store.close()


def _synced(store: CatalogStore, prefix: str) -> Informer:
    informer = Informer(store, prefix, poll_s=0.05)
    informer.start()
    assert informer.wait_synced(SETTLE_S)
    return informer


def test_statuses_queue_a_move_only_for_a_volume_that_has_one(sqlite: CatalogStore) -> None:
    sqlite.txn([], [put(MoveSpec(MOVING, "node-a", NODE, 1))])
    specs = _synced(sqlite, MOVE_SPECS)
    try:
        to_work = move_work(specs)
        assert to_work(image_status_key(NODE, MOVING)) == MOVING
        assert to_work(export_status_key("node-a", MOVING)) == MOVING
        assert to_work(image_status_key(NODE, STILL)) is None
        assert to_work(export_status_key("node-a", STILL)) is None
        assert to_work("status/images/") is None  # not a volume's key

        # A move requested later: once its spec is cached, its statuses count.
        revision = sqlite.txn([], [put(MoveSpec(STILL, "node-a", NODE, 1))])
        eventually(lambda: specs.revision >= revision, "the move spec's event")
        assert to_work(image_status_key(NODE, STILL)) == STILL
    finally:
        specs.stop()


def test_a_node_queues_replica_work_only_for_its_replicas(sqlite: CatalogStore) -> None:
    replica = ImageSpec(R, NODE, 16 * MiB, 1, role=ImageRole.REPLICA, source_node="node-a")
    primary = ImageSpec(P, NODE, 16 * MiB, 1)
    elsewhere = ImageSpec(X, "node-a", 16 * MiB, 1, role=ImageRole.REPLICA)
    sqlite.txn([], [put(replica), put(primary), put(elsewhere)])
    sqlite.put(image_spec_key(NODE, BAD), b"not a record")
    specs = _synced(sqlite, image_specs_on(NODE))
    try:
        of_specs = replica_work(specs, NODE, strip_prefix(image_specs_on(NODE)))
        of_exports = replica_work(specs, NODE)
        assert of_specs(replica.key) == R
        assert of_exports(export_status_key("node-a", R)) == R
        assert of_specs(primary.key) is None
        assert of_exports(export_status_key("node-a", P)) is None
        assert of_exports(export_status_key("node-c", X)) is None  # not on this node
        # A record that does not decode goes to the reconciler, which reports it.
        assert of_specs(image_spec_key(NODE, BAD)) == BAD

        # A primary demoted to a replica (a move or failover away) counts from its change;
        # a replica's spec removed leaves nothing to do.
        revision = sqlite.txn(
            [],
            [
                put(ImageSpec(P, NODE, 16 * MiB, 2, role=ImageRole.REPLICA)),
                Delete(replica.key),
            ],
        )
        eventually(lambda: specs.revision >= revision, "the specs' events")
        assert of_specs(primary.key) == P
        assert of_specs(replica.key) is None
    finally:
        specs.stop()
