"""Write intent, then wait for the status: the controller's side of a record.

:func:`wait_for` reads a key and, until a predicate holds for it, follows
the key's changes with a watch from the revision it read, so no change
between the read and the watch is missed. A lost watch is resumed and a
compacted history is answered by reading the key again; the wait is bounded
by the caller's deadline (the RPC's), never by the store's health.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from csi_driver.core.errors import Compacted, StoreError, StoreUnavailable, Unavailable
from csi_driver.store.base import CatalogStore, EventType, Record

#: Longest single poll, so a deadline is checked at least this often.
_POLL_S = 0.5
#: Pause before watching again after the store could not be reached.
_RETRY_S = 0.05


def read_at(store: CatalogStore, key: str) -> tuple[Record | None, int]:
    """``key``'s record (or None) and the store revision the read was served at."""
    page = store.range(key, "", 1)
    record = page.records[0] if page.records and page.records[0].key == key else None
    return record, page.revision


def wait_for(
    store: CatalogStore,
    key: str,
    predicate: Callable[[Record | None], bool],
    deadline: float,
    *,
    waiting_for: str,
) -> Record | None:
    """Return ``key``'s record (None: absent) once ``predicate`` holds for it.

    ``deadline`` is a :func:`time.monotonic` instant. When it passes first,
    raise Unavailable saying what was awaited (``waiting_for``), so the CSI
    caller retries later and finds the intent already written.
    """
    last_error = ""
    while True:
        try:
            record, revision = read_at(store, key)
            if predicate(record):
                return record
            with store.watch(key, revision + 1) as watch:
                while (remaining := deadline - time.monotonic()) > 0:
                    event = watch.poll(min(remaining, _POLL_S))
                    if event is None or event.key != key:
                        continue
                    record = (
                        None
                        if event.type is EventType.DELETE
                        else Record(key, event.value, event.revision)
                    )
                    if predicate(record):
                        return record
        except Compacted:
            pass  # history gone: the next read sees the current state
        except (StoreUnavailable, StoreError) as exc:
            last_error = f" (last catalog error: {exc.message})"
            time.sleep(min(_RETRY_S, max(0.0, deadline - time.monotonic())))
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"timed out waiting for {waiting_for} at catalog key {key!r}{last_error}; "
                "the request is recorded and a retry resumes it"
            )
