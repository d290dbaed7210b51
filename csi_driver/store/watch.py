"""Watches fed by a stream: a reader thread queues, :meth:`poll` hands out.

:class:`StreamWatch` is used by the etcd backend and the catalog service
client; :class:`WatchHub` shares one such stream per prefix among the
watches of a process (the informers). Invariant: each
queued batch holds whole revisions and says where the stream stands after
it, so ``next_revision`` is the first undelivered event's revision, or that
position once everything received was delivered. A failure is queued
behind the events that preceded it: the consumer sees every event the
stream delivered before it sees the error.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
import weakref
from collections import deque
from typing import Protocol

from csi_driver.core.errors import FerryError, InvalidArgument, StoreError, StoreUnavailable
from csi_driver.store.base import CatalogStore, Event, Watch

#: A batch of whole revisions and the revision the stream stands at after it.
Batch = tuple[list[Event], int]


class Sink(Protocol):
    """Where a forwarded :class:`StreamWatch` hands its batches and its failure."""

    def batch(self, events: list[Event], after: int) -> None: ...

    def failed(self, error: FerryError) -> None: ...


class StreamWatch(Watch):
    """A watch whose events arrive through :meth:`_deliver` from a reader thread."""

    def __init__(self, start_revision: int) -> None:
        self._queue: queue.Queue[Batch | FerryError] = queue.Queue()
        self._buffer: deque[Event] = deque()
        self._after = start_revision
        # Events below this revision are not delivered (a shared stream's subscriber
        # joins it mid-way, or after catching up on a watch of its own).
        self._floor = start_revision
        self._failure: FerryError | None = None
        self._closed = threading.Event()
        # Set by :meth:`forward`; the lock orders forwarding against the reader thread.
        self._sink: Sink | None = None
        self._sink_lock = threading.Lock()

    @abc.abstractmethod
    def _end_stream(self) -> None:
        """Stop the reader thread's stream (called once, by :meth:`close`)."""

    def _deliver(self, events: list[Event], after: int) -> None:
        with self._sink_lock:
            if self._sink is None:
                self._queue.put((events, after))
            else:
                self._sink.batch(events, after)

    def _fail(self, error: FerryError) -> None:
        with self._sink_lock:
            if self._sink is None:
                self._queue.put(error)
            else:
                self._sink.failed(error)

    def forward(self, sink: Sink) -> None:
        """Hand what is queued, then each batch and failure as it arrives, to ``sink``
        on the reader thread instead of to :meth:`poll` (a shared stream's fan-out:
        no thread of its own, no second queue). Called once, before any poll."""
        with self._sink_lock:
            if self._buffer:
                sink.batch(list(self._buffer), self._after)
                self._buffer.clear()
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, FerryError):
                    sink.failed(item)
                elif item[0]:
                    sink.batch(*item)
            self._sink = sink

    def _await_start(self, timeout: float, what: str) -> None:
        """Wait for the stream's first batch (its confirmation); raise what it reports."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise StoreUnavailable(
                f"{what} was not confirmed within {timeout:g}s; watch again"
            ) from None
        if isinstance(first, FerryError):
            self.close()
            raise first
        self._buffer.extend(first[0])
        self._after = max(self._after, first[1])

    @property
    def next_revision(self) -> int:
        return self._buffer[0].revision if self._buffer else self._after

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def poll(self, timeout: float | None = None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed.is_set():
            if self._buffer:
                return self._buffer.popleft()
            if self._failure is not None:
                raise self._failure
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                return None
            if isinstance(item, FerryError):
                self._failure = item
            else:
                floor = self._floor
                self._buffer.extend(e for e in item[0] if e.revision >= floor)
                self._after = max(self._after, item[1])
        return None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(([], self._after))  # wake a poll blocked on the queue
        self._end_stream()


class _Subscriber(StreamWatch):
    """One caller's watch on a shared stream (see :class:`WatchHub`).

    A subscriber that joined behind the stream's position first reads its own
    store watch (``private``) and switches to the stream's batches at the first
    revision the stream also delivers: everything before that revision came from
    the private watch, everything from it on comes from the stream, so each event
    is delivered once. Until that revision appears the stream's batches wait in
    the queue. A subscriber that joined ahead of the stream's position drops the
    stream's events below its own revision (the floor).
    """

    def __init__(self, stream: _SharedStream, from_revision: int) -> None:
        super().__init__(from_revision)
        self._stream = stream
        self._private: Watch | None = None
        self._switch_at = 0

    def _catch_up(self, private: Watch, switch_at: int) -> None:
        self._private, self._switch_at = private, switch_at

    @property
    def next_revision(self) -> int:
        private = self._private
        return private.next_revision if private is not None else super().next_revision

    def poll(self, timeout: float | None = None) -> Event | None:
        private = self._private
        if private is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            event = private.poll(timeout)
            if event is None:
                return None
            if event.revision < self._switch_at:
                return event
            # The private watch delivered every revision before this one, and none
            # after the switch point; the stream's queue holds every event from the
            # switch point on, so it resumes exactly here.
            self._after = max(self._after, event.revision)
            self._private = None
            private.close()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        return super().poll(timeout)

    def _end_stream(self) -> None:
        self._stream.leave(self)
        private = self._private
        if private is not None:
            private.close()


class _SharedStream:
    """One store stream watch on ``prefix`` and the subscribers it feeds; the watch
    forwards its batches here from its reader thread.

    Invariant (under ``_lock``): ``_position`` is the revision fanned out up to, and
    every subscriber's queue has received every batch fanned out since it joined;
    batches hold whole revisions.
    """

    def __init__(self, hub: WatchHub, store: CatalogStore, prefix: str) -> None:
        self._hub = hub
        self._store = store
        self.prefix = prefix
        self._lock = threading.Lock()
        self._opening = threading.Lock()
        self._watch: Watch | None = None
        self._subscribers: list[_Subscriber] = []
        self._position = 0
        self._ended = False

    def join(self, from_revision: int) -> Watch | None:
        """A subscriber from ``from_revision`` on; None when this stream has ended.

        A store whose watch is no stream (SQLite's, which already reads every
        commit once for all the watches of a process) gets that watch back as it
        is, and its hub stops sharing (see :attr:`WatchHub.sharing`).
        """
        with self._opening:
            opened = None
            if self._watch is None and not self._ended:
                try:
                    opened = self._store.watch(self.prefix, from_revision)
                except BaseException:
                    # What the store raised (Compacted, StoreUnavailable) is the caller's;
                    # this stream never started, and the next joiner starts another.
                    with self._lock:
                        self._ended = True
                    self._hub._forget(self)
                    raise
            if opened is not None and not isinstance(opened, StreamWatch):
                with self._lock:
                    self._ended = True
                self._hub._unshared(self)
                return opened
            with self._lock:
                if self._ended:
                    return None
                if opened is not None:
                    self._watch, self._position = opened, opened.next_revision
                subscriber = _Subscriber(self, from_revision)
                behind = from_revision < self._position
                switch_at = self._position
                self._subscribers.append(subscriber)
            if opened is not None:
                # Fed once its opener subscribed, so the opener is never behind it;
                # batches arrive on the stream's reader thread.
                opened.forward(self)
        if behind:
            try:
                subscriber._catch_up(self._store.watch(self.prefix, from_revision), switch_at)
            except BaseException:
                subscriber.close()
                raise
        return subscriber

    def leave(self, subscriber: _Subscriber) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)
            last = not self._subscribers and not self._ended
            if last:
                self._ended = True
        if last:
            self._close()

    def _close(self) -> None:
        self._hub._forget(self)
        watch = self._watch
        if watch is not None:
            watch.close()

    def batch(self, events: list[Event], after: int) -> None:
        """Fan one batch of whole revisions out (see the class invariant)."""
        with self._lock:
            self._position = after
            for subscriber in self._subscribers:
                subscriber._deliver(events, after)

    def failed(self, error: FerryError) -> None:
        """The store watch ended: every subscriber gets ``error``; a new stream starts
        with the next join."""
        with self._lock:
            self._ended = True
            failed, self._subscribers = self._subscribers, []
        for subscriber in failed:
            subscriber._fail(error)
        self._close()


class WatchHub:
    """Shares one store watch per prefix among the watches of a process.

    ``watch(prefix, from_revision)`` keeps the store's contract (every event
    from ``from_revision`` on, in order, each once; whole revisions; a lost
    stream raises ``StoreUnavailable`` once what it received is consumed),
    with one decided difference about compaction (docs/decisions/0004):

    - a caller at or ahead of the shared stream's position is served by the
      stream, which has followed the prefix without a break since before
      ``from_revision``: it gets those events even if the store compacted
      that history meanwhile (the history is not lost to it);
    - a caller behind the stream's position catches up on a watch of its own
      and gets ``Compacted`` exactly when the store would say so;
    - when the shared stream fails (lost, or compacted before it started),
      every subscriber gets that error; each resumes by watching again from
      its own ``next_revision``, and the first one starts a new stream.
    """

    def __init__(self, store: CatalogStore) -> None:
        # Weak: the registry of hubs must not keep a store alive (an open stream does).
        self._store = weakref.ref(store)
        self._lock = threading.Lock()
        self._streams: dict[str, _SharedStream] = {}
        self._sharing = True

    @property
    def sharing(self) -> bool:
        """False once the store's watches proved not to be streams (an embedded
        store's: they share their source already, and a shared stream would only
        add a thread hop); its watches are then the store's own."""
        return self._sharing

    def watch(self, prefix: str, from_revision: int) -> Watch:
        store = self._store()
        if store is None:
            raise StoreError("the catalog store of this watch hub was closed and released")
        if not self._sharing:
            return store.watch(prefix, from_revision)
        if from_revision < 0:
            raise InvalidArgument(f"cannot watch from revision {from_revision}")
        if from_revision == 0:
            from_revision = store.revision() + 1
        while True:
            with self._lock:
                stream = self._streams.get(prefix)
                if stream is None:
                    stream = self._streams[prefix] = _SharedStream(self, store, prefix)
            subscriber = stream.join(from_revision)
            if subscriber is not None:
                return subscriber
            self._forget(stream)  # ended while we joined: start another

    def streams(self) -> int:
        """How many shared streams are open (one per prefix watched)."""
        with self._lock:
            return len(self._streams)

    def _unshared(self, stream: _SharedStream) -> None:
        self._sharing = False
        self._forget(stream)

    def _forget(self, stream: _SharedStream) -> None:
        with self._lock:
            if self._streams.get(stream.prefix) is stream:
                del self._streams[stream.prefix]


_hubs: weakref.WeakKeyDictionary[CatalogStore, WatchHub] = weakref.WeakKeyDictionary()
_hubs_lock = threading.Lock()


def shared_watches(store: CatalogStore) -> WatchHub:
    """The process's one hub for ``store`` (created on first use, gone with the store)."""
    with _hubs_lock:
        hub = _hubs.get(store)
        if hub is None:
            hub = _hubs[store] = WatchHub(store)
        return hub
