"""etcd v3 backend of the catalog store: the backend for many nodes.

A thin mapping onto etcd's own semantics, spoken over etcd's gRPC-JSON
gateway through the ``etcd3gw`` client (see docs/decisions/0001):

- ``txn``: one etcd Txn. A compare on ``ABSENT`` is ``create_revision == 0``,
  any other is ``mod_revision == N``; the failure branch reads the compared
  keys in the same Txn, so a lost race names the key that moved.
- ``range``: a range over ``[prefix, prefix_end)`` with etcd's ``limit`` and
  ``more``; the header revision is the revision the page was read at.
- ``watch``: etcd's watch stream, read by one thread per watch; a watch from
  a compacted revision ends with etcd's ``compact_revision`` -> ``Compacted``.
- elections: a lease kept alive by a thread plus a key bound to it; the key
  vanishes when the lease expires, which is what wakes a standby.

Failures: a request that provably never reached a member (connection
refused, connect timeout) is tried on the next endpoint. Reads are retried
on any member failure. A write that may have reached a member is never
retried here: it raises ``StoreUnavailable`` saying its outcome is unknown
(etcd applies a Txn whole or not at all, so nothing is ever half-written).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import requests
import urllib3.exceptions
from etcd3gw.client import Etcd3Client
from requests.adapters import HTTPAdapter
from urllib3.util.ssl_match_hostname import CertificateError

from csi_driver.core.errors import (
    Compacted,
    Conflict,
    FerryError,
    InvalidArgument,
    StoreError,
    StoreUnavailable,
)
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
    Record,
    Watch,
    conflict,
    prefix_end,
)
from csi_driver.store.etcd_tls import CatalogTls, CatalogTlsAdapter
from csi_driver.store.leader import LeaderElection
from csi_driver.store.watch import StreamWatch

log = logging.getLogger(__name__)

#: gRPC codes etcd reports through the gateway's error body.
_OUT_OF_RANGE = 11
_UNAVAILABLE = 14
_DEADLINE_EXCEEDED = 4
_COMPACTED = "required revision has been compacted"
_FUTURE = "required revision is a future revision"

DEFAULT_LEASE_TTL_S = 5
#: etcd's shortest lease with its default election timeout (1 s): 1.5 x that, rounded up.
ETCD_MIN_LEASE_TTL_S = 2


@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _EtcdRefused(StoreError):
    """etcd answered with an error (not an outage): its gRPC code and message."""

    def __init__(self, what: str, code: int, detail: str) -> None:
        super().__init__(f"etcd refused {what}: {detail}")
        self.code = code
        self.detail = detail


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _reason(exc: requests.RequestException) -> object:
    """The lowest-level cause urllib3 reports under a requests exception."""
    reason: object = exc.args[0] if exc.args else None
    if isinstance(reason, urllib3.exceptions.MaxRetryError):
        reason = reason.reason
    if isinstance(reason, urllib3.exceptions.SSLError) and reason.args:
        reason = reason.args[0]
    return reason


def _tls_refusal(exc: requests.RequestException, tls: CatalogTls | None) -> str | None:
    """Why the TLS handshake failed, said for an operator; None if it was not TLS.

    Only handshake failures count: this process refusing the member's
    certificate, or the member alerting that it refused ours. Either way the
    member never read a request.
    """
    if tls is None or not isinstance(exc, requests.exceptions.SSLError):
        return None
    reason = _reason(exc)
    detail = str(reason)
    if isinstance(reason, ssl.SSLCertVerificationError | CertificateError):
        return (
            f"presented a certificate this process does not accept as the catalog's ({detail}): "
            f"{tls.member_hint}"
        )
    if "ALERT" in detail.upper():
        return f"refused {tls.presenting} in the TLS handshake ({detail}): {tls.client_hint}"
    return None


def _never_sent(exc: requests.RequestException, tls: CatalogTls | None) -> bool:
    """True when the request provably never reached etcd (refused, connect timeout, TLS)."""
    if isinstance(exc, requests.ConnectTimeout) or _tls_refusal(exc, tls) is not None:
        return True
    return isinstance(_reason(exc), urllib3.exceptions.ConnectTimeoutError)


def _record(kv: Mapping[str, Any]) -> Record:
    return Record(_unb64(kv["key"]).decode(), _unb64(kv.get("value", "")), int(kv["mod_revision"]))


def _revision(reply: Mapping[str, Any]) -> int:
    return int(reply.get("header", {}).get("revision", 0))


class EtcdStore(CatalogStore):
    """Catalog store on an etcd v3 cluster (etcd >= 3.4, gRPC gateway on its client URLs)."""

    def __init__(
        self,
        endpoints: Sequence[EtcdEndpoint],
        *,
        tls: TlsBundle | ClientTlsBundle | None = None,
        request_timeout_s: float = 5.0,
        lease_ttl_s: int = DEFAULT_LEASE_TTL_S,
    ) -> None:
        """``tls``: speak mutual TLS with those credentials (see ``etcd_tls``); else plain
        HTTP. A :class:`TlsBundle` is Ferry's PKI, a :class:`ClientTlsBundle` the etcd's own."""
        if not endpoints:
            raise InvalidArgument("an etcd catalog needs at least one host:port endpoint")
        self.endpoints = tuple(endpoints)
        self._tls = CatalogTls.of(tls) if tls is not None else None
        self.tls = tls is not None
        self._timeout = request_timeout_s
        self._connect_timeout = min(1.0, request_timeout_s)
        self.lease_ttl_s = lease_ttl_s
        protocol = "https" if self._tls is not None else "http"
        self._clients = []
        for endpoint in self.endpoints:
            client = Etcd3Client(
                endpoint.host,
                endpoint.port,
                protocol,
                timeout=request_timeout_s,
                api_path="/v3/",  # etcd >= 3.4: no discovery round trip
            )
            # Many threads share a client: keep a connection for each of them.
            # Never through a proxy from the environment, and with TLS no CA
            # bundle from it either (REQUESTS_CA_BUNDLE): only the cluster CA counts.
            client.session.trust_env = False
            if self._tls is None:
                client.session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=64))
            else:
                adapter = CatalogTlsAdapter(self._tls, pool_connections=4, pool_maxsize=64)
                client.session.mount("https://", adapter)
            self._clients.append(client)
        self._preferred = 0
        self._described = ",".join(str(e) for e in self.endpoints)

    def __repr__(self) -> str:
        return f"EtcdStore({self._described})"

    # -- requests ------------------------------------------------------------

    def _order(self) -> list[int]:
        first = self._preferred
        return [(first + i) % len(self._clients) for i in range(len(self._clients))]

    def _call(
        self,
        path: str,
        body: Mapping[str, Any],
        what: str,
        *,
        write: bool,
        timeout: float | None = None,
    ) -> Any:
        """POST ``body`` to the gateway; fail over as far as it is safe (see module doc)."""
        read_timeout = timeout or self._timeout
        failures: list[str] = []
        for index in self._order():
            client = self._clients[index]
            endpoint = self.endpoints[index]
            try:
                reply = client.session.post(
                    client.get_url(path),
                    data=json.dumps(body),
                    timeout=(min(self._connect_timeout, read_timeout), read_timeout),
                )
            except requests.RequestException as exc:
                problem = self._describe(exc, read_timeout)
                if write and not _never_sent(exc, self._tls):
                    raise StoreUnavailable(
                        f"etcd member {endpoint} {problem} during {what}: the cluster may "
                        "have lost quorum or be electing a leader; the write may or may not "
                        "have applied (never partly): re-read before retrying"
                    ) from exc
                failures.append(f"{endpoint}: {problem}")
                continue
            if reply.status_code == 200:
                self._preferred = index
                return reply.json()
            code, message = self._error(reply)
            if code in (_UNAVAILABLE, _DEADLINE_EXCEEDED) or reply.status_code >= 500:
                if write:
                    raise StoreUnavailable(
                        f"etcd cluster {self._described} has no quorum or leader right now "
                        f"({endpoint}: {message}); the {what} may or may not have applied "
                        "(never partly): re-read before retrying once etcd recovers"
                    )
                failures.append(f"{endpoint}: {message}")
                continue
            raise _EtcdRefused(what, code, message)
        raise StoreUnavailable(
            f"no etcd member of {self._described} could serve {what} "
            f"({'; '.join(failures)}); nothing was written: check that etcd runs, "
            "is reachable and has quorum, then retry"
        )

    def _describe(self, exc: requests.RequestException, timeout: float) -> str:
        refusal = _tls_refusal(exc, self._tls)
        if refusal is not None:
            return refusal
        if _never_sent(exc, self._tls):
            return "refused the connection"
        if isinstance(exc, requests.Timeout):
            return f"did not answer within {timeout:g}s"
        if isinstance(exc, requests.exceptions.SSLError) and self._tls is not None:
            # Often a member that refused our certificate and hung up without an alert.
            return (
                f"broke off the TLS session ({_reason(exc)}); if this persists, etcd refuses "
                f"{self._tls.presenting}: {self._tls.client_hint}"
            )
        dropped = f"dropped the connection ({type(exc).__name__})"
        if not self.tls:
            # A member that serves TLS hangs up on plain HTTP without a word.
            dropped += "; if it serves TLS, the catalog URL must be etcds:// (with --tls-dir)"
        return dropped

    @staticmethod
    def _error(reply: requests.Response) -> tuple[int, str]:
        try:
            doc = reply.json()
            return int(doc.get("code", 0)), str(doc.get("message") or doc.get("error"))
        except ValueError:
            return 0, f"HTTP {reply.status_code}: {reply.text[:200]}"

    # -- reads ---------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        reply = self._call("kv/range", {"key": _b64(key)}, f"read of {key!r}", write=False)
        kvs = reply.get("kvs", [])
        return _record(kvs[0]) if kvs else None

    def range(self, prefix: str, start_after: str = "", limit: int = 0) -> Page:
        low = prefix.encode()
        if start_after and start_after >= prefix:
            low = max(low, start_after.encode() + b"\0")
        body: dict[str, Any] = {
            "key": _b64(low or b"\0"),
            "range_end": _b64(prefix_end(prefix.encode()) or b"\0"),
        }
        if limit > 0:
            body["limit"] = limit
        reply = self._call("kv/range", body, f"list of {prefix!r}", write=False)
        records = tuple(_record(kv) for kv in reply.get("kvs", []))
        return Page(records, _revision(reply), bool(reply.get("more", False)))

    def revision(self) -> int:
        reply = self._call(
            "kv/range", {"key": _b64(b"\0"), "count_only": True}, "revision read", write=False
        )
        return _revision(reply)

    # -- writes --------------------------------------------------------------

    @staticmethod
    def _compare(compare: Compare) -> dict[str, Any]:
        if compare.revision == ABSENT:
            return {
                "key": _b64(compare.key),
                "result": "EQUAL",
                "target": "CREATE",
                "create_revision": 0,
            }
        return {
            "key": _b64(compare.key),
            "result": "EQUAL",
            "target": "MOD",
            "mod_revision": compare.revision,
        }

    @staticmethod
    def _op(op: Op, lease: int = 0) -> dict[str, Any]:
        if isinstance(op, Delete):
            return {"request_delete_range": {"key": _b64(op.key)}}
        put: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
        if lease:
            put["lease"] = lease
        return {"request_put": put}

    def _txn_reply(
        self, compares: Sequence[Compare], success: list[dict[str, Any]], what: str
    ) -> Any:
        body = {
            "compare": [self._compare(c) for c in compares],
            "success": success,
            "failure": [{"request_range": {"key": _b64(c.key)}} for c in compares],
        }
        reply = self._call("kv/txn", body, what, write=bool(success))
        if reply.get("succeeded", False) or not compares:
            return reply
        for compare, response in zip(compares, reply.get("responses", []), strict=True):
            kvs = response.get("response_range", {}).get("kvs", [])
            actual = int(kvs[0]["mod_revision"]) if kvs else ABSENT
            if actual != compare.revision:
                raise conflict(compare.key, actual, compare.revision)
        raise StoreError(f"etcd refused {what} although each compared key matches; retry")

    def _apply(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        reply = self._txn_reply(compares, [self._op(op) for op in ops], "txn")
        return _revision(reply)

    def compact(self, revision: int) -> None:
        try:
            self._call(
                "kv/compaction", {"revision": revision}, f"compaction to {revision}", write=True
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

    def _open_watch(self, body: Mapping[str, Any]) -> tuple[requests.Response, EtcdEndpoint]:
        failures: list[str] = []
        for index in self._order():
            client = self._clients[index]
            try:
                reply = client.session.post(
                    client.get_url("watch"),
                    data=json.dumps(body),
                    stream=True,
                    timeout=(self._connect_timeout, None),  # a quiet watch is not a failure
                )
            except requests.RequestException as exc:
                problem = self._describe(exc, self._connect_timeout)
                failures.append(f"{self.endpoints[index]}: {problem}")
                continue
            if reply.status_code == 200:
                return reply, self.endpoints[index]
            failures.append(f"{self.endpoints[index]}: {self._error(reply)[1]}")
            reply.close()
        raise StoreUnavailable(
            f"no etcd member of {self._described} accepted a watch ({'; '.join(failures)}); "
            "check that etcd runs and is reachable, then watch again"
        )

    def grant_lease(self, ttl_s: int) -> int:
        reply = self._call("lease/grant", {"TTL": ttl_s}, "lease grant", write=True)
        return int(reply["ID"])

    def keep_alive(self, lease: int, timeout: float | None = None) -> int:
        """Refresh ``lease``; return its remaining TTL in seconds (<= 0: it expired)."""
        reply = self._call(
            "lease/keepalive", {"ID": lease}, "lease keepalive", write=False, timeout=timeout
        )
        return int(reply.get("result", {}).get("TTL", 0))

    def revoke_lease(self, lease: int) -> None:
        with contextlib.suppress(_EtcdRefused):  # already expired: the point is made
            self._call("lease/revoke", {"ID": lease}, "lease revoke", write=True)

    def election(self, name: str, candidate: str) -> LeaderElection:
        return LeaseElection(self, name, candidate, self.lease_ttl_s)

    def ping(self) -> None:
        self._call("maintenance/status", {}, "health check", write=False)
        self.revision()  # linearizable: fails without quorum

    def close(self) -> None:
        for client in self._clients:
            client.session.close()


class EtcdWatch(StreamWatch):
    """One etcd watch stream; a reader thread queues each response (whole revisions)."""

    def __init__(self, store: EtcdStore, prefix: str, from_revision: int) -> None:
        super().__init__(from_revision)
        self._prefix = prefix
        request: dict[str, Any] = {
            "key": _b64(prefix.encode() or b"\0"),
            "range_end": _b64(prefix_end(prefix.encode()) or b"\0"),
        }
        if from_revision:
            request["start_revision"] = from_revision
        self._reply, self._endpoint = store._open_watch({"create_request": request})
        self._reader = threading.Thread(target=self._read, name=f"etcd-watch {prefix}")
        self._reader.daemon = True
        self._reader.start()
        # Return only once etcd registered the watch, so "from now" means now.
        self._await_start(store._timeout, f"a watch of {prefix!r} on etcd member {self._endpoint}")

    def _read(self) -> None:
        try:
            for line in self._reply.iter_lines():
                if line.strip():
                    self._handle(json.loads(line))
            if not self._closed.is_set():
                raise StoreUnavailable(
                    f"etcd member {self._endpoint} closed the watch of {self._prefix!r}; "
                    "resume from the watch's next_revision"
                )
        except FerryError as exc:
            self._fail(exc)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if not self._closed.is_set():
                self._fail(
                    StoreUnavailable(
                        f"lost the watch of {self._prefix!r} on etcd member {self._endpoint} "
                        f"({type(exc).__name__}); resume from the watch's next_revision"
                    )
                )
        finally:
            self._reply.close()

    def _handle(self, doc: Mapping[str, Any]) -> None:
        if "error" in doc:
            raise StoreUnavailable(
                f"etcd member {self._endpoint} ended the watch of {self._prefix!r}: "
                f"{doc['error'].get('message', doc['error'])}; resume from its next_revision"
            )
        result = doc.get("result", {})
        compact = int(result.get("compact_revision", 0))
        if compact:
            raise Compacted(
                f"catalog history before revision {compact} was compacted; cannot watch "
                f"{self._prefix!r} from {self.next_revision}: re-list and watch from its "
                "revision + 1",
                compact,
            )
        if result.get("created"):
            self._deliver([], self._after or _revision(result) + 1)
            return
        if result.get("canceled"):
            raise StoreUnavailable(
                f"etcd canceled the watch of {self._prefix!r}: "
                f"{result.get('cancel_reason', 'no reason given')}; watch again"
            )
        events = [self._event(e) for e in result.get("events", [])]
        if events:
            self._deliver(events, events[-1].revision + 1)

    @staticmethod
    def _event(raw: Mapping[str, Any]) -> Event:
        kv = raw["kv"]
        kind = EventType.DELETE if raw.get("type") == "DELETE" else EventType.PUT
        value = _unb64(kv.get("value", "")) if kind is EventType.PUT else b""
        return Event(kind, _unb64(kv["key"]).decode(), value, int(kv["mod_revision"]))

    def _end_stream(self) -> None:
        # Unblock the reader's recv: shutting the socket down ends its stream.
        connection = getattr(self._reply.raw, "connection", None)
        sock = getattr(connection, "sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.shutdown(socket.SHUT_RDWR)
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
        put = {"key": _b64(self.key), "value": _b64(self.candidate), "lease": lease}
        try:
            reply = self._etcd._txn_reply(
                [Compare(self.key, ABSENT)], [{"request_put": put}], "leader campaign"
            )
        except Conflict:
            self._etcd.revoke_lease(lease)
            record = self._etcd.get(self.key)
            return record.revision if record else 0
        # (Any other failure leaves the lease to expire on its own within the TTL.)
        self._lease = lease
        self._valid_until = sent + self._ttl
        self._stop.clear()
        self._won(Compare(self.key, _revision(reply)))
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
