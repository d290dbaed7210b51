"""gRPC endpoints: parsing ``unix://`` and ``tcp://`` addresses, serving on them, and
the security of the channels between Ferry's own agents.

Invariants for agent traffic (node agent API today, chunk streams later),
given an :class:`AgentSecurity`:

- TCP is mutual TLS under the cluster CA: the server requires a client
  certificate from the CA, the client checks the server's certificate
  names the identity it meant to reach (the target-name override), and
  :class:`PeerGate` admits a call only from a peer whose certificate names
  an allowed Ferry identity (UNAUTHENTICATED / PERMISSION_DENIED otherwise,
  logged with the peer's address).
- Plaintext TCP only when explicitly allowed (local development).
- One exception to mutual TLS: enrollment (``enrolling``), where a node
  that has no certificate yet asks the controller for one. There the
  server alone proves its identity; the caller is authenticated by the
  enrollment token inside the call (:mod:`csi_driver.enrollment`).
- unix sockets stay plaintext: only processes on this machine with access
  to the socket file reach them, and kubelet speaks plain gRPC to the CSI
  socket. CSI servers take no ``AgentSecurity`` at all.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc

from csi_driver import log as ferry_log
from csi_driver.core.errors import (
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from csi_driver.pki import Identity, TlsBundle
from csi_driver.rpc.errors import abort

log = logging.getLogger(__name__)

#: Registers one servicer on a server, e.g. ``lambda s: add_XServicer_to_server(x, s)``.
Registration = Callable[[grpc.Server], None]
#: Decides whether an authenticated Ferry identity may call a server.
Admission = Callable[[Identity], bool]


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "unix" or "tcp"
    address: str  # a socket path, or host:port

    def __str__(self) -> str:
        return f"unix://{self.address}" if self.scheme == "unix" else f"tcp://{self.address}"


def parse_endpoint(text: str) -> Endpoint:
    """``unix:///run/csi.sock``, ``unix:/run/csi.sock``, ``tcp://h:p`` or ``h:p``."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
    elif text.startswith("unix:"):
        path = text[len("unix:") :]
    else:
        address = text[len("tcp://") :] if text.startswith("tcp://") else text
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidArgument(f"endpoint {text!r} is neither unix:///path nor tcp://host:port")
        return Endpoint("tcp", f"{host or '0.0.0.0'}:{port}")
    if not path.startswith("/"):
        raise InvalidArgument(f"unix endpoint {text!r} must name an absolute socket path")
    return Endpoint("unix", os.path.normpath(path))


def channel_target(text: str) -> str:
    """The gRPC channel target for an endpoint string."""
    endpoint = parse_endpoint(text)
    return f"unix://{endpoint.address}" if endpoint.scheme == "unix" else endpoint.address


@dataclass(frozen=True)
class AgentSecurity:
    """How Ferry's agents reach each other: mTLS when ``tls`` is set.

    ``plaintext_tcp`` (``--insecure-agent-api``) allows TCP without TLS for
    local development; without it, plaintext TCP is refused on both sides.
    """

    tls: TlsBundle | None = None
    plaintext_tcp: bool = False

    def check(self, endpoint: Endpoint, what: str) -> None:
        """Refuse a TCP endpoint that would carry agent traffic in plaintext."""
        if endpoint.scheme == "tcp" and self.tls is None and not self.plaintext_tcp:
            raise FailedPrecondition(
                f"refusing plaintext TCP for {what} at {endpoint}: anyone who reaches that "
                "address could act as a Ferry agent. Give --tls-dir (certificates from "
                "`ferry ca issue` or a TLS Secret), use a unix:// socket, or for local "
                "development only pass --insecure-agent-api"
            )


if TYPE_CHECKING:
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:  # grpc's runtime classes are not generic; only grpc-stubs' are
    _ServerInterceptor = grpc.ServerInterceptor


