"""The pool space snapshots take, charged to the nodes that hold them.

A snapshot copy is charged to its node's ``NodeAccounting.snapshot_bytes``
in the transaction that writes its spec, and released in the one that
removes it, so placement and GetCapacity (which read
``NodeAccounting.promised_bytes``) never promise space a snapshot may need.
Invariants:

- Each copy (the home spec and every replica node's copy) is charged its
  source volume's size: a reflink snapshot shares its blocks with the image
  at first, but every overwrite of the volume leaves the old block to the
  snapshot, so it may come to hold all of them; a copied one holds at most
  that. Charging less would let a thick volume with snapshots meet a full
  pool on an overwrite.
- Every charge compares the accounting record's revision (or its absence),
  so a concurrent CreateVolume or snapshot re-reads and neither is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from csi_driver.core.records import NodeAccounting, SnapshotSpec, node_accounting_key
from csi_driver.store.base import CatalogStore, Compare, Put
from csi_driver.store.records import put, read, unchanged_since


def snapshot_sizes(specs: Iterable[SnapshotSpec]) -> dict[str, int]:
    """Bytes each node's copies among ``specs`` are charged, by node."""
    sizes: dict[str, int] = {}
    for spec in specs:
        sizes[spec.node_id] = sizes.get(spec.node_id, 0) + spec.size_bytes
    return sizes


def charge_snapshots(
    store: CatalogStore, sizes: Mapping[str, int], *, release: bool = False
) -> tuple[list[Compare], list[Put]]:
    """The compares and writes that charge (or ``release``) ``sizes`` by node."""
    compares: list[Compare] = []
    ops: list[Put] = []
    for node_id, size in sorted(sizes.items()):
        if size == 0:
            continue
        found = read(store, NodeAccounting, node_accounting_key(node_id))
        account = found.value if found is not None else NodeAccounting(node_id)
        compares.append(unchanged_since(account.key, found))
        ops.append(put(account.snapshots(-size if release else size)))
    return compares, ops
