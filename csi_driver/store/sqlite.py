"""SQLite backend of the catalog store: the embedded default.

Tables: ``kv`` (key, value, mod revision), ``meta`` (the global revision and
the compact revision) and ``events`` (the watch history). A txn runs in one
``BEGIN IMMEDIATE`` transaction: it checks its compares, bumps the global
revision once, writes the keys and appends their events, so the data and
its history can never disagree and compare-and-swap is atomic across
threads and processes sharing the file (WAL mode). Revisions are never
reused, even after a restart.

Watches poll the event log in their caller's thread, woken at once by
writes from this process and within :data:`WATCH_POLL_S` by writes from
others. A revision this process committed is kept in memory for a while
(:data:`_RECENT_REVISIONS`, exactly the events it wrote), so the watches of
this process read it from there instead of querying the log once each; a
watch queries the log only for revisions it does not find there, and only
when some connection committed since its last query (``PRAGMA
data_version``, and this process's own count of commits). The log is
compacted explicitly (:meth:`SqliteStore.compact`) and automatically to the
last ``history`` revisions, so it never grows without bound.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from csi_driver.core.errors import (
    Compacted,
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
_RECENT_REVISIONS = 256
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


class _SharedFile:
    """What the stores of one process share per database file.

    ``writer`` serializes this process's write transactions, so its threads
    queue on a lock instead of spinning in SQLite's sleep-and-retry busy
    handler (which only arbitrates between processes now); writers notify
    the watches on the same file through ``condition``.
    """

    _registry: ClassVar[dict[str, _SharedFile]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.writer = threading.Lock()
        self.condition = threading.Condition()
        self.generation = 0
        # revision -> the events committed at it, for revisions this process wrote
        self._recent: dict[int, tuple[Event, ...]] = {}
        self._recent_lock = threading.Lock()

    def committed(self, revision: int, events: tuple[Event, ...]) -> None:
        """Remember what this process committed at ``revision`` (after its COMMIT)."""
        with self._recent_lock:
            self._recent[revision] = events
            if len(self._recent) > _RECENT_REVISIONS:
                del self._recent[min(self._recent)]

    def recent(self, revision: int) -> tuple[Event, ...] | None:
        """The events of ``revision`` if this process committed it lately, else None."""
        with self._recent_lock:
            return self._recent.get(revision)

    @classmethod
    def for_file(cls, path: Path, incarnation: int) -> _SharedFile:
        """The shared state of the database at ``path`` created as ``incarnation``."""
        key = f"{path.resolve()}#{incarnation}"
        with cls._registry_lock:
            return cls._registry.setdefault(key, cls())

    def notify(self) -> None:
        with self.condition:
            self.generation += 1
            self.condition.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self.condition:
            if self.generation == seen:
                self.condition.wait(timeout)


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
        try:
            with self._write("write") as conn:
                for compare in compares:
                    current = self._current(conn, compare.key)
                    if current != compare.revision:
                        raise conflict(compare.key, current, compare.revision)
                changes = [
                    op for op in ops if isinstance(op, Put) or self._current(conn, op.key) != ABSENT
                ]
                if not changes:
                    return self._meta(conn, "revision")
                conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
                revision = self._meta(conn, "revision")
                for seq, op in enumerate(changes):
                    self._write_op(conn, op, revision, seq)
                if revision % min(_AUTO_COMPACT_EVERY, self._history) == 0:
                    self._compact(conn, revision - self._history)
        except sqlite3.Error as exc:
            raise self._failure("write", exc) from exc
        self._shared.committed(
            revision,
            tuple(
                Event(EventType.PUT, op.key, op.value, revision)
                if isinstance(op, Put)
                else Event(EventType.DELETE, op.key, b"", revision)
                for op in changes
            ),
        )
        self._shared.notify()
        return revision

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

    def _data_version(self) -> tuple[int, int]:
        """This thread's connection and its ``PRAGMA data_version`` (which changes when
        any other connection commits)."""
        try:
            with self._use() as conn:
                return id(conn), int(conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise self._failure("change check", exc) from exc

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
    """A watch that reads the event log, one window of whole revisions at a time."""

    def __init__(self, store: SqliteStore, prefix: str, from_revision: int) -> None:
        if from_revision < 0:
            raise InvalidArgument(f"cannot watch from revision {from_revision}")
        self._store = store
        self._low, self._high = _prefix_bounds(prefix)
        self._buffer: collections.deque[Event] = collections.deque()
        self._closed = threading.Event()
        start = from_revision or store.revision() + 1
        self._scanned = start - 1
        self._seen_version: tuple[int, int, int] | None = None
        self._query()  # reports a compacted start at once

    @property
    def next_revision(self) -> int:
        return self._buffer[0].revision if self._buffer else self._scanned + 1

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _fill(self) -> None:
        """Read what follows ``_scanned``: from memory while this process wrote it,
        else from the log if anyone committed since the last query."""
        shared = self._store._shared
        advanced = False
        while (events := shared.recent(self._scanned + 1)) is not None:
            self._buffer.extend(e for e in events if self._covers(e.key))
            self._scanned += 1
            advanced = True
        if advanced:
            return
        # data_version misses commits made through this very connection; the
        # process's own commits all move ``generation``.
        version = (*self._store._data_version(), shared.generation)
        if version == self._seen_version:
            return
        if self._store.revision() == self._scanned:
            self._seen_version = version  # the commits were those read from memory
            return
        # Seen only once a query reached the end of the log (not one window of it).
        self._seen_version = version if self._query() else None

    def _covers(self, key: str) -> bool:
        return key >= self._low and (self._high is None or key < self._high)

    def _query(self) -> bool:
        """Read one window of the log; True when it reached the log's end."""
        events, last, end = self._store._events(self._low, self._high, self._scanned + 1)
        self._buffer.extend(events)
        self._scanned = max(self._scanned, last)
        return last >= end

    def poll(self, timeout: float | None = None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        wakeup = self._store._shared
        while not self._closed.is_set():
            if self._buffer:
                return self._buffer.popleft()
            seen = wakeup.generation
            self._fill()
            if self._buffer:
                continue
            wait = WATCH_POLL_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None
            wakeup.wait(seen, wait)
        return None

    def close(self) -> None:
        self._closed.set()
        self._store._shared.notify()
