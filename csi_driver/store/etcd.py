"""etcd v3 backend of the catalog store: the backend for many nodes.

A thin mapping onto etcd's own semantics, spoken over etcd's gRPC API with
stubs generated from ``proto/etcd/`` (docs/decisions/0004):

- ``txn``: one etcd Txn. A compare on ``ABSENT`` is ``create_revision == 0``,
  any other is ``mod_revision == N``; the failure branch reads the compared
  keys in the same Txn, so a lost race names the key that moved.
- ``range``: a range over ``[prefix, prefix_end)`` with etcd's ``limit`` and
  ``more``; the header revision is the revision the page was read at.
- ``watch``: one bidirectional Watch stream per watch, read by one thread;
  a watch from a compacted revision ends with etcd's ``compact_revision`` ->
  ``Compacted``. Streams ask etcd to end them when their member loses its
  leader (``hasleader``), so a member cut off from quorum cannot leave a
  watch silently stale: it fails and is resumed on another member.
- elections: a lease kept alive by a thread plus a key bound to it; the key
  vanishes when the lease expires, which is what wakes a standby.

Every request carries a deadline (``request_timeout_s``). Failures: etcd
refusing a request for want of resources (RESOURCE_EXHAUSTED: "too many
requests" while its apply lags, or its database space quota reached) is
UNAVAILABLE with a retry hint, never INTERNAL: etcd refuses those before
proposing them, so nothing was written. A request
that provably never reached a member (gRPC could not connect, or the TLS
handshake failed) is tried on the next endpoint; the member that answered
last is tried first. Reads are retried on any member failure. A write that
may have reached a member is never retried here: it raises
``OutcomeUnknown`` (a ``StoreUnavailable``) saying its outcome is unknown
(etcd applies a Txn whole or not at all, so nothing is ever half-written,
but it may apply after the caller gave up on it); so does a write ended by
a cancellation or an error etcd does not classify. Any other failed write
provably wrote nothing: a lost compare (``Conflict``), a refusal before
etcd's log, or no member reached.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from csi_driver.core.errors import (
    Compacted,
    Conflict,
    FerryError,
    InvalidArgument,
    OutcomeUnknown,
    StoreError,
    StoreUnavailable,
)
from csi_driver.gen.etcd import kv_pb2, rpc_pb2, rpc_pb2_grpc
from csi_driver.pki import ClientTlsBundle, TlsBundle
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
    prefix_end,
)
from csi_driver.store.etcd_tls import CatalogTls
from csi_driver.store.leader import LeaderElection
from csi_driver.store.watch import StreamWatch

log = logging.getLogger(__name__)

Reply = TypeVar("Reply")

_COMPACTED = "required revision has been compacted"
_FUTURE = "required revision is a future revision"
#: How gRPC words a call it failed before any byte of it left this process.
_NOT_CONNECTED = "failed to connect to all addresses"
#: How etcd's own errors begin (no leader, request timed out, ...), as opposed to gRPC's.
_SERVER_SAYS = "etcdserver:"
#: etcd's words when its apply lags too far behind its log (ErrTooManyRequests).
_TOO_MANY = "too many requests"
#: etcd's words once its backend reached --quota-backend-bytes (the NOSPACE alarm).
_NO_SPACE = "database space exceeded"
#: Codes that mean "this member cannot serve now", not "etcd refused the request".
_OUTAGE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Codes that end a write without saying whether it applied: the call was cancelled
#: (etcd's "request cancelled", a channel closed under it) or failed in a way etcd
#: does not classify. Every other code is etcd refusing the request before its log.
_UNDECIDED = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
    }
)
_EQUAL = rpc_pb2.Compare.EQUAL
_CREATED = rpc_pb2.Compare.CREATE
_MODIFIED = rpc_pb2.Compare.MOD
#: A stream with this metadata is ended by its member when that member has no leader.
_REQUIRE_LEADER = (("hasleader", "true"),)

DEFAULT_LEASE_TTL_S = 5
#: etcd's shortest lease with its default election timeout (1 s): 1.5 x that, rounded up.
ETCD_MIN_LEASE_TTL_S = 2

_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    # Straight to the members: never through a proxy named by the environment
    # (http_proxy, https_proxy, grpc_proxy), which gRPC would otherwise honour.
    ("grpc.enable_http_proxy", 0),
    # A whole catalog range may be large; etcd bounds what it sends itself.
    ("grpc.max_receive_message_length", -1),
    # Also gRPC's connect timeout: a member that does not answer a connect within
    # a second is passed over, as the gateway client's connect timeout did.
    ("grpc.min_reconnect_backoff_ms", 1000),
    # A member back from a restart is used again within a second, not gRPC's two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A watch on a member whose network vanished (no RST) notices within 15 s;
    # etcd admits pings every 5 s or slower, and only with a call open.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _EtcdRefused(StoreError):
    """etcd answered with an error (not an outage): its gRPC code and message."""

    def __init__(self, what: str, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(f"etcd refused {what}: {detail}")
        self.code = code
        self.detail = detail


def _resources_refused(endpoint: EtcdEndpoint, what: str, detail: str) -> StoreUnavailable:
    """etcd refused ``what`` for want of resources (see module doc): retry later."""
    if _NO_SPACE in detail:
        advice = (
            "etcd accepts no write until its space is reclaimed: compact and defragment "
            "it, disarm its NOSPACE alarm (etcdctl alarm disarm) or raise "
            "--quota-backend-bytes, then retry"
        )
    elif _TOO_MANY in detail:
        advice = "etcd is overloaded (its apply lags behind its log): retry in a moment"
    else:
        advice = "etcd is short of a resource: retry in a moment"
    return StoreUnavailable(
        f"etcd member {endpoint} refused {what} ({detail}); nothing was written: {advice}"
    )


class _Member:
    """One etcd endpoint: its channel and the stubs of the services Ferry calls."""

    def __init__(self, endpoint: EtcdEndpoint, tls: CatalogTls | None) -> None:
        self.endpoint = endpoint
        target = str(endpoint)
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            options = [*_CHANNEL_OPTIONS, *tls.channel_options()]
            self.channel = grpc.secure_channel(target, tls.credentials(), options=options)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(self.channel)


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The code and detail of a failed call, etcd's own deadline counted as a deadline.

    etcd gives up on a request at the deadline the client sent, and reports
    that as UNKNOWN "context deadline exceeded": an outage, not a refusal.
    """
    code, detail = exc.code(), exc.details() or ""
    if code is grpc.StatusCode.UNKNOWN and detail == "context deadline exceeded":
        return grpc.StatusCode.DEADLINE_EXCEEDED, detail
    return code, detail


