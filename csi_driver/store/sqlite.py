"""SQLite backend of the catalog store: the embedded default.

Tables: ``kv`` (key, value, mod revision), ``meta`` (the global revision and
the compact revision) and ``events`` (the watch history). A txn runs in one
``BEGIN IMMEDIATE`` transaction: it checks its compares, bumps the global
revision once, writes the keys and appends their events, so the data and
its history can never disagree and compare-and-swap is atomic across
threads and processes sharing the file (WAL mode). Revisions are never
reused, even after a restart.

Writes are committed in groups: the threads of one process that write at
the same time queue their txns, and one of them (the leader) applies every
queued txn in one SQLite transaction, each txn at its own revision, its
compares checked against the txns before it, and commits them with one
fsync; each caller returns (or raises its Conflict) only after that commit.
A failed commit fails every txn of its group, and none of them is written.
A lone writer commits at once: grouping only gathers what queued while the
previous commit was running.

Watches read the event log in their caller's thread. A revision this
process committed is kept in memory for a while (:data:`_RECENT_REVISIONS`,
exactly the events it wrote): each commit wakes only the watches whose
prefix it touched, and they read it from there. Commits made by other
processes are noticed by one poller thread per database file (while any
watch is open), which checks ``PRAGMA data_version`` every
:data:`WATCH_POLL_S` and wakes every watch when a revision appeared that this
process did not write; a watch queries the log only for revisions it cannot
find in memory. The log is compacted explicitly
(:meth:`SqliteStore.compact`) and automatically to the last ``history``
revisions, so it never grows without bound.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from csi_driver.core.batching import GroupLead
from csi_driver.core.errors import (
    Compacted,
    Conflict,
    InvalidArgument,
    StoreError,
    StoreUnavailable,
)
from csi_driver.store.base import (
    ABSENT,
    CatalogStore,
    Compare,
    Delete,
    Event,
    EventType,
    Op,
    Page,
    Put,
    Record,
    Watch,
    conflict,
)
from csi_driver.store.leader import FileLockElection, LeaderElection, leader_key

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
-- Which database this is: a file removed and created again at the same path is
-- another database, whose revisions must not be read from the old one's memory.
INSERT OR IGNORE INTO meta (name, value) VALUES ('incarnation', random());
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (revision, seq)
) WITHOUT ROWID;
-- A catalog written before the event log existed has no history to replay.
INSERT OR IGNORE INTO meta (name, value) SELECT 'compact', value + 1 FROM meta
    WHERE name = 'revision';
"""

#: How often a watch looks for writes made by other processes.
WATCH_POLL_S = 0.05
#: Revisions a watch reads per query (whole revisions, never split).
_WATCH_WINDOW = 256
#: Automatic compaction runs at multiples of this revision (or of ``history``, if smaller).
_AUTO_COMPACT_EVERY = 1024
#: Revisions this process committed that its watches can read from memory.
_RECENT_REVISIONS = 512
#: Most txns one group commit applies (bounds the time a leader spends on others' txns).
_GROUP_MAX = 64
_SQLITE_BUSY = 5


def _prefix_bounds(prefix: str) -> tuple[str, str | None]:
    """``[low, high)`` text bounds of the keys starting with ``prefix``.

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so
    bumping the last code point bounds the prefix (as etcd does on bytes).
    """
    text = prefix
    while text:
        last = ord(text[-1])
        if last < 0x10FFFF:
            bumped = last + 1
            if 0xD800 <= bumped <= 0xDFFF:  # surrogates are not encodable
                bumped = 0xE000
            return prefix, text[:-1] + chr(bumped)
        text = text[:-1]
    return prefix, None


class _Pending:
    """One caller's txn in the group commit (see :class:`GroupLead`), and its outcome."""

    __slots__ = ("compares", "error", "history", "ops", "revision")

    def __init__(self, compares: Sequence[Compare], ops: Sequence[Op], history: int) -> None:
        self.compares = compares
        self.ops = ops
        self.history = history
        self.revision = 0
        self.error: BaseException | None = None


