"""``RemoteStore``: the catalog store contract spoken to a ``ferry.v1.Catalog`` service.

How nodes of a SQLite-backed multi-node install reach the catalog without
opening its file (``--catalog ferry://host:port[,ip:port...]``: several
controller replicas serving one catalog file, used first-answering-first). It passes the same
contract suite as the local backends. Errors come back as the domain errors
the server raised (one table, ``csi_driver.rpc.errors.CODES``); a service
that cannot be reached is ``StoreUnavailable``, and for a write whose
outcome is unknown the message says so. Leadership is a ``Campaign`` stream:
the server holds it for us while the stream lives.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from csi_driver.core import errors
from csi_driver.core.errors import Compacted, FerryError, StoreUnavailable
from csi_driver.gen.ferry.v1 import catalog_pb2, catalog_pb2_grpc
from csi_driver.pki import Identity
from csi_driver.rpc.errors import CODES
from csi_driver.store.base import (
    CatalogStore,
    Compare,
    Delete,
    Event,
    EventType,
    Op,
    Page,
    Record,
    Watch,
)
from csi_driver.store.leader import LeaderElection
from csi_driver.store.watch import StreamWatch
from csi_driver.transport import AgentSecurity, open_channel

_FROM_CODE: dict[grpc.StatusCode, type[FerryError]] = {code: kind for kind, code in CODES}
#: The service is down, going down (it cancels our calls) or too slow.
_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}

T = TypeVar("T")


def _record(kv: Any) -> Record:
    return Record(kv.key, bytes(kv.value), int(kv.revision))


def _op(op: Op) -> Any:
    if isinstance(op, Delete):
        return catalog_pb2.Op(delete=op.key)
    return catalog_pb2.Op(put=catalog_pb2.KeyValue(key=op.key, value=op.value))


class RemoteStore(CatalogStore):
    """Catalog store behind a ``ferry.v1.Catalog`` service at ``target`` (host:port)."""

    def __init__(
        self,
        target: str,
        security: AgentSecurity | None = None,
        *,
        request_timeout_s: float = 10.0,
        fallbacks: Sequence[str] = (),
    ) -> None:
        """``security``: mTLS as the caller's identity (plaintext only if it allows it).

        ``fallbacks``: more controllers serving the same catalog (IP:port); calls go
        to the first that answers. A call cut by the switch fails as any lost call
        does (StoreUnavailable), and its retry, or a watch's resume, reaches the next.
        """
        self.target = ",".join((target, *fallbacks))
        self._timeout = request_timeout_s
        # The service is the controller's: its certificate must say so.
        self._channel = open_channel(
            f"tcp://{target}",
            security or AgentSecurity(),
            Identity.controller(),
            fallbacks=fallbacks,
        )
        self._stub = catalog_pb2_grpc.CatalogStub(self._channel)

    def __repr__(self) -> str:
        return f"RemoteStore({self.target})"

    def _failure(self, exc: grpc.RpcError, what: str, *, write: bool) -> FerryError:
        code, detail = exc.code(), exc.details() or ""
        if code in _UNREACHABLE:
            outcome = (
                "the write may or may not have applied (never partly): re-read before retrying"
                if write
                else "nothing was written"
            )
            return StoreUnavailable(
                f"catalog service at {self.target} did not answer {what} "
                f"({code.name}: {detail}); {outcome}"
            )
        return _FROM_CODE.get(code, errors.StoreError)(detail or f"{what} failed: {code.name}")

    def _call(self, what: str, call: Callable[[], T], *, write: bool = False) -> T:
        try:
            return call()
        except grpc.RpcError as exc:
            raise self._failure(exc, what, write=write) from exc

    def get(self, key: str) -> Record | None:
        request = catalog_pb2.GetRequest(key=key)
        reply: Any = self._call(
            f"read of {key!r}", lambda: self._stub.Get(request, timeout=self._timeout)
        )
        return _record(reply.record) if reply.found else None

    def _apply(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        request = catalog_pb2.TxnRequest(
            compares=[catalog_pb2.Compare(key=c.key, revision=c.revision) for c in compares],
            ops=[_op(op) for op in ops],
        )
        reply: Any = self._call(
            "txn", lambda: self._stub.Txn(request, timeout=self._timeout), write=bool(ops)
        )
        if not reply.succeeded:
            raise errors.Conflict(reply.conflict_message, key=reply.conflict_key or None)
        return int(reply.revision)

    def range(self, prefix: str, start_after: str = "", limit: int = 0) -> Page:
        request = catalog_pb2.RangeRequest(prefix=prefix, start_after=start_after, limit=limit)
        reply: Any = self._call(
            f"list of {prefix!r}", lambda: self._stub.Range(request, timeout=self._timeout)
        )
        return Page(tuple(_record(kv) for kv in reply.records), int(reply.revision), reply.more)

    def revision(self) -> int:
        request = catalog_pb2.RevisionRequest()
        reply: Any = self._call(
            "revision read", lambda: self._stub.Revision(request, timeout=self._timeout)
        )
        return int(reply.revision)

    def compact(self, revision: int) -> None:
        request = catalog_pb2.CompactRequest(revision=revision)
        self._call(
            f"compaction to {revision}",
            lambda: self._stub.Compact(request, timeout=self._timeout),
            write=True,
        )

    def watch(self, prefix: str, from_revision: int) -> Watch:
        return RemoteWatch(self, prefix, from_revision)

    def election(self, name: str, candidate: str) -> LeaderElection:
        return RemoteElection(self, name, candidate)

    def ping(self) -> None:
        self.revision()

    def close(self) -> None:
        self._channel.close()


class RemoteWatch(StreamWatch):
    """A ``Watch`` stream read by one thread; each message holds whole revisions."""

    def __init__(self, store: RemoteStore, prefix: str, from_revision: int) -> None:
        super().__init__(from_revision)
        self._store = store
        self._prefix = prefix
        request = catalog_pb2.WatchRequest(prefix=prefix, from_revision=from_revision)
        self._call: Any = store._stub.Watch(request)
        self._reader = threading.Thread(target=self._read, name=f"watch {prefix}")
        self._reader.daemon = True
        self._reader.start()
        # The first message confirms the watch (or reports a compacted start).
        self._await_start(store._timeout, f"a watch of {prefix!r} at {store.target}")

    def _read(self) -> None:
        try:
            responses: Iterator[Any] = self._call
            for response in responses:
                if response.compact_revision:
                    raise Compacted(response.message, int(response.compact_revision))
                events = [
                    Event(
                        EventType.DELETE if e.deleted else EventType.PUT,
                        e.kv.key,
                        bytes(e.kv.value),
                        int(e.kv.revision),
                    )
                    for e in response.events
                ]
                self._deliver(events, int(response.next_revision))
            if not self._closed.is_set():
                raise StoreUnavailable(
                    f"catalog service at {self._store.target} ended the watch of "
                    f"{self._prefix!r}; resume from the watch's next_revision"
                )
        except FerryError as exc:
            self._fail(exc)
        except grpc.RpcError as exc:
            if not self._closed.is_set():
                self._fail(self._store._failure(exc, f"watch of {self._prefix!r}", write=False))

    def _end_stream(self) -> None:
        self._call.cancel()
        if self._reader is not threading.current_thread():  # closed by a forwarded failure
            self._reader.join(timeout=5)


class RemoteElection(LeaderElection):
    """Leadership held by the service on our behalf for as long as our stream lives."""

    def __init__(self, store: RemoteStore, name: str, candidate: str) -> None:
        super().__init__(store, name, candidate)
        self._remote = store
        self._stream: Any = None

    def _campaign(self, deadline: float | None) -> bool:
        if self.is_leader:
            return True
        while not self._cancel.is_set():
            request = catalog_pb2.CampaignRequest(name=self.name, candidate=self.candidate)
            stream = self._remote._stub.Campaign(request)
            answer: queue.Queue[Any] = queue.Queue()
            threading.Thread(
                target=self._follow,
                args=(stream, answer),
                name=f"campaign {self.name}",
                daemon=True,
            ).start()
            while True:
                wait = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
                try:
                    first = answer.get(timeout=max(wait, 0))
                    break
                except queue.Empty:
                    if self._cancel.is_set() or (
                        deadline is not None and time.monotonic() >= deadline
                    ):
                        stream.cancel()
                        return False
            if isinstance(first, FerryError):
                if not isinstance(first, StoreUnavailable):
                    raise first
                if not self._pause(0.5, deadline):  # service unreachable: keep trying
                    return False
                continue
            self._stream = stream
            self._won(Compare(first.leader_key, int(first.fence_revision)))
            return True
        return False

    def _follow(self, stream: Any, answer: queue.Queue[Any]) -> None:
        """Hand over the first message, then mark leadership lost when the stream ends."""
        won = False
        try:
            for message in stream:
                if not won:
                    won = True
                    answer.put(message)
        except grpc.RpcError as exc:
            if not won:
                answer.put(self._remote._failure(exc, f"campaign for {self.name}", write=False))
                return
        if won:
            self._mark_lost()
        else:
            answer.put(
                StoreUnavailable(f"catalog service at {self._remote.target} ended the campaign")
            )

    def _resign(self) -> None:
        stream, self._stream = self._stream, None
        self._fence = None
        self._mark_lost()
        if stream is not None:
            stream.cancel()
