"""Node enrollment: a node gets its certificate from the controller, not from the CA's key.

Only the controller holds the cluster CA's private key. A node pod starts
with the CA certificate and the installation's enrollment token, makes its
own key pair, and sends the controller a signing request for its public key
(:func:`enroll`, ``ferry ca enroll``). The controller (:class:`EnrollmentServicer`,
``ferry controller --enroll-listen``) checks the token and signs that key.

Invariants:

- Whatever a request says, the certificate names ``node/<node_id>`` and
  nothing else: no enrollment yields a ``controller`` or ``catalog``
  certificate, so a compromised node cannot mint one (with the CA's key in
  every pod, it could).
- The node's private key never leaves the node.
- The channel is TLS in which the controller proves it is ``controller``
  under the CA the node was given; the node cannot present a certificate
  yet, so the token authenticates it. A wrong token is refused with
  UNAUTHENTICATED and logged with the caller's address; the token is
  compared in constant time and never logged.
- What a token holder can do is enroll as a node, any node: the token is
  as secret as a node certificate, mounted in node and controller pods only.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from csi_driver.core.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from csi_driver.gen.ferry.v1 import enrollment_pb2, enrollment_pb2_grpc
from csi_driver.pki import (
    CertificateAuthority,
    Identity,
    TlsBundle,
    enrolled_bundle,
    signing_request,
)
from csi_driver.rpc.errors import rpc
from csi_driver.transport import Endpoint, parse_endpoint, start_server

log = logging.getLogger(__name__)

#: The controller's enrollment port in the chart and deploy/ manifests.
ENROLL_PORT = 7401
#: Shorter tokens are refused: the token is all that stands between a caller and a
#: node certificate.
MIN_TOKEN_CHARS = 32
#: Between attempts while the controller is not answering yet (it starts after the
#: catalog; a node pod may come up first).
RETRY_S = 2.0


def load_token(path: Path) -> str:
    """The enrollment token in ``path`` (surrounding whitespace dropped)."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise NotFound(
            f"no enrollment token at {path}: mount the ferry-enrollment Secret there"
        ) from None
    if len(token) < MIN_TOKEN_CHARS:
        raise InvalidArgument(
            f"the enrollment token in {path} has {len(token)} characters, fewer than "
            f"{MIN_TOKEN_CHARS}: make a random one (e.g. `openssl rand -hex 32`)"
        )
    return token


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServicer):
    """Signs a node's own key for its node identity, for callers with the token."""

    def __init__(self, ca: CertificateAuthority, token: str) -> None:
        self._ca = ca
        self._token = token.encode()

    @rpc(required=("token", "node_id", "csr_pem"))
    def Enroll(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not hmac.compare_digest(request.token.encode(), self._token):
            log.warning(
                "enrollment refused",
                extra={"peer_address": context.peer(), "node": request.node_id},
            )
            raise Unauthenticated(
                "wrong enrollment token: give the one in the ferry-enrollment Secret"
            )
        identity = Identity.node(request.node_id)
        cert = self._ca.sign_request(request.csr_pem, identity, ips=tuple(request.ips))
        log.info(
            "node enrolled",
            extra={
                "peer_address": context.peer(),
                "node": request.node_id,
                "ips": list(request.ips),
            },
        )
        return enrollment_pb2.EnrollResponse(cert_pem=cert, ca_pem=self._ca.cert_pem())


@dataclass(frozen=True)
class EnrollmentSettings:
    """``ferry controller --enroll-listen --ca-dir --enroll-token-file``."""

    listen: str
    ca_dir: Path
    token_file: Path


def serve_enrollment(
    settings: EnrollmentSettings, controller: TlsBundle | None
) -> tuple[grpc.Server, Endpoint]:
    """Serve :class:`EnrollmentServicer` where ``settings`` say (TLS as ``controller``)."""
    if controller is None or controller.identity != Identity.controller():
        raise InvalidArgument(
            "enrollment is served as the controller over TLS: give --tls-dir with the "
            "controller's certificate"
        )
    ca = CertificateAuthority.load(settings.ca_dir)
    servicer = EnrollmentServicer(ca, load_token(settings.token_file))

    def register(server: grpc.Server) -> None:
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(servicer, server)

    return start_server(settings.listen, [register], max_workers=4, enrolling=controller)


def enroll(
    endpoint: str,
    token: str,
    node_id: str,
    ca_pem: bytes,
    *,
    ips: tuple[str, ...] = (),
    timeout_s: float = 300.0,
) -> TlsBundle:
    """Ask the controller at ``endpoint`` for node ``node_id``'s certificate.

    Retries while the controller cannot be reached, until ``timeout_s``; a
    refusal (wrong token, bad request) is raised at once.
    """
    identity = Identity.node(node_id)
    target = parse_endpoint(endpoint)
    if target.scheme != "tcp":
        raise InvalidArgument(f"enrollment goes over TLS to a tcp:// endpoint, not {endpoint}")
    key = ec.generate_private_key(ec.SECP256R1())
    request = enrollment_pb2.EnrollRequest(
        token=token, node_id=identity.node_id, csr_pem=signing_request(key), ips=list(ips)
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    # The controller must prove it is the controller, whatever address answered.
    options = [("grpc.ssl_target_name_override", Identity.controller().dns_name)]
    deadline = time.monotonic() + timeout_s
    with grpc.secure_channel(target.address, credentials, options=options) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        while True:
            left = deadline - time.monotonic()
            try:
                reply = stub.Enroll(request, timeout=max(1.0, min(30.0, left)))
                return enrolled_bundle(key, reply.cert_pem, reply.ca_pem)
            except grpc.RpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.UNAUTHENTICATED:
                    raise Unauthenticated(exc.details() or "enrollment refused") from None
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise InvalidArgument(
                        f"the controller refused the enrollment: {exc.details()}"
                    ) from None
                if time.monotonic() + RETRY_S > deadline:
                    raise DeadlineExceeded(
                        f"no controller answered at {endpoint} within {timeout_s:.0f}s "
                        f"({exc.details()}): check that it runs with --enroll-listen"
                    ) from None
                log.info("controller not answering yet", extra={"endpoint": endpoint})
                time.sleep(RETRY_S)