class _SharedFile:
    """What the stores of one process share per database file.

    ``writer`` serializes this process's write transactions (a group commit,
    a compaction, a health check), so its threads queue on a lock instead of
    spinning in SQLite's sleep-and-retry busy handler (which only arbitrates
    between processes now). ``group`` is the group commit queue.
    """

    _registry: ClassVar[dict[str, _SharedFile]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self._path = path
        self.writer = threading.Lock()
        self.group: GroupLead[_Pending] = GroupLead(_GROUP_MAX)
        # revision -> the events committed at it, for revisions this process wrote
        self._recent: dict[int, tuple[Event, ...]] = {}
        self._lock = threading.Lock()
        # the newest revision known to exist: committed here, or seen in the file
        self._known = 0
        # open watches by the bounds of their prefix (many watch the same one)
        self._watches: dict[tuple[str, str | None], list[SqliteWatch]] = {}
        self._poller: threading.Thread | None = None

    def committed(self, revision: int, events: tuple[Event, ...]) -> None:
        """Remember what this process committed at ``revision`` (after its COMMIT),
        and wake the watches it concerns."""
        with self._lock:
            self._recent[revision] = events
            if len(self._recent) > _RECENT_REVISIONS:
                # Committed in revision order, so the first inserted is the oldest.
                del self._recent[next(iter(self._recent))]
            self._known = max(self._known, revision)
            woken = [
                watch
                for (low, high), watches in self._watches.items()
                if _touches(events, low, high)
                for watch in watches
            ]
        for watch in woken:
            watch.wake()

    def recent(self, revision: int) -> tuple[Event, ...] | None:
        """The events of ``revision`` if this process committed it lately, else None."""
        with self._lock:
            return self._recent.get(revision)

    @property
    def known(self) -> int:
        """The newest revision known to exist (a watch behind it has something to read)."""
        with self._lock:
            return self._known

    def observed(self, revision: int) -> None:
        """The file was seen at ``revision``."""
        with self._lock:
            self._known = max(self._known, revision)

    @classmethod
    def for_file(cls, path: Path, incarnation: int) -> _SharedFile:
        """The shared state of the database at ``path`` created as ``incarnation``."""
        resolved = path.resolve()
        key = f"{resolved}#{incarnation}"
        with cls._registry_lock:
            return cls._registry.setdefault(key, cls(resolved))

    # -- watches of this file, and the poller for other processes' commits -------

    def register(self, watch: SqliteWatch) -> None:
        with self._lock:
            self._watches.setdefault(watch.bounds, []).append(watch)
            if self._poller is None:
                self._poller = threading.Thread(
                    target=self._poll, name=f"sqlite-poller:{self._path.name}", daemon=True
                )
                self._poller.start()

    def unregister(self, watch: SqliteWatch) -> None:
        with self._lock:
            watches = self._watches.get(watch.bounds, [])
            if watch in watches:
                watches.remove(watch)
            if not watches:
                self._watches.pop(watch.bounds, None)

    def _wake_all(self) -> None:
        with self._lock:
            watches = [w for group in self._watches.values() for w in group]
        for watch in watches:
            watch.wake()

    def _foreign(self, after: int, revision: int) -> bool:
        """True when a revision in ``(after, revision]`` was not committed here."""
        if revision - after > _RECENT_REVISIONS:
            return True
        with self._lock:
            return any(r not in self._recent for r in range(after + 1, revision + 1))

    def _poll(self) -> None:
        """Wake every watch when another process commits; ends with the last watch."""
        conn: sqlite3.Connection | None = None
        version = None
        polled = self.known
        try:
            while True:
                with self._lock:
                    if not self._watches:
                        self._poller = None
                        return
                time.sleep(WATCH_POLL_S)
                try:
                    if conn is None:
                        conn = sqlite3.connect(self._path, isolation_level=None)
                    now = conn.execute("PRAGMA data_version").fetchone()[0]
                    if now == version:
                        continue
                    version = now
                    row = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
                except sqlite3.Error as exc:
                    # The watches' own queries report the trouble to their owners.
                    log.debug("catalog change check failed", extra={"error": str(exc)})
                    self._wake_all()
                    continue
                revision = int(row[0])
                if revision > polled:
                    foreign = self._foreign(polled, revision)
                    polled = revision
                    self.observed(revision)
                    if foreign:
                        self._wake_all()
        finally:
            if conn is not None:
                conn.close()


def _touches(events: Sequence[Event], low: str, high: str | None) -> bool:
    """True when an event's key lies in ``[low, high)``."""
    return any(event.key >= low and (high is None or event.key < high) for event in events)


def _events(changes: Sequence[Op], revision: int) -> tuple[Event, ...]:
    return tuple(
        Event(EventType.PUT, op.key, op.value, revision)
        if isinstance(op, Put)
        else Event(EventType.DELETE, op.key, b"", revision)
        for op in changes
    )


@dataclass
class _Connection:
    """One thread's connection; ``lock`` is held while it is in use."""

    conn: sqlite3.Connection
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


class SqliteStore(CatalogStore):
    """Catalog store in one SQLite file (``:memory:`` is refused: it would not persist)."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0, history: int = 100_000) -> None:
        self._path = Path(path)
        self._timeout = busy_timeout_s
        if history < 1:
            raise InvalidArgument(f"catalog history must keep at least 1 revision, not {history}")
        self._history = history
        self._local = threading.local()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._use() as conn:
                conn.executescript(_SCHEMA)
                incarnation = self._meta(conn, "incarnation")
            self._shared = _SharedFile.for_file(self._path, incarnation)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open catalog database {self._path}: {exc}; "
                "check that its directory exists and is writable"
            ) from exc

    @property
    def path(self) -> Path:
        return self._path

    def _connection(self) -> _Connection:
        held: _Connection | None = getattr(self._local, "held", None)
        if held is None:
            conn = sqlite3.connect(
                self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            held = _Connection(conn)
            self._local.held = held
            with self._lock:
                self._connections.append(held)
        return held

    @contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, locked against :meth:`close` while in use.

        A connection closed under a thread that had already picked it up is
        replaced by a fresh one (a closed store reopens lazily).
        """
        while True:
            held = self._connection()
            held.lock.acquire()
            if not held.closed:
                break
            held.lock.release()
        try:
            yield held.conn
        finally:
            held.lock.release()

    def _busy(self, what: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"catalog database {self._path} stayed locked by another writer for "
            f"{self._timeout:g}s during {what}; nothing was written, retry"
        )

    def _failure(self, what: str, exc: sqlite3.Error) -> StoreError | StoreUnavailable:
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_BUSY:
            return self._busy(what)
        return StoreError(f"catalog {what} on {self._path} failed: {exc}")

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        if not self._shared.writer.acquire(timeout=self._timeout):
            raise self._busy(what)
        try:
            with self._transaction("BEGIN IMMEDIATE") as conn:
                yield conn
        finally:
            self._shared.writer.release()

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._use() as conn:
            conn.execute(begin)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _meta(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    @staticmethod
    def _current(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else ABSENT

    # -- reads ---------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        try:
            with self._use() as conn:
                row = conn.execute(
                    "SELECT key, value, revision FROM kv WHERE key = ?", (key,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise self._failure(f"read of {key!r}", exc) from exc
        return Record(row[0], bytes(row[1]), int(row[2])) if row else None

    def range(self, prefix: str, start_after: str = "", limit: int = 0) -> Page:
        low, high = _prefix_bounds(prefix)
        query = "SELECT key, value, revision FROM kv WHERE key >= ?"
        args: list[object] = [low]
        if high is not None:
            query += " AND key < ?"
            args.append(high)
        if start_after >= low:
            query += " AND key > ?"
            args.append(start_after)
        query += " ORDER BY key"
        if limit > 0:
            query += " LIMIT ?"
            args.append(limit + 1)  # one more tells whether another page exists
        try:
            with self._transaction("BEGIN") as conn:
                revision = self._meta(conn, "revision")
                rows = conn.execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise self._failure(f"list of {prefix!r}", exc) from exc
        more = limit > 0 and len(rows) > limit
        records = tuple(Record(r[0], bytes(r[1]), int(r[2])) for r in rows[: limit or None])
        return Page(records, revision, more)

    def revision(self) -> int:
        try:
            with self._use() as conn:
                return self._meta(conn, "revision")
        except sqlite3.Error as exc:
            raise self._failure("revision read", exc) from exc

    # -- writes --------------------------------------------------------------

    def _apply(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        mine = _Pending(compares, ops, self._history)
        self._shared.group.submit(mine, self._commit_group)
        if mine.error is not None:
            raise mine.error
        return mine.revision

    def _commit_group(self, group: Sequence[_Pending]) -> None:
        """Apply ``group`` in order in one transaction; the commit is each txn's.

        A compare that fails fails only its txn (it wrote nothing); a store
        error fails every txn of the group, the Conflicts decided in it too
        (they were judged against writes that are not committed).
        """
        committed: list[tuple[int, tuple[Event, ...]]] = []
        try:
            with self._write("write") as conn:
                revision = self._meta(conn, "revision")
                for txn in group:
                    failed = self._failed_compare(conn, txn.compares)
                    if failed is not None:
                        txn.error = failed
                        continue
                    changes = [
                        op
                        for op in txn.ops
                        if isinstance(op, Put) or self._current(conn, op.key) != ABSENT
                    ]
                    if not changes:
                        txn.revision = revision
                        continue
                    revision += 1
                    for seq, op in enumerate(changes):
                        self._write_op(conn, op, revision, seq)
                    if revision % min(_AUTO_COMPACT_EVERY, txn.history) == 0:
                        self._compact(conn, revision - txn.history)
                    txn.revision = revision
                    committed.append((revision, _events(changes, revision)))
                if committed:
                    conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision,))
        except sqlite3.Error as exc:
            for txn in group:
                txn.error = self._failure("write", exc)
            return
        for at, events in committed:
            self._shared.committed(at, events)

    def _failed_compare(
        self, conn: sqlite3.Connection, compares: Sequence[Compare]
    ) -> Conflict | None:
        for compare in compares:
            current = self._current(conn, compare.key)
            if current != compare.revision:
                return conflict(compare.key, current, compare.revision)
        return None

    @staticmethod
    def _write_op(conn: sqlite3.Connection, op: Op, revision: int, seq: int) -> None:
        if isinstance(op, Delete):
            conn.execute("DELETE FROM kv WHERE key = ?", (op.key,))
            conn.execute(
                "INSERT INTO events (revision, seq, deleted, key, value) VALUES (?, ?, 1, ?, ?)",
                (revision, seq, op.key, b""),
            )
            return
        conn.execute(
            "INSERT INTO kv (key, value, revision) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, revision = excluded.revision",
            (op.key, op.value, revision),
        )
        conn.execute(
            "INSERT INTO events (revision, seq, deleted, key, value) VALUES (?, ?, 0, ?, ?)",
            (revision, seq, op.key, op.value),
        )

    @classmethod
    def _compact(cls, conn: sqlite3.Connection, revision: int) -> None:
        if revision <= cls._meta(conn, "compact"):
            return
        conn.execute("DELETE FROM events WHERE revision < ?", (revision,))
        conn.execute("UPDATE meta SET value = ? WHERE name = 'compact'", (revision,))

    def compact(self, revision: int) -> None:
        try:
            with self._write("compaction") as conn:
                current = self._meta(conn, "revision")
                if revision > current:
                    raise InvalidArgument(
                        f"cannot compact the catalog to revision {revision}: "
                        f"it is only at {current}"
                    )
                self._compact(conn, revision)
        except sqlite3.Error as exc:
            raise self._failure("compaction", exc) from exc

    # -- watch, election, lifecycle -----------------------------------------

    def watch(self, prefix: str, from_revision: int) -> Watch:
        return SqliteWatch(self, prefix, from_revision)

    def _events(self, low: str, high: str | None, start: int) -> tuple[list[Event], int, int]:
        """Events in ``[start, start + window)`` under the prefix, the last revision read
        and the store's revision."""
        query = (
            "SELECT revision, deleted, key, value FROM events "
            "WHERE revision >= ? AND revision <= ? AND key >= ?"
        )
        try:
            with self._transaction("BEGIN") as conn:
                compacted = self._meta(conn, "compact")
                if start < compacted:
                    raise Compacted(
                        f"catalog history before revision {compacted} was compacted; "
                        f"cannot watch from {start}: re-list and watch from its revision + 1",
                        compacted,
                    )
                end = self._meta(conn, "revision")
                last = min(end, start + _WATCH_WINDOW - 1)
                args: list[object] = [start, last, low]
                if high is not None:
                    query += " AND key < ?"
                    args.append(high)
                rows = conn.execute(query + " ORDER BY revision, seq", args).fetchall()
        except sqlite3.Error as exc:
            raise self._failure(f"watch of {low!r}", exc) from exc
        self._shared.observed(end)
        events = [
            Event(EventType.DELETE if r[1] else EventType.PUT, r[2], bytes(r[3]), int(r[0]))
            for r in rows
        ]
        return events, last, end

    def election(self, name: str, candidate: str) -> LeaderElection:
        lock = self._path.with_name(f"{self._path.name}.{leader_key(name).replace('/', '-')}.lock")
        return FileLockElection(self, lock, name, candidate)

    def ping(self) -> None:
        try:
            with self._write("health check") as conn:
                self._meta(conn, "revision")
        except sqlite3.Error as exc:
            raise self._failure("health check", exc) from exc

    def close(self) -> None:
        """Close every thread's connection, each once it is out of use."""
        with self._lock:
            held, self._connections = self._connections, []
            self._local = threading.local()
        for connection in held:
            with connection.lock:
                connection.closed = True
                connection.conn.close()


class SqliteWatch(Watch):
    """A watch that reads this process's commits from memory and the rest from the
    event log, one window of whole revisions at a time."""

    def __init__(self, store: SqliteStore, prefix: str, from_revision: int) -> None:
        if from_revision < 0:
            raise InvalidArgument(f"cannot watch from revision {from_revision}")
        self._store = store
        self._shared = store._shared
        self._low, self._high = _prefix_bounds(prefix)
        self._buffer: collections.deque[Event] = collections.deque()
        self._closed = threading.Event()
        self._woken = threading.Event()
        start = from_revision or store.revision() + 1
        self._scanned = start - 1
        self._query()  # reports a compacted start at once
        self._shared.register(self)

    @property
    def next_revision(self) -> int:
        return self._buffer[0].revision if self._buffer else self._scanned + 1

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def bounds(self) -> tuple[str, str | None]:
        return self._low, self._high

    def covers(self, key: str) -> bool:
        return key >= self._low and (self._high is None or key < self._high)

    def wake(self) -> None:
        """Something this watch may want was committed (see :class:`_SharedFile`)."""
        self._woken.set()

    def _fill(self) -> None:
        """Read what follows ``_scanned``: from memory while this process wrote it,
        else from the log when a revision is known that memory does not hold."""
        shared = self._shared
        while (events := shared.recent(self._scanned + 1)) is not None:
            self._buffer.extend(e for e in events if self.covers(e.key))
            self._scanned += 1
        while not self._buffer and self._scanned < shared.known:
            before = self._scanned
            self._query()
            if self._scanned == before:
                return  # the file is behind what this process knew (it was replaced)

    def _query(self) -> None:
        """Read one window of the log."""
        events, last, _ = self._store._events(self._low, self._high, self._scanned + 1)
        self._buffer.extend(events)
        self._scanned = max(self._scanned, last)

    def poll(self, timeout: float | None = None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed.is_set():
            if self._buffer:
                return self._buffer.popleft()
            # Cleared before looking, so a commit landing meanwhile is not slept through.
            self._woken.clear()
            self._fill()
            if self._buffer:
                continue
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            self._woken.wait(wait)
        return None

    def close(self) -> None:
        self._closed.set()
        self._shared.unregister(self)
        self._woken.set()