#: How a connect failure names a network that cannot carry it (ENETUNREACH, EHOSTUNREACH).
_NO_ROUTE = ("unreachable", "no route to host")


def _last_error(detail: str) -> str:
    """The part of a gRPC connect failure that names the cause."""
    return detail.rpartition("last error: ")[2] or detail


def _never_sent(code: grpc.StatusCode, detail: str) -> bool:
    """True when gRPC failed the call before sending it (no connection, TLS refused)."""
    return code is grpc.StatusCode.UNAVAILABLE and detail.startswith(_NOT_CONNECTED)


def _tls_refusal(detail: str, tls: CatalogTls | None) -> str | None:
    """Why the TLS handshake failed, said for an operator; None if it was not TLS.

    Only handshake failures count: this process refusing the member's
    certificate, or the member refusing ours (it alerts, and gRPC reports the
    alert as data it cannot decrypt). Either way the member never read a request.
    """
    if tls is None or not detail.startswith(_NOT_CONNECTED):
        return None
    cause = _last_error(detail)
    upper = cause.upper()
    if "CERTIFICATE_VERIFY_FAILED" in upper or "HOSTNAME VERIFICATION" in upper:
        return (
            f"presented a certificate this process does not accept as the catalog's ({cause}): "
            f"{tls.member_hint}"
        )
    if "ALERT" in upper or "TSI_DATA_CORRUPTED" in upper:
        return f"refused {tls.presenting} in the TLS handshake ({cause}): {tls.client_hint}"
    return None


def _record(kv: kv_pb2.KeyValue) -> Record:
    return Record(kv.key.decode(), kv.value, kv.mod_revision)


