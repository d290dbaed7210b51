"""The all-in-one on SQLite creates a new volume's image ahead of its records.

The image is made durable first, then one txn writes the volume (READY), its
name, its image spec, the node's READY status and the node's charge: one
commit per create. A txn that fails (the name was claimed meanwhile) drops
the image; a crash in between is covered by tests/csi/test_restart.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from csi_driver.core.model import MiB
from csi_driver.core.records import (
    IMAGE_SPECS,
    ImagePhase,
    ImageSpec,
    ImageStatus,
    NodeAccounting,
    decode,
    image_spec_key,
    image_status_key,
    node_accounting_key,
)
from csi_driver.csi.client import block_capability
from csi_driver.store.catalog import NAMES, VOLUMES, Catalog, volume_from_json
from csi_driver.store.records import read
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import NODE_ID, Ferry

THIN = {"provisioning": "thin"}


@pytest.fixture
def catalog(ferry: Ferry) -> Iterator[Catalog]:
    with closing(SqliteStore(ferry.catalog)) as store:
        yield Catalog(store)


def _pool(ferry: Ferry) -> Path:
    return ferry.base / NODE_ID / "pool" / "images"


def test_a_local_create_writes_every_record_in_one_txn(ferry: Ferry, catalog: Catalog) -> None:
    volume_id = ferry.create("pvc-one", 8 * MiB, block_capability(), THIN).volume_id
    store = catalog.store
    records = {
        key: store.get(key)
        for key in (
            VOLUMES + volume_id,
            NAMES + "pvc-one",
            image_spec_key(NODE_ID, volume_id),
            image_status_key(NODE_ID, volume_id),
            node_accounting_key(NODE_ID),
        )
    }
    revisions = {key: r.revision if r else None for key, r in records.items()}
    assert len(set(revisions.values())) == 1 and None not in revisions.values(), revisions
    stored = records[VOLUMES + volume_id]
    assert stored is not None and volume_from_json(stored.value).state.value == "ready"
    status = records[image_status_key(NODE_ID, volume_id)]
    assert status is not None
    assert decode(ImageStatus, status.value).phase is ImagePhase.READY
    assert sorted(p.name for p in _pool(ferry).iterdir()) == [
        f"{volume_id}.img",
        f"{volume_id}.json",
    ]
    # A repeat finds it; nothing more is written.
    assert ferry.create("pvc-one", 8 * MiB, block_capability(), THIN).volume_id == volume_id
    assert store.get(VOLUMES + volume_id) == stored


def test_a_name_claimed_meanwhile_drops_the_image_made_ahead(
    ferry: Ferry, catalog: Catalog
) -> None:
    """The txn loses on the name's compare: the image made for it goes, and the
    create answers with the volume the name was claimed for."""
    claimed = "vol-" + "c" * 32
    catalog.store.txn([catalog.name_absent("pvc-race")], [catalog.name_op("pvc-race", claimed)])
    made = ferry.create("pvc-race", 8 * MiB, block_capability(), THIN)
    assert made.volume_id == claimed
    specs = [decode(ImageSpec, r.value) for r in catalog.store.list(IMAGE_SPECS)]
    assert [s.volume_id for s in specs] == [claimed]
    assert sorted(p.name for p in _pool(ferry).iterdir()) == [
        f"{claimed}.img",
        f"{claimed}.json",
    ]
    account = read(catalog.store, NodeAccounting, node_accounting_key(NODE_ID))
    assert account is not None
    assert (account.value.provisioned_bytes, account.value.volume_count) == (8 * MiB, 1)
