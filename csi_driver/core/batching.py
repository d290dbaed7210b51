"""Group commit: concurrent callers' work served in batches, one server at a time.

Callers submit items; whoever finds nobody serving becomes the leader, takes
the oldest queued items (its own first), serves them in one go and hands the
lead to the oldest caller still waiting. A commit that costs the same for
one item as for many (an fsync, an etcd round trip, a serialised section)
is then paid once per batch instead of once per caller.

Invariants:

- Every submitted item is served exactly once, in one batch of at most
  ``limit`` items, in submission order; its caller returns only after that.
- At most one batch is being served at a time.
- A leader serves one batch (the one holding its own item) and no more, so
  a caller never waits for more than the batches queued ahead of it.
- When serving raises, every item of that batch carries the exception (see
  :attr:`Submitted.error`) and the next caller waiting leads: an unexpected
  failure never leaves a caller waiting or reports it served.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Submitted(Generic[T]):
    """One caller's item in the queue, and whether it has been served."""

    __slots__ = ("error", "finished", "item", "leads", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.wake = threading.Event()
        self.leads = False
        self.finished = False
        #: set when serving its batch raised instead of returning
        self.error: BaseException | None = None


class GroupLead(Generic[T]):
    """A queue of items served in batches of at most ``limit`` by one caller at a time."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a batch holds at least one item, not {limit}")
        self._limit = limit
        self._lock = threading.Lock()
        self._queue: list[Submitted[T]] = []
        self._leading = False

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken into a batch."""
        with self._lock:
            return len(self._queue)

    def submit(self, item: T, serve: Callable[[Sequence[T]], None]) -> None:
        """Return once ``item`` is served, by this caller or another caller's ``serve``.

        ``serve`` records each item's outcome on the item itself. Raises what
        ``serve`` raised if the batch holding ``item`` failed that way.
        """
        mine = Submitted(item)
        with self._lock:
            self._queue.append(mine)
            if not self._leading:
                self._leading = mine.leads = True
        while not mine.finished:
            if mine.leads:
                self._lead(serve)
            else:
                mine.wake.wait()
                mine.wake.clear()
        if mine.error is not None:
            raise mine.error

    def _lead(self, serve: Callable[[Sequence[T]], None]) -> None:
        with self._lock:
            batch, self._queue = self._queue[: self._limit], self._queue[self._limit :]
        try:
            serve([submitted.item for submitted in batch])
        except BaseException as exc:
            for submitted in batch:
                submitted.error = exc
        finally:
            with self._lock:
                if self._queue:
                    successor = self._queue[0]
                    successor.leads = True
                    successor.wake.set()
                else:
                    self._leading = False
            for submitted in batch:
                submitted.finished = True
                submitted.wake.set()