def _range_request(prefix: str, start_after: str = "", limit: int = 0) -> rpc_pb2.RangeRequest:
    low = prefix.encode()
    if start_after and start_after >= prefix:
        low = max(low, start_after.encode() + b"\0")
    return rpc_pb2.RangeRequest(
        key=low or b"\0", range_end=prefix_end(prefix.encode()) or b"\0", limit=max(limit, 0)
    )


def _txn_request(
    compares: Sequence[Compare], ops: Sequence[Op], lease: int = 0
) -> rpc_pb2.TxnRequest:
    """The Txn of :meth:`EtcdStore.txn` (see the module doc), built in place: each
    compare, op and failure read is added to the request rather than built apart and
    copied in, which halves the cost of building a create's txn."""
    request = rpc_pb2.TxnRequest()
    compare, failure, success = request.compare, request.failure, request.success
    for item in compares:
        key = item.key.encode()
        if item.revision == ABSENT:
            compare.add(key=key, result=_EQUAL, target=_CREATED, create_revision=0)
        else:
            compare.add(key=key, result=_EQUAL, target=_MODIFIED, mod_revision=item.revision)
        failure.add().request_range.key = key
    for op in ops:
        if isinstance(op, Delete):
            success.add().request_delete_range.key = op.key.encode()
        else:
            put = success.add().request_put
            put.key, put.value, put.lease = op.key.encode(), op.value, lease
    return request