#: Each kind of RPC handler and the factory that rebuilds it around a new behaviour.
_HANDLER_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class PeerGate(_ServerInterceptor):
    """Admits a call only from a peer whose certificate names an admitted Ferry identity.

    The TLS handshake already refused peers without a certificate of the
    cluster CA (gRPC core logs that); this checks what the certificate says.
    """

    def __init__(self, admit: Admission) -> None:
        self._admit = admit

    def _identify(self, context: grpc.ServicerContext, method: str) -> Identity:
        # Values are lists of bytes (grpc-stubs types them as bytes).
        auth = cast(Mapping[str, list[bytes]], context.auth_context())
        spiffe = [value.decode(errors="replace") for value in auth.get("peer_spiffe_id", [])]
        identity = Identity.from_spiffe_id(spiffe[0]) if len(spiffe) == 1 else None
        if identity is None:
            subject = b",".join(auth.get("x509_subject", [])).decode(errors="replace")
            self._refuse(
                context,
                method,
                Unauthenticated(
                    f"the client certificate ({subject or 'no subject'}) names no Ferry "
                    "identity: present one issued by `ferry ca issue` from this cluster's CA"
                ),
            )
        if not self._admit(identity):
            self._refuse(context, method, PermissionDenied(f"{identity} may not call {method}"))
        return identity

    @staticmethod
    def _refuse(context: grpc.ServicerContext, method: str, error: FerryError) -> NoReturn:
        log.warning(
            "peer refused",
            extra={"peer_address": context.peer(), "method": method, "error": error.message},
        )
        abort(context, error)

    def _guard(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            identity = self._identify(context, method)
            # A streamed response is produced after this returns, without the field.
            with ferry_log.context(caller=str(identity)):
                log.debug("peer admitted", extra={"peer_address": context.peer()})
                return behavior(request, context)

        return guarded

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        for kind, wrap in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                return wrap(self._guard(behavior, method), **codec)
        return handler


#: Channel arguments of every TCP channel between Ferry's agents (a node's catalog
#: service, the controller's node agents, chunk streams); a caller's own win.
#: Values an operator can leave on: a handful of bytes per connection every 10 s.
LINK_OPTIONS: tuple[tuple[str, int], ...] = (
    # A peer back from a restart or a cut link is tried again within a second:
    # gRPC's default backoff grows 1.6x per failed attempt up to two minutes, so a
    # node cut off for a minute could stay silent for minutes after the heal (its
    # heartbeat refused, the node counted lost). One SYN a second to a peer that is
    # down costs nothing. The minimum is also gRPC's connect timeout: ample on the
    # networks between nodes of one cluster.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A connection whose peer vanished without a word (a cut link, a dead host:
    # no FIN, no RST) is closed within 15 s, calls on it fail UNAVAILABLE instead
    # of waiting out their deadlines, and the next call gets a new connection. Idle
    # connections too (a node's channels are idle between heartbeats), and with no
    # cap on pings without data (gRPC's default stops pinging after two).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
#: What every server admits of those pings: one every 5 s (half the clients'
#: period, so timer slack never counts as a strike), with or without calls.
#: gRPC's default (one per 5 minutes without data) answers a client pinging every
#: 10 s with GOAWAY "too_many_pings" after two strikes.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
)


def _link_options(options: Sequence[tuple[str, int | str]]) -> list[tuple[str, int | str]]:
    """:data:`LINK_OPTIONS` with ``options`` in place of any they name."""
    named = {key for key, _ in options}
    return [*(o for o in LINK_OPTIONS if o[0] not in named), *options]


def open_channel(
    endpoint: str,
    security: AgentSecurity,
    server: Identity,
    options: Sequence[tuple[str, int | str]] = (),
    *,
    fallbacks: Sequence[str] = (),
) -> grpc.Channel:
    """A channel to the agent ``server`` at ``endpoint``, secured as ``security`` says;
    ``options`` are gRPC channel arguments (message size limits, say).

    ``fallbacks``: more ``ip:port`` addresses of replicas of the same server; the
    channel uses the first that answers and moves on when it stops answering
    (gRPC's pick_first over an ``ipv4:``/``ipv6:`` address list, so IP literals only).
    """
    parsed = parse_endpoint(endpoint)
    if parsed.scheme == "unix":
        return grpc.insecure_channel(f"unix://{parsed.address}", options=list(options))
    security.check(parsed, f"{server}'s agent API")
    address = _address_list(parsed.address, fallbacks) if fallbacks else parsed.address
    options = _link_options(options)
    if security.tls is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=security.tls.ca_pem,
        private_key=security.tls.key_pem,
        certificate_chain=security.tls.cert_pem,
    )
    # The server must prove it is `server`, whatever address it registered.
    target = [("grpc.ssl_target_name_override", server.dns_name), *options]
    return grpc.secure_channel(address, credentials, options=target)


