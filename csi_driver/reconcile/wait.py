"""Write intent, then wait for the status: the controller's side of a record.

:func:`wait_for` reads a key and, until a predicate holds for it, follows
the key's changes with a watch from the revision it read, so no change
between the read and the watch is missed. A lost watch is resumed and a
compacted history is answered by reading the key again; the wait is bounded
by the caller's deadline (the RPC's), never by the store's health.

:class:`Waiters` serves many such waits from one informer (one list, then
one watch of a whole prefix for the process's life) instead of a read and a
watch per wait: a waiter registers for its key *before* it checks the
informer's cache, and every change the informer applies to that key wakes
it at once, so a change landing between the check and the sleep is never
slept through. The cache trails the store only by the watch's delivery, and
the informer's own invariants (no event missed across a lost watch, a
re-list after compaction) carry over to every waiter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from csi_driver.core.errors import Compacted, StoreError, StoreUnavailable, Unavailable
from csi_driver.reconcile.informer import Informer
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


def _timed_out(waiting_for: str, key: str, last_error: str = "") -> Unavailable:
    return Unavailable(
        f"timed out waiting for {waiting_for} at catalog key {key!r}{last_error}; "
        "the request is recorded and a retry resumes it"
    )


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
            raise _timed_out(waiting_for, key, last_error)


class Waiters:
    """Waits on the keys under ``prefix``, all fed by one informer started on first use.

    Until the informer's first list is in (a catalog that is down at start),
    a wait falls back to :func:`wait_for`, which reads the store itself.
    """

    def __init__(self, store: CatalogStore, prefix: str) -> None:
        self._store = store
        self._informer = Informer(store, prefix)
        self._informer.subscribe(self._changed)
        self._lock = threading.Lock()
        self._started = False
        self._waiting: dict[str, set[threading.Event]] = {}

    def _changed(self, key: str) -> None:
        with self._lock:
            for woken in self._waiting.get(key, ()):
                woken.set()

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._informer.start()

    def wait(
        self,
        key: str,
        predicate: Callable[[Record | None], bool],
        deadline: float,
        *,
        waiting_for: str,
    ) -> Record | None:
        """As :func:`wait_for`, served from the shared informer."""
        self._start()
        if not self._informer.wait_synced(max(0.0, deadline - time.monotonic())):
            return wait_for(self._store, key, predicate, deadline, waiting_for=waiting_for)
        woken = threading.Event()
        with self._lock:
            self._waiting.setdefault(key, set()).add(woken)
        try:
            while True:
                woken.clear()
                record = self._informer.get(key)
                if predicate(record):
                    return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _timed_out(waiting_for, key)
                woken.wait(remaining)
        finally:
            with self._lock:
                waiting = self._waiting[key]
                waiting.discard(woken)
                if not waiting:
                    del self._waiting[key]

    def close(self) -> None:
        self._informer.stop()
