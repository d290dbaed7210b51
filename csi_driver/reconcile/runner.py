"""Runs a reconcile function over the keys its informers report.

Invariants:

- Every key an informer reports (mapped to a work key) is reconciled at
  least once after the report, by one worker at a time (see
  :mod:`csi_driver.reconcile.queue`).
- A reconcile that raises is retried with exponential backoff; one that
  returns a delay is run again after it (a poll for slow work); one that
  returns None is done until its key changes again or the resync comes.
- Every ``resync_s`` every cached key is reconciled again, so a side effect
  lost outside the catalog (an image removed by hand) is repaired without
  any event; with a ``resync_when`` predicate, only at the periods when it
  holds (a reconciler that only acts on a condition the catalog cannot
  announce, such as a node falling silent, need not look at every key
  otherwise).
- :meth:`Runner.stop` closes the watches, wakes every thread and joins them
  within its timeout; a reconcile in progress is allowed to finish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from csi_driver.core.errors import FerryError
from csi_driver.metrics import RECONCILE_SECONDS, RECONCILES
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.queue import WorkQueue

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Reconcile one work key; return seconds until it should run again, or None.
Reconcile = Callable[[str], float | None]
#: Turn a store key into a work key; None ignores the key.
KeyMap = Callable[[str], str | None]


@dataclass(frozen=True)
class Source:
    """An informer whose changed keys, mapped by ``to_work``, feed a runner."""

    informer: Informer
    to_work: KeyMap


def strip_prefix(prefix: str) -> KeyMap:
    """The work key is the store key without ``prefix`` (keys outside it are ignored)."""

    def to_work(key: str) -> str | None:
        return key[len(prefix) :] if key.startswith(prefix) and key != prefix else None

    return to_work


class Runner:
    """Workers, a queue and a resync timer around one reconcile function."""

    def __init__(
        self,
        name: str,
        reconcile: Reconcile,
        sources: Sequence[Source],
        *,
        workers: int = 1,
        resync_s: float = 60.0,
        queue: WorkQueue | None = None,
        sync_timeout_s: float = 30.0,
        resync_when: Callable[[], bool] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a runner needs at least one worker")
        self.name = name
        self._reconcile = reconcile
        self._sources = tuple(sources)
        self._workers = workers
        self._resync_s = resync_s
        self._resync_when = resync_when
        self._sync_timeout = sync_timeout_s
        self.queue = queue if queue is not None else WorkQueue()  # an empty queue is falsy
        # The metric children, looked up once: ``labels()`` costs more than a small reconcile.
        self._outcomes = {
            outcome: RECONCILES.labels(name, outcome) for outcome in ("done", "requeue", "error")
        }
        self._seconds = RECONCILE_SECONDS.labels(name)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for source in self._sources:
            source.informer.subscribe(self._enqueuer(source.to_work))

    def _enqueuer(self, to_work: KeyMap) -> Callable[[str], None]:
        def enqueue(key: str) -> None:
            work = to_work(key)
            if work is not None:
                self.queue.add(work)

        return enqueue

    def start(self) -> None:
        """Start the informers, wait for their first list, then the workers."""
        for source in self._sources:
            source.informer.start()
        for source in self._sources:
            if not source.informer.wait_synced(self._sync_timeout):
                log.warning(
                    "informer not synced yet; starting workers anyway",
                    extra={"runner": self.name, "prefix": source.informer.prefix},
                )
        for i in range(self._workers):
            self._spawn(f"{self.name}:worker-{i}", self._work)
        self._spawn(f"{self.name}:resync", self._resync)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop everything; True when every thread ended within ``timeout``."""
        self._stop.set()
        self.queue.shutdown()
        joined = all([s.informer.stop(timeout) for s in self._sources])
        for thread in self._threads:
            thread.join(timeout)
            joined = joined and not thread.is_alive()
        if not joined:
            log.warning("runner threads still running after stop", extra={"runner": self.name})
        return joined

    def run_now(self, key: str, work: Callable[[], T]) -> T:
        """Run ``work`` for ``key`` in the caller's thread, never while a worker
        holds ``key`` (a change that arrives meanwhile is reconciled after)."""
        with self.queue.holding(key):
            return work()

    def resync(self) -> None:
        """Queue every key the informers hold."""
        for source in self._sources:
            for key in source.informer.cached_keys():
                work = source.to_work(key)
                if work is not None:
                    self.queue.add(work)

    def _resync(self) -> None:
        while not self._stop.wait(self._resync_s):
            try:
                due = self._resync_when is None or self._resync_when()
            except Exception as exc:  # cannot tell: look at everything, as without one
                log.warning("resync check failed", extra={"runner": self.name, "error": str(exc)})
                due = True
            if due:
                self.resync()

    def _work(self) -> None:
        while not self._stop.is_set():
            key = self.queue.get()
            if key is None:
                return
            started = time.monotonic()
            try:
                again = self._reconcile(key)
            except Exception as exc:
                self._outcomes["error"].inc()
                delay = self.queue.retry(key)
                log.warning(
                    "reconcile failed; retrying",
                    exc_info=not isinstance(exc, FerryError),  # a bug: show where
                    extra={
                        "runner": self.name,
                        "key": key,
                        "error": str(exc),
                        "retry_s": delay,
                        "failures": self.queue.failures(key),
                    },
                )
            else:
                self._outcomes["done" if again is None else "requeue"].inc()
                self.queue.forget(key)
                if again is not None:
                    self.queue.add_after(key, again)
            finally:
                self._seconds.observe(time.monotonic() - started)
                self.queue.done(key)
