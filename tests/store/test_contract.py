"""The catalog store contract, run against SQLite, real etcd processes and the service alike.

Every test here is parametrized over every backend (``backend`` fixture:
SQLite, etcd in plain HTTP and over mutual TLS, the catalog service):
txn semantics, paging, concurrent compare-and-swap, watch and resume,
compaction, restart of the backend and leader election between processes.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.core.errors import Compacted, Conflict, FailedPrecondition, InvalidArgument
from csi_driver.store.base import (
    ABSENT,
    CatalogStore,
    Compare,
    Delete,
    Event,
    EventType,
    Put,
    Record,
    Watch,
)
from tests.store.backends import Backend
from tests.store.etcd_cluster import dying_with_parent

ROOT = Path(__file__).resolve().parents[2]

#: Generous bound for an event to arrive; a healthy run takes milliseconds.
EVENT_WAIT_S = 10.0
#: A contender process starting (importing gRPC) on a loaded shared machine.
STARTUP_WAIT_S = 60.0


def _drain(watch: Watch, count: int) -> list[Event]:
    events = []
    while len(events) < count:
        event = watch.poll(EVENT_WAIT_S)
        assert event is not None, f"only {len(events)} of {count} events arrived: {events}"
        events.append(event)
    return events


def _quiet(watch: Watch) -> None:
    """No further event is pending (give a poller a few rounds to find one)."""
    assert watch.poll(0.3) is None


# -- transactions -------------------------------------------------------------


def test_revisions_grow_and_records_carry_their_mod_revision(store: CatalogStore) -> None:
    start = store.revision()
    r1 = store.put("a", b"1")
    r2 = store.put("b", b"2")
    r3 = store.put("a", b"3")
    assert start < r1 < r2 < r3 == store.revision()
    assert store.get("a") == Record("a", b"3", r3)
    record_b = store.get("b")
    assert record_b is not None and record_b.revision == r2 and record_b.value == b"2"
    assert store.get("missing") is None


def test_multi_key_txn_applies_all_at_one_revision(store: CatalogStore) -> None:
    base = store.put("t/old", b"x")
    revision = store.txn(
        [Compare("t/old", base), Compare("t/new", ABSENT)],
        [Put("t/new", b"n"), Put("t/other", b"o"), Delete("t/old")],
    )
    assert revision == base + 1 == store.revision()
    assert store.get("t/old") is None
    assert [(r.key, r.value, r.revision) for r in store.list("t/")] == [
        ("t/new", b"n", revision),
        ("t/other", b"o", revision),
    ]


def test_lost_compare_names_the_key_and_changes_nothing(store: CatalogStore) -> None:
    ra = store.put("c/a", b"a")
    store.put("c/b", b"b")
    before = store.revision()
    with pytest.raises(Conflict) as lost:
        store.txn(
            [Compare("c/a", ra), Compare("c/b", ABSENT)],
            [Put("c/a", b"A"), Put("c/z", b"z"), Delete("c/b")],
        )
    assert lost.value.key == "c/b"
    assert "c/b" in lost.value.message and "re-read" in lost.value.message
    with pytest.raises(Conflict) as stale:
        store.txn([Compare("c/a", ra + 1000)], [Delete("c/a")])
    assert stale.value.key == "c/a"
    with pytest.raises(Conflict) as missing:
        store.txn([Compare("c/none", ra)], [Put("c/none", b"")])
    assert missing.value.key == "c/none" and "absent" in missing.value.message
    assert store.revision() == before
    assert [(r.key, r.value) for r in store.list("c/")] == [("c/a", b"a"), ("c/b", b"b")]


def test_txn_that_changes_nothing_keeps_the_revision(store: CatalogStore) -> None:
    rev = store.put("n/k", b"v")
    assert store.txn([Compare("n/k", rev)], []) == rev
    assert store.txn([], [Delete("n/absent")]) == rev
    assert store.delete("n/absent") is False
    assert store.revision() == rev


def test_malformed_txns_are_refused_before_reaching_the_backend(store: CatalogStore) -> None:
    with pytest.raises(InvalidArgument, match="twice"):
        store.txn([], [Put("d/k", b"1"), Delete("d/k")])
    with pytest.raises(InvalidArgument, match="empty"):
        store.txn([], [Put("", b"1")])
    with pytest.raises(InvalidArgument, match="< 0"):
        store.txn([Compare("d/k", -1)], [])
    assert store.get("d/k") is None


def test_put_and_delete_keep_their_compare_and_swap_meaning(store: CatalogStore) -> None:
    store.put("k", b"first", ABSENT)
    with pytest.raises(Conflict):
        store.put("k", b"second", ABSENT)
    record = store.get("k")
    assert record is not None and record.value == b"first"
    rev2 = store.put("k", b"v2", record.revision)
    with pytest.raises(Conflict):
        store.put("k", b"stale", record.revision)
    with pytest.raises(Conflict):
        store.delete("k", record.revision)
    assert store.delete("k", rev2) is True
    assert store.delete("k") is False


def test_binary_values_and_unicode_keys_round_trip(store: CatalogStore) -> None:
    value = bytes(range(256)) * 4
    store.put("u/ключ/✓", value)
    record = store.get("u/ключ/✓")
    assert record is not None and record.value == value
    assert [r.key for r in store.list("u/ключ")] == ["u/ключ/✓"]


# -- listing ------------------------------------------------------------------


def test_list_by_prefix_pages_in_key_order_with_its_revision(store: CatalogStore) -> None:
    for key in ["v/c", "v/a", "v/b", "w/a", "u/z", "v"]:
        store.put(key, key.encode())
    current = store.revision()
    page = store.range("v/", limit=2)
    assert [r.key for r in page.records] == ["v/a", "v/b"]
    assert page.more is True and page.revision == current
    rest = store.range("v/", start_after=page.records[-1].key, limit=2)
    assert [r.key for r in rest.records] == ["v/c"] and rest.more is False
    assert [r.key for r in store.list("v/")] == ["v/a", "v/b", "v/c"]
    assert store.list("v/", start_after="v/c") == []
    assert store.range("v/").more is False
    assert [r.key for r in store.list("")] == ["u/z", "v", "v/a", "v/b", "v/c", "w/a"]


# -- concurrency --------------------------------------------------------------


def test_concurrent_create_has_exactly_one_winner(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    winners: list[int] = []
    barrier = threading.Barrier(16)

    def contend(i: int) -> None:
        barrier.wait()
        try:
            stores[i % 4].txn([Compare("leader", ABSENT)], [Put("leader", str(i).encode())])
            winners.append(i)
        except Conflict:
            pass

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    record = stores[0].get("leader")
    assert record is not None and record.value == str(winners[0]).encode()


def test_concurrent_increments_lose_no_update(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    stores[0].put("counter", b"0")
    per_thread, threads_n = 15, 8
    conflicts: list[int] = []

    def increment(store: CatalogStore) -> None:
        done = 0
        while done < per_thread:
            record = store.get("counter")
            assert record is not None
            try:
                store.txn(
                    [Compare("counter", record.revision)],
                    [Put("counter", str(int(record.value) + 1).encode())],
                )
                done += 1
            except Conflict:
                conflicts.append(1)

    threads = [threading.Thread(target=increment, args=(stores[i % 4],)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = stores[0].get("counter")
    assert record is not None and int(record.value) == per_thread * threads_n
    assert conflicts, "eight writers never raced: the test did not exercise CAS"


# -- watch --------------------------------------------------------------------


def test_watch_yields_ordered_puts_and_deletes_under_its_prefix(store: CatalogStore) -> None:
    start = store.revision() + 1
    with store.watch("w/", start) as watch:
        r1 = store.put("w/a", b"1")
        store.put("x/ignored", b"-")
        r2 = store.txn([], [Put("w/b", b"2"), Delete("w/a"), Put("w/c", b"3")])
        r3 = store.put("w/b", b"4")
        events = _drain(watch, 5)
        _quiet(watch)
        assert watch.next_revision == r3 + 1
    assert events == [
        Event(EventType.PUT, "w/a", b"1", r1),
        Event(EventType.PUT, "w/b", b"2", r2),
        Event(EventType.DELETE, "w/a", b"", r2),
        Event(EventType.PUT, "w/c", b"3", r2),
        Event(EventType.PUT, "w/b", b"4", r3),
    ]


def test_watch_from_the_past_replays_and_from_zero_sees_only_the_future(
    store: CatalogStore,
) -> None:
    r1 = store.put("p/a", b"1")
    r2 = store.put("p/b", b"2")
    with store.watch("p/", r1) as replay:
        assert [(e.key, e.revision) for e in _drain(replay, 2)] == [("p/a", r1), ("p/b", r2)]
    with store.watch("p/", 0) as future:
        _quiet(future)
        r3 = store.put("p/c", b"3")
        assert [(e.key, e.revision) for e in _drain(future, 1)] == [("p/c", r3)]


def test_watch_resumes_after_a_disconnect_without_gap_or_repeat(backend: Backend) -> None:
    writer = backend.open()
    watcher = backend.open()
    start = writer.revision() + 1
    written = [writer.put(f"r/{i}", str(i).encode()) for i in range(3)]
    watch = watcher.watch("r/", start)
    first = _drain(watch, 2)
    watch.close()  # the consumer goes away mid-stream
    assert watch.closed and watch.poll(0) is None
    both = writer.txn([], [Put("r/3", b"3"), Put("r/4", b"4")])
    written += [both, both]
    with watcher.watch("r/", first[-1].revision + 1) as resumed:
        rest = _drain(resumed, 3)
        _quiet(resumed)
    assert [e.key for e in first + rest] == [f"r/{i}" for i in range(5)]
    assert [e.revision for e in first + rest] == written


def test_watch_survives_a_backend_restart_by_resuming(backend: Backend) -> None:
    store = backend.open()
    start = store.revision() + 1
    before = store.put("s/before", b"1")
    watch = store.watch("s/", start)
    assert _drain(watch, 1)[0].revision == before
    backend.restart()
    # The old stream either ended (etcd: StoreUnavailable) or goes on (SQLite).
    resume_from = watch.next_revision
    watch.close()
    reopened = backend.open()
    record = reopened.get("s/before")
    assert record is not None and record.revision == before  # data and revision survived
    after = reopened.put("s/after", b"2")
    assert after > before
    with reopened.watch("s/", resume_from) as resumed:
        assert [(e.key, e.revision) for e in _drain(resumed, 1)] == [("s/after", after)]
        _quiet(resumed)


def test_a_closed_watch_stops_an_iterating_thread(store: CatalogStore) -> None:
    seen: list[Event] = []
    watch = store.watch("i/", 0)

    def consume() -> None:
        seen.extend(watch)

    thread = threading.Thread(target=consume)
    thread.start()
    rev = store.put("i/k", b"v")
    deadline = time.monotonic() + EVENT_WAIT_S
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.close()
    thread.join(EVENT_WAIT_S)
    assert not thread.is_alive()
    assert [(e.key, e.revision) for e in seen] == [("i/k", rev)]


# -- compaction ---------------------------------------------------------------


def _watch_from(store: CatalogStore, prefix: str, revision: int) -> Iterator[Event]:
    with store.watch(prefix, revision) as watch:
        while (event := watch.poll(1.0)) is not None:
            yield event


def test_watching_compacted_history_raises_compacted(store: CatalogStore) -> None:
    r1 = store.put("h/a", b"1")
    r2 = store.put("h/a", b"2")
    r3 = store.put("h/b", b"3")
    store.compact(r2)
    with pytest.raises(Compacted) as gone:
        list(_watch_from(store, "h/", r1))
    assert gone.value.compact_revision == r2
    assert "re-list" in gone.value.message
    # From the compact revision on, history is intact.
    with store.watch("h/", r3) as watch:
        assert [(e.key, e.revision) for e in _drain(watch, 1)] == [("h/b", r3)]
    store.compact(r1)  # lower than before: nothing to do
    with pytest.raises(InvalidArgument, match="compact"):
        store.compact(store.revision() + 10)
    record = store.get("h/a")
    assert record is not None and record.value == b"2"  # compaction keeps current data


# -- restart ------------------------------------------------------------------


def test_data_and_revisions_survive_a_restart(backend: Backend) -> None:
    store = backend.open()
    rev = store.put("keep/k", b"v")
    store.txn([], [Put("keep/a", b"a"), Put("keep/b", b"b")])
    current = store.revision()
    backend.restart()
    again = backend.open()
    record = again.get("keep/k")
    assert record is not None and record.value == b"v" and record.revision == rev
    assert [r.key for r in again.list("keep/")] == ["keep/a", "keep/b", "keep/k"]
    assert again.revision() == current
    assert again.put("keep/k2", b"x") == current + 1
    # A client from before the restart carries on (it reconnects by itself).
    assert store.put("keep/k3", b"y") == current + 2
    assert store.get("keep/k2") is not None


# -- leader election ----------------------------------------------------------


def test_only_one_contender_leads_and_its_fence_guards_writes(backend: Backend) -> None:
    a = backend.open().election("ctl", "a")
    b = backend.open().election("ctl", "b")
    assert a.campaign(timeout=10)
    assert a.is_leader and a.leader() == "a"
    assert not b.campaign(timeout=0.5)
    assert not b.is_leader
    with pytest.raises(FailedPrecondition):
        b.fence()
    old_fence = a.fence()
    a.store.txn([old_fence], [Put("work/x", b"by a")])
    a.resign()
    assert not a.is_leader
    assert b.campaign(timeout=10) and b.leader() == "b"
    with pytest.raises(Conflict):  # a deposed leader's decisions no longer land
        a.store.txn([old_fence], [Put("work/x", b"late a")])
    b.store.txn([b.fence()], [Put("work/x", b"by b")])
    record = b.store.get("work/x")
    assert record is not None and record.value == b"by b"
    b.resign()
    assert b.leader() is None


def test_resign_ends_a_pending_campaign(backend: Backend) -> None:
    leader = backend.open().election("ctl", "leader")
    standby = backend.open().election("ctl", "standby")
    assert leader.campaign(timeout=10)
    outcome: list[bool] = []
    waiting = threading.Thread(target=lambda: outcome.append(standby.campaign()))
    waiting.start()
    time.sleep(0.3)
    standby.resign()  # e.g. the standby process is shutting down
    waiting.join(EVENT_WAIT_S)
    assert not waiting.is_alive() and outcome == [False]
    assert leader.is_leader and leader.leader() == "leader"
    leader.resign()


class Contender:
    """``tests.store.contender`` in a child process; its output lines in a queue."""

    def __init__(self, backend: Backend, name: str, candidate: str) -> None:
        tls = [str(backend.tls_dir)] if backend.tls_dir is not None else []
        self.process = subprocess.Popen(
            dying_with_parent(
                [sys.executable, "-m", "tests.store.contender", backend.url, name, candidate, *tls]
            ),
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())

    def line(self, timeout: float) -> str:
        """The next line printed, or "" if none within ``timeout``."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def test_standby_process_takes_over_when_the_leader_dies(backend: Backend) -> None:
    first = Contender(backend, "ctl", "first")
    second: Contender | None = None
    try:
        assert first.line(STARTUP_WAIT_S) == "CAMPAIGNING"
        assert first.line(STARTUP_WAIT_S).startswith("LEADER")
        second = Contender(backend, "ctl", "second")
        assert second.line(STARTUP_WAIT_S) == "CAMPAIGNING"
        assert second.line(1.5) == ""  # a standby while the leader lives
        first.kill()
        took_over = second.line(15)  # the bound for a takeover
        assert took_over.startswith("LEADER"), took_over
        assert backend.open().election("ctl", "probe").leader() == "second"
    finally:
        first.kill()
        if second is not None:
            second.kill()
