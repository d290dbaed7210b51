"""Writing a status that answers a spec, as every reconciler does.

Invariant: a status is written only while the spec it answers is unchanged
(the txn compares the spec's revision), so a status never outlives its spec
and never claims a generation its owner did not act on. A status equal to
the one stored is not written again (no revision, no watch event).
"""

from __future__ import annotations

from typing import Any

from csi_driver.core.errors import Conflict
from csi_driver.core.records import CatalogRecord
from csi_driver.store.base import CatalogStore
from csi_driver.store.records import Versioned, put, unchanged_since


def report(
    store: CatalogStore,
    spec_read: Versioned[Any],
    current: Versioned[Any] | None,
    status: CatalogRecord,
) -> int:
    """Write ``status`` unless unchanged; the revision it was written at, or 0 (falsy)
    when the spec changed meanwhile (its event queues another pass) or nothing
    needed writing."""
    if current is not None and current.value == status:
        return 0
    try:
        return store.txn([unchanged_since(spec_read.value.key, spec_read)], [put(status)])
    except Conflict:
        return 0
