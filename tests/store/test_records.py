"""Typed records in one transaction: a volume, its image and its node's accounting."""

from __future__ import annotations

import threading

import pytest

from csi_driver.core.errors import Conflict, CorruptRecord
from csi_driver.core.model import AccessMode, AccessType, FsType, Publication, Volume, VolumeState
from csi_driver.core.records import (
    ImageSpec,
    NodeAccounting,
    VolumeSpec,
    node_accounting_key,
)
from csi_driver.store.base import CatalogStore
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import put, read, unchanged_since

NODE = "node-1"
MiB = 1 << 20


def _volume(n: int) -> tuple[VolumeSpec, ImageSpec]:
    volume_id = f"vol-{n:032x}"
    spec = VolumeSpec(volume_id, f"pvc-{n}", 64 * MiB, AccessType.MOUNT, FsType.EXT4, NODE, 1)
    return spec, ImageSpec(volume_id, NODE, 64 * MiB, 1)


def _provision(store: CatalogStore, n: int) -> None:
    """Write volume + image + charged accounting in one txn; re-read on a lost race."""
    spec, image = _volume(n)
    key = node_accounting_key(NODE)
    while True:
        account = read(store, NodeAccounting, key)
        charged = (account.value if account else NodeAccounting(NODE)).charge(image.size_bytes)
        try:
            store.txn(
                [unchanged_since(key, account), unchanged_since(spec.key, None)],
                [put(spec), put(image), put(charged)],
            )
            return
        except Conflict:
            continue


def test_a_txn_of_typed_records_reads_back_with_one_revision(store: CatalogStore) -> None:
    _provision(store, 1)
    spec, image = _volume(1)
    got_spec = read(store, VolumeSpec, spec.key)
    got_image = read(store, ImageSpec, image.key)
    account = read(store, NodeAccounting, node_accounting_key(NODE))
    assert got_spec is not None and got_spec.value == spec
    assert got_image is not None and got_image.value == image
    assert account is not None and account.value == NodeAccounting(NODE, 64 * MiB, 1)
    assert got_spec.revision == got_image.revision == account.revision
    assert read(store, ImageSpec, "spec/images/node-1/vol-" + "f" * 32) is None


def test_a_stale_accounting_read_writes_nothing(store: CatalogStore) -> None:
    key = node_accounting_key(NODE)
    _provision(store, 1)
    stale = read(store, NodeAccounting, key)
    _provision(store, 2)  # another controller thread charged the node meanwhile
    assert stale is not None
    spec, image = _volume(3)
    with pytest.raises(Conflict) as lost:
        store.txn(
            [unchanged_since(key, stale)],
            [put(spec), put(image), put(stale.value.charge(image.size_bytes))],
        )
    assert lost.value.key == key
    assert read(store, VolumeSpec, spec.key) is None
    assert read(store, ImageSpec, image.key) is None
    now = read(store, NodeAccounting, key)
    assert now is not None and now.value.volume_count == 2


def test_concurrent_provisioning_keeps_the_accounting_exact(store: CatalogStore) -> None:
    def provision_five(first: int) -> None:
        for n in range(first, first + 5):
            _provision(store, n)

    threads = [threading.Thread(target=provision_five, args=(k * 10,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120.0)
    account = read(store, NodeAccounting, node_accounting_key(NODE))
    assert account is not None
    assert account.value == NodeAccounting(NODE, 20 * 64 * MiB, 20)
    assert len(store.list("spec/images/node-1/")) == 20


def test_a_record_of_the_wrong_kind_is_refused(store: CatalogStore) -> None:
    _provision(store, 1)
    spec, _ = _volume(1)
    with pytest.raises(CorruptRecord, match="expected a ImageSpec"):
        read(store, ImageSpec, spec.key)


def test_a_catalog_older_than_accounting_is_counted_once(store: CatalogStore) -> None:
    catalog = Catalog(store)
    for n, node in enumerate(["node-1", "node-1", "node-2"]):
        spec, _ = _volume(n)
        catalog.put_volume(
            Volume(
                spec.volume_id, spec.name, (n + 1) * MiB, AccessType.MOUNT, FsType.EXT4,
                node, 1, VolumeState.READY,
                publications=(
                    (Publication(node, False, AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER),)
                    if n != 1 else ()
                ),
            )
        )  # fmt: skip
    assert catalog.backfill_accounting() == 2
    counted = {node: a.value for node, a in catalog.accounts().items()}
    assert counted == {
        "node-1": NodeAccounting("node-1", 3 * MiB, 2, published_count=1),
        "node-2": NodeAccounting("node-2", 3 * MiB, 1, published_count=1),
    }
    assert catalog.backfill_accounting() == 0  # creates since are counted by their txns