def _address_list(first: str, fallbacks: Sequence[str]) -> str:
    """A gRPC ``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,...``) target; InvalidArgument for names."""
    addresses = [first, *fallbacks]
    hosts = [a.rpartition(":")[0].strip("[]") for a in addresses]
    try:
        versions = {ipaddress.ip_address(h).version for h in hosts}
    except ValueError:
        raise InvalidArgument(
            f"replicas {', '.join(addresses)}: several addresses must all be IP literals "
            "(a host name resolves to its own list: give that one name instead)"
        ) from None
    if len(versions) > 1:
        raise InvalidArgument(f"replicas {', '.join(addresses)} mix IPv4 and IPv6 addresses")
    return f"ipv{versions.pop()}:" + ",".join(addresses)


def _prepare_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FailedPrecondition(
            f"{path} exists and is not a socket; refusing to replace it: remove it or "
            "choose another endpoint"
        )
    path.unlink()  # a stale socket from a previous run


def start_server(
    endpoint: str,
    registrations: list[Registration],
    *,
    max_workers: int = 32,
    agents: tuple[AgentSecurity, Admission] | None = None,
    enrolling: TlsBundle | None = None,
) -> tuple[grpc.Server, Endpoint]:
    """Start a gRPC server with ``registrations`` on ``endpoint``; return it running.

    ``agents`` makes it a server for Ferry's agents: its security and who
    may call it (see the module docstring). Without it, plain gRPC (CSI).
    ``enrolling``: TCP with TLS that authenticates this server only, with
    that certificate (a caller without one asks for it here).
    """
    parsed = parse_endpoint(endpoint)
    if enrolling is not None and parsed.scheme != "tcp":
        raise InvalidArgument(f"enrollment is served over TLS on tcp://, not {endpoint}")
    tls: TlsBundle | None = enrolling
    interceptors: list[grpc.ServerInterceptor[Any, Any]] = []
    if agents is not None and parsed.scheme == "tcp":
        security, admit = agents
        security.check(parsed, "the agent API")
        tls = security.tls
        if tls is None:
            log.warning(
                "agent API in plaintext",
                extra={"endpoint": endpoint, "flag": "--insecure-agent-api"},
            )
        else:
            interceptors.append(PeerGate(admit))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=list(SERVER_OPTIONS),
    )
    for register in registrations:
        register(server)
    if parsed.scheme == "unix":
        _prepare_socket(Path(parsed.address))
        server.add_insecure_port(f"unix://{parsed.address}")
    else:
        if tls is None:
            port = server.add_insecure_port(parsed.address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key_pem, tls.cert_pem)],
                root_certificates=None if enrolling else tls.ca_pem,
                require_client_auth=enrolling is None,
            )
            port = server.add_secure_port(parsed.address, credentials)
        if port == 0:
            raise FailedPrecondition(f"cannot listen on {parsed.address}; is it in use?")
        parsed = Endpoint("tcp", f"{parsed.address.rpartition(':')[0]}:{port}")
    server.start()
    if parsed.scheme == "unix":
        os.chmod(parsed.address, 0o660)
    log.info("serving", extra={"endpoint": str(parsed)})
    return server, parsed
