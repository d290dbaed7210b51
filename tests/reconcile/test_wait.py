"""wait_for: write intent, then wait for the owner's status, within a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from csi_driver.core.errors import StoreUnavailable, Unavailable
from csi_driver.reconcile.wait import Waiters, read_at, wait_for
from csi_driver.store.base import CatalogStore, Record
from tests.reconcile.conftest import SETTLE_S
from tests.store.backends import Backend

KEY = "status/images/node-1/vol-a"


def _value_is(value: bytes) -> Callable[[Record | None], bool]:
    def check(record: Record | None) -> bool:
        return record is not None and record.value == value

    return check


def test_returns_at_once_when_the_status_is_already_there(store: CatalogStore) -> None:
    revision = store.put(KEY, b"ready")
    record = wait_for(
        store, KEY, _value_is(b"ready"), time.monotonic() + SETTLE_S, waiting_for="image"
    )
    assert record is not None and record.revision == revision


def test_waits_through_intermediate_states_for_the_one_it_wants(store: CatalogStore) -> None:
    def owner() -> None:
        for value in (b"pending", b"creating", b"ready"):
            time.sleep(0.02)
            store.put(KEY, value)
        store.put(KEY + "-longer-key", b"ready")  # same prefix, another key: ignored

    writer = threading.Thread(target=owner)
    writer.start()
    record = wait_for(
        store, KEY, _value_is(b"ready"), time.monotonic() + SETTLE_S, waiting_for="image"
    )
    writer.join()
    assert record is not None and record.key == KEY and record.value == b"ready"


def test_can_wait_for_a_key_to_disappear(store: CatalogStore) -> None:
    store.put(KEY, b"deleting")
    owner = threading.Timer(0.05, lambda: store.delete(KEY))
    owner.start()
    try:
        deadline = time.monotonic() + SETTLE_S
        assert wait_for(store, KEY, lambda r: r is None, deadline, waiting_for="deletion") is None
    finally:
        # The wait may end on the deletion's event before the delete call has its
        # reply: the owner must be done before the fixture closes the store.
        owner.join()


def test_a_status_written_between_the_read_and_the_watch_is_not_missed(
    store: CatalogStore,
) -> None:
    calls: list[Record | None] = []

    def predicate(record: Record | None) -> bool:
        if not calls:
            store.put(KEY, b"ready")  # lands after the read, before the watch opens
        calls.append(record)
        return record is not None and record.value == b"ready"

    record = wait_for(store, KEY, predicate, time.monotonic() + SETTLE_S, waiting_for="image")
    assert record is not None and record.value == b"ready" and calls[0] is None


def test_a_passed_deadline_is_unavailable_naming_what_was_awaited(store: CatalogStore) -> None:
    store.put(KEY, b"pending")
    with pytest.raises(Unavailable, match=r"image vol-a on node-1.*a retry resumes it"):
        wait_for(
            store,
            KEY,
            _value_is(b"ready"),
            time.monotonic() + 0.1,
            waiting_for="image vol-a on node-1",
        )


def test_read_at_gives_the_record_and_the_revision_it_was_read_at(store: CatalogStore) -> None:
    assert read_at(store, KEY) == (None, store.revision())
    store.put(KEY + "x", b"longer key sorts after")
    revision = store.put(KEY, b"v")
    store.put("other", b"moves the store revision on")
    record, at = read_at(store, KEY)
    assert record is not None and record.revision == revision
    assert at == store.revision()


#: What a test etcd's restart may take: each member's stop (10 s at most) and start
#: until healthy (20 s at most), as tests/store/etcd_cluster.py bounds them.
RESTART_CEILING_S = 30.0


def test_a_wait_outlives_a_store_restart(backend: Backend, store: CatalogStore) -> None:
    if backend.name == "sqlite":
        pytest.skip("only a networked store restarts under a waiting caller")
    store.put(KEY, b"pending")
    # The waiter's ceiling covers the restart itself (a TLS etcd's stop and start
    # take seconds, tens of them under load): it ends as soon as the put lands.
    ceiling_s = 4 * SETTLE_S + RESTART_CEILING_S
    result: list[Record | None] = []
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            result.append(
                wait_for(
                    store,
                    KEY,
                    _value_is(b"ready"),
                    time.monotonic() + ceiling_s,
                    waiting_for="image",
                )
            )
        except BaseException as exc:
            failed.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    backend.restart()  # the waiter's watch stream breaks
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            store.put(KEY, b"ready")
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "etcd did not come back"
            time.sleep(0.05)
    waiter.join(ceiling_s)
    assert not failed, failed
    assert len(result) == 1 and result[0] is not None and result[0].value == b"ready"


def test_waiters_serve_many_waits_from_one_watch(store: CatalogStore) -> None:
    waiters = Waiters(store, "status/images/")
    keys = [f"{KEY}{i}" for i in range(8)]
    store.put(keys[0], b"ready")  # there before the informer lists
    results: dict[str, Record | None] = {}

    def waiter(key: str) -> None:
        deadline = time.monotonic() + SETTLE_S
        results[key] = waiters.wait(key, _value_is(b"ready"), deadline, waiting_for="image")

    try:
        threads = [threading.Thread(target=waiter, args=(key,)) for key in keys]
        for thread in threads:
            thread.start()
        for key in keys[1:]:
            store.put(key, b"pending")
            store.put(key, b"ready")
        for thread in threads:
            thread.join()
    finally:
        waiters.close()
    assert sorted(results) == keys
    assert all(r is not None and r.value == b"ready" for r in results.values())


def test_a_waiter_times_out_with_unavailable_and_says_what_it_awaited(
    store: CatalogStore,
) -> None:
    waiters = Waiters(store, "status/images/")
    store.put(KEY, b"pending")
    try:
        with pytest.raises(Unavailable, match=r"node-1 to create the image.*retry resumes it"):
            waiters.wait(
                KEY,
                _value_is(b"ready"),
                time.monotonic() + 0.3,
                waiting_for="node-1 to create the image",
            )
    finally:
        waiters.close()
