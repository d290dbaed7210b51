"""A per-key work queue with exponential backoff, for reconcilers.

Invariants (the ones client-go's work queue gives controllers):

- A key is queued at most once: adding a queued key again changes nothing,
  so a burst of events for one record costs one reconcile.
- A key is handed to at most one worker at a time. Added while a worker
  holds it, it is marked dirty and queued again when the worker calls
  :meth:`WorkQueue.done`, so the change that arrived meanwhile is not lost.
- :meth:`WorkQueue.retry` re-adds a key after a delay that doubles with each
  consecutive failure (capped); :meth:`WorkQueue.forget` resets it after a
  success. A delayed key that is added plainly runs at once.
- After :meth:`WorkQueue.shutdown`, :meth:`WorkQueue.get` returns None at once
  and adds are ignored.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class WorkQueue:
    """Keys waiting for a reconcile; safe to use from any number of threads."""

    def __init__(
        self,
        *,
        base_delay_s: float = 0.05,
        max_delay_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = base_delay_s
        self._max = max_delay_s
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._due: dict[str, float] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._seq = 0
        self._failures: dict[str, int] = {}
        self._shut = False
        self._holders_waiting = 0

    def add(self, key: str) -> None:
        """Queue ``key`` to run as soon as a worker is free."""
        with self._cond:
            if self._shut:
                return
            self._due.pop(key, None)
            self._enqueue(key)

    def add_after(self, key: str, delay_s: float) -> None:
        """Queue ``key`` in ``delay_s`` seconds (sooner if it is added or due earlier)."""
        if delay_s <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shut or key in self._queued:
                return
            due = self._clock() + delay_s
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._timers, (due, self._seq, key))
            self._cond.notify()

    def retry(self, key: str) -> float:
        """Re-add ``key`` after its backoff delay; return that delay."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay: float = min(self._max, self._base * 2.0**failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """Reset ``key``'s backoff (after a successful reconcile)."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def get(self, timeout: float | None = None) -> str | None:
        """The next key to reconcile, or None after ``timeout`` or once shut down.

        The caller owns the key until it calls :meth:`done`.
        """
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._shut:
                self._release_due()
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                now = self._clock()
                waits = [t - now for t in (deadline, self._next_due()) if t is not None]
                if deadline is not None and deadline <= now:
                    return None
                self._cond.wait(max(0.0, min(waits)) if waits else None)
            return None

    @contextmanager
    def holding(self, key: str) -> Iterator[None]:
        """Own ``key`` as a worker would, for work done outside the workers: waits
        while a worker holds it; adds made meanwhile queue it again afterwards."""
        with self._cond:
            self._holders_waiting += 1
            while key in self._processing:
                self._cond.wait()
            self._holders_waiting -= 1
            self._processing.add(key)
        try:
            yield
        finally:
            self.done(key)

    def done(self, key: str) -> None:
        """Release ``key``; queue it again if it was added while held."""
        with self._cond:
            self._processing.discard(key)
            if self._holders_waiting:
                self._cond.notify_all()
            if key in self._dirty:
                self._dirty.discard(key)
                self._enqueue(key)

    def shutdown(self) -> None:
        with self._cond:
            self._shut = True
            self._cond.notify_all()

    def __len__(self) -> int:
        """Keys queued or waiting on a delay (not those being processed)."""
        with self._cond:
            return len(self._queued) + len(self._due)

    def _enqueue(self, key: str) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._cond.notify()

    def _next_due(self) -> float | None:
        while self._timers and self._due.get(self._timers[0][2]) != self._timers[0][0]:
            heapq.heappop(self._timers)  # superseded by an earlier due time or an add
        return self._timers[0][0] if self._timers else None

    def _release_due(self) -> None:
        now = self._clock()
        while (due := self._next_due()) is not None and due <= now:
            _, _, key = heapq.heappop(self._timers)
            del self._due[key]
            self._enqueue(key)
