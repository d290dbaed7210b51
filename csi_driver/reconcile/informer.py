"""An informer: a local cache of one key prefix, kept current by list + watch.

Invariants:

- The cache converges to the store: after any sequence of writes, lost
  watches and compactions, once the store is quiet and reachable the cache
  holds exactly the store's records under the prefix.
- Nothing is missed across a lost watch: the watch is resumed from the
  revision after the last one delivered (the store's contract delivers each
  revision whole, so no event is repeated or skipped).
- The informers of one prefix in a process share one store watch
  (``store.watch.WatchHub``): each event is received and decoded once, and
  each informer still sees the store's contract from its own revision.
- When that history was compacted, the informer lists the prefix again and
  reports every key whose record appeared, changed or vanished meanwhile.
- Per key the cache only moves forward: an event older than the record
  already cached (replayed after a paged list) is ignored.
- Subscribers are told *which key* changed, never given the value: they
  read the current state when they act (level-triggered), so a burst of
  changes costs one reconcile.
- With an ``index`` (a key's group, e.g. its volume), :meth:`Informer.indexed`
  returns exactly the cached records of one group: the index changes with the
  cache, under the same lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from csi_driver.core.errors import Compacted, StoreError, StoreUnavailable
from csi_driver.metrics import INFORMER_LISTS, INFORMER_RESUMES
from csi_driver.store.base import CatalogStore, Event, EventType, Record, Watch
from csi_driver.store.watch import shared_watches

log = logging.getLogger(__name__)

Subscriber = Callable[[str], None]
#: A cached key's group for :meth:`Informer.indexed` (None: in no group).
IndexKey = Callable[[str], str | None]


class Informer:
    """Caches the records under ``prefix`` and tells subscribers which keys changed."""

    def __init__(
        self,
        store: CatalogStore,
        prefix: str,
        *,
        page_size: int = 500,
        poll_s: float = 0.5,
        retry_s: float = 0.2,
        max_retry_s: float = 5.0,
        index: IndexKey | None = None,
    ) -> None:
        self._store = store
        self._index_key = index
        # group -> the cached keys in it (kept only with an ``index``)
        self._index: dict[str, set[str]] = {}
        self.prefix = prefix
        self._page_size = page_size
        self._poll_s = poll_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._lock = threading.Lock()
        self._cache: dict[str, Record] = {}
        self._subscribers: list[Subscriber] = []
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None
        self._next_revision = 0
        self._applied = 0
        #: how many full lists ran (the first one, then one per compaction)
        self.lists = 0
        #: how many times a lost watch was resumed without a list
        self.resumes = 0

    # -- reading ---------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        with self._lock:
            return self._cache.get(key)

    def indexed(self, group: str) -> list[Record]:
        """The cached records whose key the ``index`` puts in ``group``, in key order."""
        with self._lock:
            return [self._cache[k] for k in sorted(self._index.get(group, ()))]

    def cached_keys(self) -> list[str]:
        with self._lock:
            return sorted(self._cache)

    def records(self) -> list[Record]:
        with self._lock:
            return [self._cache[k] for k in sorted(self._cache)]

    @property
    def revision(self) -> int:
        """The newest store revision the cache has applied."""
        with self._lock:
            return self._applied

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber(key)`` for each key that changes (register before start)."""
        self._subscribers.append(subscriber)

    def wait_synced(self, timeout: float) -> bool:
        """True once the first list is in the cache."""
        return self._synced.wait(timeout)

    # -- running ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("an informer starts once")
        self._thread = threading.Thread(
            target=self._run, name=f"informer:{self.prefix}", daemon=True
        )
        self._thread.start()

    def reconnect(self) -> None:
        """End this informer's watch as a lost one would; it resumes where it stopped.

        Only this informer's subscription ends: the process's shared stream of the
        prefix stays open for the other informers, and the resumed watch joins it
        again (catching up on its own if the stream moved on meanwhile). For
        proving that resuming misses nothing, and for :meth:`stop`.
        """
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.close()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop watching and join the thread; True when it ended within ``timeout``."""
        self._stop.set()
        self.reconnect()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        must_list = True
        delay = self._retry_s
        while not self._stop.is_set():
            try:
                if must_list:
                    self._list()
                    must_list = False
                self._follow()
                delay = self._retry_s
            except Compacted as exc:
                log.info(
                    "watch history compacted; listing again",
                    extra={"prefix": self.prefix, "compact_revision": exc.compact_revision},
                )
                must_list = True
            except (StoreUnavailable, StoreError) as exc:
                log.warning(
                    "catalog watch lost; resuming",
                    extra={"prefix": self.prefix, "error": str(exc), "retry_s": delay},
                )
                self._stop.wait(delay)
                delay = min(self._max_retry_s, delay * 2)

    def _list(self) -> None:
        fresh: dict[str, Record] = {}
        start_after = ""
        first_revision = None
        while True:
            page = self._store.range(self.prefix, start_after, self._page_size)
            if first_revision is None:
                first_revision = page.revision
            fresh.update((r.key, r) for r in page.records)
            if not page.more or not page.records:
                break
            start_after = page.records[-1].key
        assert first_revision is not None
        with self._lock:
            old = self._cache
            self._cache = fresh
            self._index = {}
            for key in fresh:
                self._indexed(key, present=True)
            self._next_revision = first_revision + 1
            self._applied = first_revision
            self.lists += 1
        INFORMER_LISTS.labels(self.prefix).inc()
        changed = [k for k in fresh if k not in old or old[k].revision != fresh[k].revision]
        vanished = [k for k in old if k not in fresh]
        self._synced.set()
        for key in sorted(changed + vanished):
            self._notify(key)

    def _follow(self) -> None:
        watch = shared_watches(self._store).watch(self.prefix, self._next_revision)
        with self._lock:
            self._watch = watch
        if self._stop.is_set():
            watch.close()
        try:
            while not self._stop.is_set():
                event = watch.poll(self._poll_s)
                if event is None:
                    if watch.closed:
                        return
                    continue
                if self._apply(event):
                    self._notify(event.key)
        finally:
            # The watch knows what it delivered, down to a revision half consumed.
            lost = not self._stop.is_set()
            with self._lock:
                self._watch = None
                self._next_revision = watch.next_revision
                self.resumes += lost
            if lost:
                INFORMER_RESUMES.labels(self.prefix).inc()
            watch.close()

    def _apply(self, event: Event) -> bool:
        """Fold ``event`` into the cache; False when it is older than what is cached."""
        with self._lock:
            self._applied = max(self._applied, event.revision)
            cached = self._cache.get(event.key)
            if cached is not None and cached.revision >= event.revision:
                return False
            if event.type is EventType.DELETE:
                self._indexed(event.key, present=False)
                return self._cache.pop(event.key, None) is not None
            self._cache[event.key] = Record(event.key, event.value, event.revision)
            self._indexed(event.key, present=True)
            return True

    def _indexed(self, key: str, *, present: bool) -> None:
        """Keep ``key``'s group current (under ``_lock``)."""
        group = self._index_key(key) if self._index_key is not None else None
        if group is None:
            return
        if present:
            self._index.setdefault(group, set()).add(key)
            return
        keys = self._index.get(group)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._index[group]

    def _notify(self, key: str) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(key)
            except Exception:
                # A subscriber's bug must not end the watch that every other one relies on.
                log.exception("informer subscriber failed", extra={"prefix": self.prefix})
