"""Watches fed by a network stream: a reader thread queues, :meth:`poll` hands out.

Used by the etcd backend and the catalog service client. Invariant: each
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
from collections import deque

from csi_driver.core.errors import FerryError, StoreUnavailable
from csi_driver.store.base import Event, Watch

#: A batch of whole revisions and the revision the stream stands at after it.
Batch = tuple[list[Event], int]


class StreamWatch(Watch):
    """A watch whose events arrive through :meth:`_deliver` from a reader thread."""

    def __init__(self, start_revision: int) -> None:
        self._queue: queue.Queue[Batch | FerryError] = queue.Queue()
        self._buffer: deque[Event] = deque()
        self._after = start_revision
        self._failure: FerryError | None = None
        self._closed = threading.Event()

    @abc.abstractmethod
    def _end_stream(self) -> None:
        """Stop the reader thread's stream (called once, by :meth:`close`)."""

    def _deliver(self, events: list[Event], after: int) -> None:
        self._queue.put((events, after))

    def _fail(self, error: FerryError) -> None:
        self._queue.put(error)

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
                self._buffer.extend(item[0])
                self._after = max(self._after, item[1])
        return None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(([], self._after))  # wake a poll blocked on the queue
        self._end_stream()