class EtcdStore(CatalogStore):
    """Catalog store on an etcd v3 cluster (etcd >= 3.4), over its gRPC API."""

    def __init__(
        self,
        endpoints: Sequence[EtcdEndpoint],
        *,
        tls: TlsBundle | ClientTlsBundle | None = None,
        request_timeout_s: float = 5.0,
        lease_ttl_s: int = DEFAULT_LEASE_TTL_S,
    ) -> None:
        """``tls``: speak mutual TLS with those credentials (see ``etcd_tls``); else
        plaintext. A :class:`TlsBundle` is Ferry's PKI, a :class:`ClientTlsBundle` the
        etcd's own."""
        if not endpoints:
            raise InvalidArgument("an etcd catalog needs at least one host:port endpoint")
        self.endpoints = tuple(endpoints)
        self._tls = CatalogTls.of(tls) if tls is not None else None
        self.tls = tls is not None
        self._timeout = request_timeout_s
        self.lease_ttl_s = lease_ttl_s
        self._members = [_Member(endpoint, self._tls) for endpoint in self.endpoints]
        self._preferred = 0
        self._described = ",".join(str(e) for e in self.endpoints)

    def __repr__(self) -> str:
        return f"EtcdStore({self._described})"

    # -- requests ------------------------------------------------------------

    def _order(self, first: int) -> list[int]:
        return [(first + i) % len(self._members) for i in range(len(self._members))]

    def _call(
        self,
        rpc: Callable[[_Member], Callable[..., Reply]],
        request: object,
        what: Callable[[], str],
        *,
        write: bool,
        timeout: float | None = None,
    ) -> Reply:
        """Send ``request`` to the first member that takes it; fail over as far as it is
        safe (see module doc). ``rpc`` picks the stub method of a member; ``what``
        words the request, called only to word an error."""
        deadline_s = timeout or self._timeout
        preferred = self._preferred
        try:
            # The common case kept lean: every catalog read and write comes this way.
            return rpc(self._members[preferred])(request, timeout=deadline_s)
        except grpc.RpcError as exc:
            failures = [self._failed(self._members[preferred], exc, what, write, deadline_s)]
        for index in self._order(preferred)[1:]:
            member = self._members[index]
            try:
                reply = rpc(member)(request, timeout=deadline_s)
            except grpc.RpcError as exc:
                failures.append(self._failed(member, exc, what, write, deadline_s))
                continue
            self._preferred = index
            return reply
        raise StoreUnavailable(
            f"no etcd member of {self._described} could serve {what()} "
            f"({'; '.join(failures)}); nothing was written: check that etcd runs, "
            "is reachable and has quorum, then retry"
        )

    def _failed(
        self,
        member: _Member,
        exc: grpc.RpcError,
        what: Callable[[], str],
        write: bool,
        deadline_s: float,
    ) -> str:
        """Why ``member`` could not serve, when another member may be tried; raises
        when none may (etcd refused the request, or a write may have applied)."""
        code, detail = _status(exc)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and detail.startswith(_SERVER_SAYS):
            raise _resources_refused(member.endpoint, what(), detail) from exc
        if write and code in _UNDECIDED:
            raise OutcomeUnknown(
                f"etcd member {member.endpoint} ended {what()} with {code.name} ({detail}): "
                "the write may or may not have applied (never partly): re-read before retrying"
            ) from exc
        if code not in _OUTAGE:
            raise _EtcdRefused(what(), code, detail) from exc
        problem = self._describe(code, detail, deadline_s)
        if write and not _never_sent(code, detail):
            raise OutcomeUnknown(self._unknown_outcome(member, detail, problem, what())) from exc
        return f"{member.endpoint}: {problem}"

    def _unknown_outcome(self, member: _Member, detail: str, problem: str, what: str) -> str:
        if detail.startswith(_SERVER_SAYS):
            return (
                f"etcd cluster {self._described} has no quorum or leader right now "
                f"({member.endpoint} {problem}); the {what} may or may not have applied "
                "(never partly): re-read before retrying once etcd recovers"
            )
        return (
            f"etcd member {member.endpoint} {problem} during {what}: the cluster may have "
            "lost quorum or be electing a leader; the write may or may not have applied "
            "(never partly): re-read before retrying"
        )

    def _describe(self, code: grpc.StatusCode, detail: str, timeout: float) -> str:
        refusal = _tls_refusal(detail, self._tls)
        if refusal is not None:
            return refusal
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"did not answer within {timeout:g}s"
        if detail.startswith(_SERVER_SAYS):
            return f"answered {detail!r}"  # the member runs, but the cluster cannot serve
        cause = _last_error(detail)
        if _never_sent(code, detail):
            if "refused" in cause.lower():
                return "refused the connection"
            if any(words in cause.lower() for words in _NO_ROUTE):
                # A link down or a route missing on this side: not the member's doing,
                # and nothing about certificates.
                return f"cannot be reached from here ({cause}); check this host's network to it"
        dropped = f"dropped the connection ({cause})"
        if self._tls is not None:
            # Often a member that refused our certificate and hung up without an alert.
            dropped += (
                f"; if this persists, etcd refuses {self._tls.presenting}: {self._tls.client_hint}"
            )
        else:
            # A member that serves TLS hangs up on plaintext without a word.
            dropped += "; if it serves TLS, the catalog URL must be etcds:// (with --tls-dir)"
        return dropped

    # -- reads ---------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        reply = self._call(
            lambda m: m.kv.Range,
            rpc_pb2.RangeRequest(key=key.encode()),
            lambda: f"read of {key!r}",
            write=False,
        )
        return _record(reply.kvs[0]) if reply.kvs else None

    def range(self, prefix: str, start_after: str = "", limit: int = 0) -> Page:
        reply = self._call(
            lambda m: m.kv.Range,
            _range_request(prefix, start_after, limit),
            lambda: f"list of {prefix!r}",
            write=False,
        )
        return Page(tuple(_record(kv) for kv in reply.kvs), reply.header.revision, reply.more)

    def revision(self) -> int:
        reply: rpc_pb2.RangeResponse = self._call(
            lambda m: m.kv.Range,
            rpc_pb2.RangeRequest(key=b"\0", count_only=True),
            lambda: "revision read",
            write=False,
        )
        return reply.header.revision

    # -- writes --------------------------------------------------------------

    def _txn(
        self, compares: Sequence[Compare], ops: Sequence[Op], what: str, lease: int = 0
    ) -> rpc_pb2.TxnResponse:
        """Apply ``ops`` (puts bound to ``lease``, if any) if every compare holds."""
        request = _txn_request(compares, ops, lease)
        reply: rpc_pb2.TxnResponse = self._call(
            lambda m: m.kv.Txn, request, lambda: what, write=bool(ops)
        )
        if reply.succeeded or not compares:
            return reply
        for compare, response in zip(compares, reply.responses, strict=True):
            kvs = response.response_range.kvs
            actual = kvs[0].mod_revision if kvs else ABSENT
            if actual != compare.revision:
                raise conflict(compare.key, actual, compare.revision)
        raise StoreError(f"etcd refused {what} although each compared key matches; retry")

    def _apply(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        return self._txn(compares, ops, "txn").header.revision

    def compact(self, revision: int) -> None:
        try:
            self._call(
                lambda m: m.kv.Compact,
                rpc_pb2.CompactionRequest(revision=revision),
                lambda: f"compaction to {revision}",
                write=True,
            )
        except _EtcdRefused as exc:
            if _COMPACTED in exc.detail:
                return
            if _FUTURE in exc.detail:
                raise InvalidArgument(
                    f"cannot compact the catalog to revision {revision}: it is not there yet"
                ) from exc
            raise

    # -- watch, leases, election, lifecycle ---------------------------------

    def watch(self, prefix: str, from_revision: int) -> Watch:
        if from_revision < 0:
            raise InvalidArgument(f"cannot watch from revision {from_revision}")
        return EtcdWatch(self, prefix, from_revision)

    def _open_watch(
        self, request: rpc_pb2.WatchRequest, prefix: str
    ) -> tuple[EtcdWatchStream, rpc_pb2.WatchResponse]:
        """A Watch stream on the first member that confirms the watch, and that
        confirmation (see module doc)."""
        failures: list[str] = []
        for index in self._order(self._preferred):
            member = self._members[index]
            stream = EtcdWatchStream(member, request)
            try:
                created = stream.confirm(self._timeout)
            except grpc.RpcError as exc:
                stream.cancel()
                code, detail = _status(exc)
                if code not in _OUTAGE:
                    raise _EtcdRefused(f"a watch of {prefix!r}", code, detail) from exc
                failures.append(f"{member.endpoint}: {self._describe(code, detail, self._timeout)}")
                continue
            if created.canceled:
                stream.cancel()
                raise StoreUnavailable(
                    f"etcd member {member.endpoint} refused a watch of {prefix!r}: "
                    f"{created.cancel_reason or 'no reason given'}; watch again"
                )
            self._preferred = index
            return stream, created
        raise StoreUnavailable(
            f"no etcd member of {self._described} accepted a watch ({'; '.join(failures)}); "
            "check that etcd runs, is reachable and has quorum, then watch again"
        )

    def grant_lease(self, ttl_s: int) -> int:
        reply: rpc_pb2.LeaseGrantResponse = self._call(
            lambda m: m.lease.LeaseGrant,
            rpc_pb2.LeaseGrantRequest(TTL=ttl_s),
            lambda: "lease grant",
            write=True,
        )
        return reply.ID

    def keep_alive(self, lease: int, timeout: float | None = None) -> int:
        """Refresh ``lease``; return its remaining TTL in seconds (<= 0: it expired)."""

        def refresh(member: _Member) -> Callable[..., rpc_pb2.LeaseKeepAliveResponse]:
            def once(
                request: rpc_pb2.LeaseKeepAliveRequest, timeout: float
            ) -> rpc_pb2.LeaseKeepAliveResponse:
                # One request, then half-close: etcd answers it and ends the stream.
                replies = member.lease.LeaseKeepAlive(iter([request]), timeout=timeout)
                try:
                    reply: rpc_pb2.LeaseKeepAliveResponse = next(replies)
                    return reply
                finally:
                    replies.cancel()

            return once

        reply: rpc_pb2.LeaseKeepAliveResponse = self._call(
            refresh,
            rpc_pb2.LeaseKeepAliveRequest(ID=lease),
            lambda: "lease keepalive",
            write=False,
            timeout=timeout,
        )
        return reply.TTL

    def revoke_lease(self, lease: int) -> None:
        with contextlib.suppress(_EtcdRefused):  # already expired: the point is made
            self._call(
                lambda m: m.lease.LeaseRevoke,
                rpc_pb2.LeaseRevokeRequest(ID=lease),
                lambda: "lease revoke",
                write=True,
            )

    def election(self, name: str, candidate: str) -> LeaderElection:
        return LeaseElection(self, name, candidate, self.lease_ttl_s)

    def ping(self) -> None:
        self._call(
            lambda m: m.maintenance.Status,
            rpc_pb2.StatusRequest(),
            lambda: "health check",
            write=False,
        )
        self.revision()  # linearizable: fails without quorum

    def close(self) -> None:
        for member in self._members:
            member.channel.close()


class EtcdWatchStream:
    """One gRPC Watch stream carrying one watch, on one member."""

    def __init__(self, member: _Member, request: rpc_pb2.WatchRequest) -> None:
        self.endpoint = member.endpoint
        # The create request, then half-close: etcd keeps a half-closed stream's
        # watches, and no thread of ours waits to send more.
        self._call = member.watch.Watch(iter([request]), metadata=_REQUIRE_LEADER)

    def confirm(self, timeout: float) -> rpc_pb2.WatchResponse:
        """The first response (etcd's ``created``), within ``timeout`` seconds; raises the
        stream's ``grpc.RpcError`` otherwise (DEADLINE_EXCEEDED when it stayed silent).

        The response is read by a thread of its own, so the wait ends at ``timeout``
        whatever the stream does: under load, a cancelled stream was seen to keep its
        reader blocked for minutes after an etcd restart.
        """
        outcome: list[rpc_pb2.WatchResponse | BaseException] = []
        arrived = threading.Event()

        def first() -> None:
            try:
                outcome.append(next(self._call))
            except BaseException as exc:  # handed to the caller below
                outcome.append(exc)
            finally:
                arrived.set()

        # A deadline on the call would end the watch itself; this one ends only the wait.
        threading.Thread(target=first, name="etcd-watch-confirm", daemon=True).start()
        if not arrived.wait(timeout):
            self._call.cancel()
            raise _Silent()
        got = outcome[0]
        if isinstance(got, StopIteration):
            raise _Silent() from None
        if isinstance(got, BaseException):
            raise got
        return got

    def __iter__(self) -> Iterator[rpc_pb2.WatchResponse]:
        responses: Iterator[rpc_pb2.WatchResponse] = self._call
        return responses

    def cancel(self) -> None:
        self._call.cancel()


class _Silent(grpc.RpcError):
    """A watch stream that confirmed nothing in time (or ended without a word)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "no confirmation of the watch"


class EtcdWatch(StreamWatch):
    """One etcd watch stream; a reader thread queues each response (whole revisions)."""

    def __init__(self, store: EtcdStore, prefix: str, from_revision: int) -> None:
        super().__init__(from_revision)
        self._prefix = prefix
        create = rpc_pb2.WatchCreateRequest(
            key=prefix.encode() or b"\0",
            range_end=prefix_end(prefix.encode()) or b"\0",
            start_revision=from_revision,
        )
        self._stream, created = store._open_watch(
            rpc_pb2.WatchRequest(create_request=create), prefix
        )
        self._endpoint = self._stream.endpoint
        # From now (revision 0): from the first revision after the one etcd registered it at.
        self._deliver([], self._after or created.header.revision + 1)
        self._reader = threading.Thread(target=self._read, name=f"etcd-watch {prefix}")
        self._reader.daemon = True
        self._reader.start()
        self._await_start(store._timeout, f"a watch of {prefix!r} on etcd member {self._endpoint}")

    def _read(self) -> None:
        try:
            for response in self._stream:
                self._handle(response)
            if not self._closed.is_set():
                raise StoreUnavailable(
                    f"etcd member {self._endpoint} closed the watch of {self._prefix!r}; "
                    "resume from the watch's next_revision"
                )
        except FerryError as exc:
            self._fail(exc)
        except grpc.RpcError as exc:
            if not self._closed.is_set():
                detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                self._fail(
                    StoreUnavailable(
                        f"lost the watch of {self._prefix!r} on etcd member {self._endpoint} "
                        f"({detail}); resume from the watch's next_revision"
                    )
                )

    def _handle(self, response: rpc_pb2.WatchResponse) -> None:
        if response.compact_revision:
            compact = response.compact_revision
            raise Compacted(
                f"catalog history before revision {compact} was compacted; cannot watch "
                f"{self._prefix!r} from {self.next_revision}: re-list and watch from its "
                "revision + 1",
                compact,
            )
        if response.canceled:
            raise StoreUnavailable(
                f"etcd canceled the watch of {self._prefix!r}: "
                f"{response.cancel_reason or 'no reason given'}; watch again"
            )
        events = [self._event(e) for e in response.events]
        if events:
            self._deliver(events, events[-1].revision + 1)

    @staticmethod
    def _event(raw: kv_pb2.Event) -> Event:
        kv = raw.kv
        if raw.type == kv_pb2.Event.DELETE:
            return Event(EventType.DELETE, kv.key.decode(), b"", kv.mod_revision)
        return Event(EventType.PUT, kv.key.decode(), kv.value, kv.mod_revision)

    def _end_stream(self) -> None:
        self._stream.cancel()
        if self._reader is not threading.current_thread():  # closed by a forwarded failure
            self._reader.join(timeout=5)


class LeaseElection(LeaderElection):
    """Election by a key bound to an etcd lease; the lease is kept alive by a thread.

    The leader considers itself deposed once ``ttl`` has passed since the last
    keepalive it *sent* that etcd acknowledged, which is never later than etcd
    expiring the lease, so two leaders never both believe they lead.
    """

    def __init__(self, store: EtcdStore, name: str, candidate: str, ttl_s: int) -> None:
        super().__init__(store, name, candidate)
        self._etcd = store
        self._ttl = ttl_s
        self._lease = 0
        self._valid_until = 0.0
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return super().is_leader and time.monotonic() < self._valid_until

    def _campaign(self, deadline: float | None) -> bool:
        if self.is_leader:
            return True
        while not self._cancel.is_set():
            try:
                holder = self._attempt()
            except StoreUnavailable as exc:
                # A standby keeps campaigning through an etcd outage.
                log.warning("campaign failed", extra={"election": self.name, "error": str(exc)})
                if not self._pause(0.5, deadline):
                    return False
                continue
            if holder is None:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if holder:
                self._await_vacancy(holder, deadline)
        return False

    def _attempt(self) -> int | None:
        """Try once to take the key: None if we now lead, else the holder's revision.

        0 means the holder vanished while we looked: try again at once.
        """
        sent = time.monotonic()
        lease = self._etcd.grant_lease(self._ttl)
        put = Put(self.key, self.candidate.encode())
        try:
            reply = self._etcd._txn([Compare(self.key, ABSENT)], [put], "leader campaign", lease)
        except Conflict:
            self._etcd.revoke_lease(lease)
            record = self._etcd.get(self.key)
            return record.revision if record else 0
        # (Any other failure leaves the lease to expire on its own within the TTL.)
        self._lease = lease
        self._valid_until = sent + self._ttl
        self._stop.clear()
        self._won(Compare(self.key, reply.header.revision))
        self._keeper = threading.Thread(
            target=self._keep_alive, name=f"lease {self.name}", daemon=True
        )
        self._keeper.start()
        log.info("leader elected", extra={"election": self.name, "leader": self.candidate})
        return None

    def _await_vacancy(self, holder_revision: int, deadline: float | None) -> None:
        """Wait until the key is deleted (lease expiry or resignation), or a lease period."""
        until = time.monotonic() + self._ttl
        if deadline is not None:
            until = min(until, deadline)
        try:
            with self._etcd.watch(self.key, holder_revision + 1) as w:
                while (left := until - time.monotonic()) > 0 and not self._cancel.is_set():
                    event = w.poll(min(left, 0.25))
                    if event and event.key == self.key and event.type is EventType.DELETE:
                        return
        except (StoreUnavailable, Compacted):
            self._pause(0.5, deadline)

    def _keep_alive(self) -> None:
        interval = max(self._ttl / 3, 0.2)
        while not self._stop.wait(interval):
            sent = time.monotonic()
            try:
                ttl = self._etcd.keep_alive(self._lease, timeout=interval)
            except _EtcdRefused:
                break  # etcd no longer knows the lease
            except StoreUnavailable as exc:
                log.warning("lease keepalive failed", extra={"error": str(exc)})
                if time.monotonic() >= self._valid_until:
                    break
                continue
            if ttl <= 0:
                break
            self._valid_until = sent + ttl
        if not self._stop.is_set():
            log.warning("leadership lost", extra={"election": self.name})
            self._mark_lost()

    def _resign(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=self._ttl)
            self._keeper = None
        fence, self._fence = self._fence, None
        lease, self._lease = self._lease, 0
        self._mark_lost()
        if fence is None:
            return
        try:
            self._etcd.txn([fence], [Delete(self.key)])
            self._etcd.revoke_lease(lease)
        except FerryError as exc:
            # The key is gone or taken, or etcd is out of reach: the lease expires anyway.
            log.warning("resign incomplete", extra={"election": self.name, "error": str(exc)})
