"""Runners on a real catalog store: level-triggered reconciles, backoff, resync, stop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import REGISTRY

from csi_driver.core.errors import Unavailable
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.queue import WorkQueue
from csi_driver.reconcile.runner import Runner, Source, strip_prefix
from csi_driver.store.base import CatalogStore
from tests.reconcile.conftest import SETTLE_S, eventually

SPECS = "spec/images/node-1/"
STATUSES = "status/images/node-1/"


class Calls:
    """What a reconcile function saw, per work key, in order."""

    def __init__(self, store: CatalogStore) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.seen: dict[str, list[bytes | None]] = {}

    def record(self, key: str) -> bytes | None:
        stored = self.store.get(SPECS + key)
        value = stored.value if stored else None
        with self.lock:
            self.seen.setdefault(key, []).append(value)
        return value

    def of(self, key: str) -> list[bytes | None]:
        with self.lock:
            return list(self.seen.get(key, []))


@pytest.fixture
def calls(store: CatalogStore) -> Calls:
    return Calls(store)


@pytest.fixture
def make_runner(store: CatalogStore) -> Iterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def make(reconcile: Callable[[str], float | None], **kwargs: object) -> Runner:
        sources = [
            Source(Informer(store, SPECS, poll_s=0.05), strip_prefix(SPECS)),
            Source(Informer(store, STATUSES, poll_s=0.05), strip_prefix(STATUSES)),
        ]
        runner = Runner("test", reconcile, sources, **kwargs)  # type: ignore[arg-type]
        runners.append(runner)
        runner.start()
        return runner

    yield make
    for runner in runners:
        assert runner.stop(timeout=SETTLE_S), "runner threads did not stop"


def test_the_last_reconcile_sees_the_last_write(
    store: CatalogStore, calls: Calls, make_runner: Callable[..., Runner]
) -> None:
    def reconcile(key: str) -> None:
        calls.record(key)

    make_runner(reconcile, workers=3)
    for i in range(50):
        store.put(SPECS + "vol-a", str(i).encode())
        store.put(SPECS + "vol-b", str(i).encode())
    eventually(lambda: calls.of("vol-a")[-1:] == [b"49"], "vol-a reconciled at its last value")
    eventually(lambda: calls.of("vol-b")[-1:] == [b"49"], "vol-b reconciled at its last value")


def test_status_and_spec_changes_reach_the_same_work_key(
    store: CatalogStore, calls: Calls, make_runner: Callable[..., Runner]
) -> None:
    def reconcile(key: str) -> None:
        calls.record(key)

    make_runner(reconcile)
    store.put(SPECS + "vol-a", b"spec")
    eventually(lambda: len(calls.of("vol-a")) >= 1, "reconciled for the spec")
    before = len(calls.of("vol-a"))
    store.put(STATUSES + "vol-a", b"status changed by hand")
    eventually(lambda: len(calls.of("vol-a")) > before, "reconciled again for the status")


def test_errors_are_retried_with_doubling_backoff_until_success(
    store: CatalogStore,
    calls: Calls,
    make_runner: Callable[..., Runner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def reconcile(key: str) -> None:
        if len(calls.of(key)) < 3 and calls.record(key) is not None:
            raise Unavailable("node busy")
        calls.record(key)

    def count(result: str) -> float:
        value = REGISTRY.get_sample_value(
            "ferry_reconcile_total", {"runner": "test", "result": result}
        )
        return value or 0.0

    errors, done = count("error"), count("done")
    queue = WorkQueue(base_delay_s=0.01, max_delay_s=1.0)
    with caplog.at_level(logging.WARNING, logger="csi_driver.reconcile.runner"):
        make_runner(reconcile, queue=queue)
        store.put(SPECS + "vol-a", b"v")
        eventually(lambda: len(calls.of("vol-a")) == 4, "three failures, then success")
    delays = [
        getattr(r, "retry_s", None) for r in caplog.records if getattr(r, "key", "") == "vol-a"
    ]
    assert delays == [0.01, 0.02, 0.04]
    assert queue.failures("vol-a") == 0  # success forgets the failures
    assert (count("error") - errors, count("done") - done) == (3, 1)
    assert not any(r.exc_info for r in caplog.records)  # domain errors: no traceback


def test_a_returned_delay_runs_the_key_again(
    store: CatalogStore, calls: Calls, make_runner: Callable[..., Runner]
) -> None:
    def reconcile(key: str) -> float | None:
        calls.record(key)
        return 0.01 if len(calls.of(key)) < 3 else None

    make_runner(reconcile)
    store.put(SPECS + "vol-a", b"v")
    eventually(lambda: len(calls.of("vol-a")) >= 3, "polled until done")
    time.sleep(0.3)  # thirty of its delays: a key still polled would have run again
    assert calls.of("vol-a") == [b"v"] * 3  # done (None): not run again


def test_resync_reconciles_cached_keys_without_any_change(
    store: CatalogStore, calls: Calls, make_runner: Callable[..., Runner]
) -> None:
    store.put(SPECS + "vol-a", b"v")

    def reconcile(key: str) -> None:
        calls.record(key)

    make_runner(reconcile, resync_s=0.05)
    eventually(lambda: len(calls.of("vol-a")) >= 3, "reconciled again by resync")


def test_a_resync_with_a_condition_runs_only_while_it_holds(
    store: CatalogStore, calls: Calls, make_runner: Callable[..., Runner]
) -> None:
    store.put(SPECS + "vol-a", b"v")
    due = threading.Event()
    checked = threading.Semaphore(0)

    def reconcile(key: str) -> None:
        calls.record(key)

    def resync_when() -> bool:
        checked.release()
        return due.is_set()

    make_runner(reconcile, resync_s=0.02, resync_when=resync_when)
    eventually(lambda: len(calls.of("vol-a")) == 1, "reconciled once, from the list")
    for _ in range(5):  # five periods pass, the condition false at each
        assert checked.acquire(timeout=SETTLE_S)
    assert len(calls.of("vol-a")) == 1
    due.set()
    eventually(lambda: len(calls.of("vol-a")) >= 3, "reconciled again once the condition holds")


def test_stop_waits_for_the_reconcile_in_progress_and_joins_every_thread(
    store: CatalogStore, make_runner: Callable[..., Runner]
) -> None:
    entered = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def reconcile(key: str) -> None:
        entered.set()
        release.wait(SETTLE_S)
        finished.set()

    runner = make_runner(reconcile, workers=2)
    store.put(SPECS + "vol-a", b"v")
    assert entered.wait(SETTLE_S)
    threading.Timer(0.05, release.set).start()
    assert runner.stop(timeout=SETTLE_S)
    assert finished.is_set()
    names = {t.name for t in threading.enumerate()}
    assert not any(n.startswith(("test:", "informer:")) for n in names)
