"""The SQLite catalog store: CAS semantics, ordering, concurrency, persistence."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from csi_driver.core.errors import (
    Compacted,
    Conflict,
    InvalidArgument,
    StoreError,
    StoreUnavailable,
)
from csi_driver.store.base import ABSENT, Compare, Put
from csi_driver.store.sqlite import _RECENT_REVISIONS, SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "catalog.db")
    yield s
    s.close()


def test_put_get_and_revisions_grow(store: SqliteStore) -> None:
    r1 = store.put("a", b"1")
    r2 = store.put("b", b"2")
    r3 = store.put("a", b"3")
    assert r1 < r2 < r3
    record = store.get("a")
    assert record is not None and record.value == b"3" and record.revision == r3
    assert store.get("missing") is None


def test_cas_create_only_once(store: SqliteStore) -> None:
    store.put("k", b"first", ABSENT)
    with pytest.raises(Conflict):
        store.put("k", b"second", ABSENT)
    record = store.get("k")
    assert record is not None and record.value == b"first"


def test_cas_update_requires_current_revision(store: SqliteStore) -> None:
    rev = store.put("k", b"v1")
    rev2 = store.put("k", b"v2", rev)
    with pytest.raises(Conflict):
        store.put("k", b"stale", rev)
    with pytest.raises(Conflict):
        store.delete("k", rev)
    assert store.delete("k", rev2) is True
    assert store.delete("k") is False


def test_list_prefix_order_and_pagination(store: SqliteStore) -> None:
    for key in ["v/c", "v/a", "v/b", "w/a", "u/z"]:
        store.put(key, key.encode())
    assert [r.key for r in store.list("v/")] == ["v/a", "v/b", "v/c"]
    assert [r.key for r in store.list("v/", limit=2)] == ["v/a", "v/b"]
    assert [r.key for r in store.list("v/", start_after="v/a")] == ["v/b", "v/c"]
    assert [r.key for r in store.list("v/", start_after="v/c")] == []


def test_concurrent_cas_has_one_winner(store: SqliteStore) -> None:
    winners: list[int] = []
    barrier = threading.Barrier(16)

    def contend(i: int) -> None:
        barrier.wait()
        try:
            store.put("leader", str(i).encode(), ABSENT)
            winners.append(i)
        except Conflict:
            pass

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    record = store.get("leader")
    assert record is not None and record.value == str(winners[0]).encode()


def _increment_many(path: str, n: int) -> None:
    s = SqliteStore(Path(path))
    done = 0
    while done < n:
        record = s.get("counter")
        assert record is not None
        try:
            s.put("counter", str(int(record.value) + 1).encode(), record.revision)
            done += 1
        except Conflict:
            continue
    s.close()


def test_cas_is_atomic_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    s = SqliteStore(path)
    s.put("counter", b"0")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_increment_many, args=(str(path), 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    record = s.get("counter")
    assert record is not None and record.value == b"150"
    s.close()


def test_survives_reopen(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    rev = s.put("k", b"v")
    s.close()
    again = SqliteStore(tmp_path / "c.db")
    record = again.get("k")
    assert record is not None and record.value == b"v" and record.revision == rev
    assert again.put("k2", b"x") > rev
    again.close()


def test_unwritable_location_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open catalog"):
        SqliteStore(blocker / "sub" / "c.db")


# -- the event log: watch across processes, old files, compaction, contention --


def _write_keys(path: str, count: int) -> None:
    s = SqliteStore(Path(path))
    for i in range(count):
        s.txn([], [Put(f"x/{i}", str(i).encode())])
    s.close()


def test_a_watch_sees_writes_made_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    watcher = SqliteStore(path)
    with watcher.watch("x/", watcher.revision() + 1) as watch:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_write_keys, args=(str(path), 20))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        events = [watch.poll(10) for _ in range(20)]
    assert [e.key if e else None for e in events] == [f"x/{i}" for i in range(20)]
    assert [e.revision for e in events if e] == list(range(1, 21))
    watcher.close()


def test_a_catalog_from_before_the_event_log_opens_with_its_history_compacted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL);"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "INSERT INTO meta VALUES ('revision', 7);"
        "INSERT INTO kv VALUES ('volumes/a', x'7b7d', 7);"
    )
    conn.close()
    store = SqliteStore(path)
    record = store.get("volumes/a")
    assert record is not None and record.revision == 7
    with pytest.raises(Compacted) as gone:
        store.watch("volumes/", 7)
    assert gone.value.compact_revision == 8
    with store.watch("volumes/", 8) as watch:
        assert store.put("volumes/b", b"{}") == 8
        event = watch.poll(5)
        assert event is not None and event.key == "volumes/b"
    store.close()


def test_the_event_log_is_compacted_automatically(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db", history=10)
    for i in range(35):
        store.put("k", str(i).encode())
    with pytest.raises(Compacted) as gone:
        store.watch("k", 1)
    assert 20 <= gone.value.compact_revision <= 25
    with store.watch("k", 26) as watch:
        event = watch.poll(5)
        assert event is not None and event.revision == 26
    rows = sqlite3.connect(tmp_path / "c.db").execute("SELECT COUNT(*) FROM events").fetchone()
    assert rows[0] <= 20
    store.close()


def test_a_writer_locked_out_too_long_is_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SqliteStore(path, busy_timeout_s=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked") as busy:
            store.txn([], [Put("a", b"1"), Put("b", b"2")])
        assert "nothing was written" in busy.value.message
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.get("a") is None and store.get("b") is None
    assert store.put("a", b"1") == 1
    store.close()


def test_the_election_lock_lives_next_to_the_database(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    election = store.election("controller", "me")
    assert election.campaign(timeout=1)
    assert (tmp_path / "c.db.leaders-controller.lock").exists()
    with pytest.raises(InvalidArgument, match="election name"):
        store.election("../escape", "me")
    election.resign()
    store.close()


def test_closing_a_store_while_other_threads_use_it_is_safe(tmp_path: Path) -> None:
    # A server stopping closes its store while handler threads may still poll
    # watches on it; closing must wait for each connection to be out of use.
    store = SqliteStore(tmp_path / "c.db")
    store.put("x/k", b"v")
    stop = threading.Event()
    failures: list[BaseException] = []

    def use() -> None:
        while not stop.is_set():
            try:
                with store.watch("x/", 1) as watch:
                    watch.poll(0)
                store.range("x/")
            except BaseException as exc:
                failures.append(exc)
                return

    users = [threading.Thread(target=use) for _ in range(4)]
    for user in users:
        user.start()
    for _ in range(200):
        store.close()
    stop.set()
    for user in users:
        user.join(10)
    assert failures == []
    record = store.get("x/k")  # a closed store reopens on use
    assert record is not None and record.value == b"v"
    store.close()


def test_a_watch_misses_nothing_its_process_wrote_beyond_what_memory_keeps(
    tmp_path: Path,
) -> None:
    """Revisions this process wrote are read from memory while kept there; older
    ones, written through the watching thread's own connection (which PRAGMA
    data_version does not report), still come from the log."""
    store = SqliteStore(tmp_path / "c.db")
    other = SqliteStore(tmp_path / "c.db")
    try:
        watch = store.watch("k/", 0)
        writes = 3 * _RECENT_REVISIONS
        for i in range(writes):  # this thread: the watch's own connection
            store.put(f"k/{i:04d}", b"x")
        seen = [watch.poll(1.0) for _ in range(writes)]
        assert [e.key if e else None for e in seen] == [f"k/{i:04d}" for i in range(writes)]
        assert watch.poll(0.1) is None
        other.put("k/other", b"y")  # another store on the file, from memory as well
        event = watch.poll(1.0)
        assert event is not None and event.key == "k/other"
        watch.close()
    finally:
        store.close()
        other.close()


def test_a_database_created_again_at_the_same_path_shares_nothing_with_the_old_one(
    tmp_path: Path,
) -> None:
    """Revisions are numbered per database: stores of one database share what
    this process committed (locks, recent events), but a file removed and
    created again at the same path is another database and must not be read
    from the old one's memory. (Found when a test's catalog path was reused in
    one process: a snapshot reconciler never saw its spec.)"""
    path = tmp_path / "c.db"
    old, same = SqliteStore(path), SqliteStore(path)
    for i in range(3):
        old.put(f"k/old/{i}", b"x")
    assert old._shared is same._shared
    old.close()
    same.close()
    path.unlink()
    new = SqliteStore(path)
    try:
        assert new._shared is not old._shared
        assert new._shared.recent(1) is None  # nothing remembered of the old revision 1
        watch = new.watch("k/", 0)
        new.put("k/new", b"y")
        event = watch.poll(1.0)
        assert event is not None and event.key == "k/new"
        watch.close()
    finally:
        new.close()


# -- group commit: concurrent txns share a transaction, each acknowledged once durable --


def test_concurrent_txns_are_each_durable_when_acknowledged(tmp_path: Path) -> None:
    """32 threads' txns (many grouped into one commit) each get their own revision, and
    each is visible to a brand-new connection the moment its caller returns."""
    path = tmp_path / "c.db"
    store = SqliteStore(path)
    revisions: list[int] = []
    missing: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(32)

    def write(i: int) -> None:
        barrier.wait()
        for j in range(10):
            key = f"k/{i}/{j}"
            revision = store.txn([], [Put(key, b"x")])
            with sqlite3.connect(path) as fresh:
                row = fresh.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
            with lock:
                revisions.append(revision)
                if row is None or row[0] != revision:
                    missing.append(key)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert missing == []
    assert sorted(revisions) == list(range(1, 321))
    store.close()


def test_a_failed_compare_in_a_group_fails_only_its_own_txn(store: SqliteStore) -> None:
    """Txns queued behind a commit in progress are committed together, in order: a
    compare is judged against the txns before it in the group."""
    base = store.put("other", b"0")
    results: dict[str, object] = {}

    def txn(name: str, compares: list[Compare], ops: list[Put]) -> None:
        try:
            results[name] = store.txn(compares, ops)
        except Conflict as exc:
            results[name] = exc

    store._shared.writer.acquire()  # the commit in progress: the first txn waits in it
    first = threading.Thread(target=txn, args=("first", [], [Put("a", b"1")]))
    first.start()
    queued = [
        threading.Thread(target=txn, args=("claim", [Compare("b", ABSENT)], [Put("b", b"1")])),
        threading.Thread(target=txn, args=("late", [Compare("b", ABSENT)], [Put("b", b"2")])),
        threading.Thread(target=txn, args=("free", [], [Put("c", b"1")])),
    ]
    for thread in queued:
        while store._shared.group.waiting < queued.index(thread):
            time.sleep(0.01)
        thread.start()
    while store._shared.group.waiting < len(queued):
        time.sleep(0.01)
    store._shared.writer.release()
    for thread in [first, *queued]:
        thread.join(10)
    assert results["first"] == base + 1
    assert results["claim"] == base + 2
    assert isinstance(results["late"], Conflict)
    assert results["free"] == base + 3  # the conflict consumed no revision
    record = store.get("b")
    assert record is not None and record.value == b"1"


def _write_one(path: str, key: str) -> None:
    s = SqliteStore(Path(path))
    s.put(key, b"theirs")
    s.close()


def test_a_watch_sees_another_process_commit_followed_by_one_of_ours(tmp_path: Path) -> None:
    """Our own commit on another prefix right after a foreign one must not hide the
    foreign revision from a watch (it is in no memory of ours)."""
    path = tmp_path / "c.db"
    store = SqliteStore(path)
    with store.watch("theirs/", store.revision() + 1) as watch:
        proc = multiprocessing.get_context("spawn").Process(
            target=_write_one, args=(str(path), "theirs/k")
        )
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        store.put("ours/k", b"ours")
        event = watch.poll(5)
    assert event is not None and event.key == "theirs/k" and event.revision == 1
    store.close()
