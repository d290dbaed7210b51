"""Mutual TLS between Ferry's agents, on real gRPC servers on loopback TCP sockets.

The server is node ``n1``'s agent API as the runtime configures it (its
certificate, the admission rule of ``agent_api.server``); each client is a
real gRPC channel holding the credentials a row names.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from csi_driver.agent_api.server import admitted_callers
from csi_driver.core.errors import FailedPrecondition
from csi_driver.csi.identity import IdentityServicer
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.log import JsonFormatter
from csi_driver.pki import Identity, TlsBundle
from csi_driver.transport import AgentSecurity, Endpoint, open_channel, start_server
from tests.certs import Pki


def _identity(server: grpc.Server) -> None:
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer([], controller=False), server)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node_n1(pki: Pki) -> Iterator[Endpoint]:
    """Node n1's agent API on a loopback port, requiring mTLS."""
    security = AgentSecurity(pki.bundle("node/n1"))
    server, bound = start_server(
        "tcp://127.0.0.1:0", [_identity], agents=(security, admitted_callers("n1"))
    )
    try:
        yield bound
    finally:
        server.stop(0)


def _call(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    with channel:
        try:
            reply = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=10
            )
        except grpc.RpcError as error:
            return error.code(), error.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, reply.name


def _ssl_channel(
    endpoint: Endpoint, ca: TlsBundle, client: TlsBundle | None, name: str
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.ca_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    options = [("grpc.ssl_target_name_override", name)]
    return grpc.secure_channel(endpoint.address, credentials, options=options)


@pytest.mark.parametrize(
    ("caller", "code"),
    [
        ("controller", grpc.StatusCode.OK),
        ("node/n1", grpc.StatusCode.OK),  # all-in-one calls its own agent
        ("node/n2", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_ferry_identities_are_admitted_by_role(
    pki: Pki, node_n1: Endpoint, caller: str, code: grpc.StatusCode
) -> None:
    security = AgentSecurity(pki.bundle(caller))
    got, details = _call(open_channel(str(node_n1), security, Identity.node("n1")))
    assert got == code, details
    if code is grpc.StatusCode.PERMISSION_DENIED:
        assert details == f"{caller} may not call /csi.v1.Identity/GetPluginInfo"


def test_a_certificate_of_the_ca_without_a_ferry_identity_is_unauthenticated(
    pki: Pki, node_n1: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = pki.handmade()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(foreign / "ca.crt").read_bytes(),
        private_key=(foreign / "tls.key").read_bytes(),
        certificate_chain=(foreign / "tls.crt").read_bytes(),
    )
    channel = grpc.secure_channel(
        node_n1.address,
        credentials,
        options=[("grpc.ssl_target_name_override", Identity.node("n1").dns_name)],
    )
    with caplog.at_level(logging.WARNING, logger="csi_driver.transport"):
        code, details = _call(channel)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "CN=someone-else" in details and "names no Ferry identity" in details
    refused = [r for r in caplog.records if r.getMessage() == "peer refused"]
    assert len(refused) == 1
    assert getattr(refused[0], "peer_address", "").startswith("ipv4:127.0.0.1:")


def test_clients_without_a_certificate_of_this_cluster_are_refused(
    pki: Pki, node_n1: Endpoint, tmp_path: Path
) -> None:
    controller = pki.bundle("controller")
    other = Pki.create(tmp_path).bundle("controller")
    name = Identity.node("n1").dns_name
    refused = {
        "no certificate": _call(_ssl_channel(node_n1, controller, None, name)),
        "another cluster's CA": _call(_ssl_channel(node_n1, controller, other, name)),
        "plaintext": _call(grpc.insecure_channel(node_n1.address)),
    }
    for why, (code, details) in refused.items():
        assert code is grpc.StatusCode.UNAVAILABLE, f"{why}: {code} {details}"
    # The same channel set-up with this cluster's certificate gets through.
    assert _call(_ssl_channel(node_n1, controller, controller, name))[0] is grpc.StatusCode.OK


def test_the_client_refuses_a_server_that_is_not_the_node_it_meant(
    pki: Pki, node_n1: Endpoint
) -> None:
    security = AgentSecurity(pki.bundle("controller"))
    code, details = _call(open_channel(str(node_n1), security, Identity.node("n2")))
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "Hostname Verification" in details


def test_a_server_of_another_cluster_is_refused(pki: Pki, tmp_path: Path) -> None:
    stranger = Pki.create(tmp_path).bundle("node/n1")
    server, bound = start_server(
        "tcp://127.0.0.1:0",
        [_identity],
        agents=(AgentSecurity(stranger), admitted_callers("n1")),
    )
    try:
        security = AgentSecurity(pki.bundle("controller"))
        code, _ = _call(open_channel(str(bound), security, Identity.node("n1")))
        assert code is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_plaintext_tcp_is_refused_on_both_sides_unless_allowed() -> None:
    plain = AgentSecurity()
    with pytest.raises(FailedPrecondition, match=r"--tls-dir .* --insecure-agent-api"):
        start_server("tcp://127.0.0.1:0", [_identity], agents=(plain, admitted_callers("n1")))
    with pytest.raises(FailedPrecondition, match="refusing plaintext TCP for node/n1's agent API"):
        open_channel("tcp://127.0.0.1:1", plain, Identity.node("n1"))

    allowed = AgentSecurity(plaintext_tcp=True)
    server, bound = start_server(
        "tcp://127.0.0.1:0", [_identity], agents=(allowed, admitted_callers("n1"))
    )
    try:
        code, _ = _call(open_channel(str(bound), allowed, Identity.node("n1")))
        assert code is grpc.StatusCode.OK
    finally:
        server.stop(0)


def test_unix_sockets_stay_plaintext_with_tls_configured(pki: Pki, tmp_path: Path) -> None:
    security = AgentSecurity(pki.bundle("node/n1"))
    server, bound = start_server(
        f"unix://{tmp_path}/agent.sock", [_identity], agents=(security, admitted_callers("n1"))
    )
    try:
        assert _call(grpc.insecure_channel(f"unix://{bound.address}"))[0] is grpc.StatusCode.OK
        client = AgentSecurity(pki.bundle("controller"))
        code, _ = _call(open_channel(str(bound), client, Identity.node("n1")))
        assert code is grpc.StatusCode.OK
    finally:
        server.stop(0)


def test_each_admitted_call_is_logged_with_the_peers_identity(pki: Pki, node_n1: Endpoint) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("csi_driver.transport")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        security = AgentSecurity(pki.bundle("controller"))
        assert (
            _call(open_channel(str(node_n1), security, Identity.node("n1")))[0]
            is grpc.StatusCode.OK
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    admitted = [json.loads(line) for line in out.getvalue().splitlines()]
    admitted = [line for line in admitted if line["msg"] == "peer admitted"]
    assert len(admitted) == 1
    assert admitted[0]["peer"] == "controller"
    assert admitted[0]["peer_address"].startswith("ipv4:127.0.0.1:")


def test_during_ca_rotation_agents_of_both_cas_talk(pki: Pki, tmp_path: Path) -> None:
    """Step 2 of the rotation in docs/operations.md: every ca.crt trusts old and new."""
    new = Pki.create(tmp_path)
    both = pki.bundle("controller").ca_pem + new.bundle("controller").ca_pem
    new_node = dataclasses.replace(new.bundle("node/n1"), ca_pem=both)
    server, bound = start_server(
        "tcp://127.0.0.1:0",
        [_identity],
        agents=(AgentSecurity(new_node), admitted_callers("n1")),
    )
    try:
        for caller in (pki.bundle("controller"), new.bundle("controller")):
            security = AgentSecurity(dataclasses.replace(caller, ca_pem=both))
            code, details = _call(open_channel(str(bound), security, Identity.node("n1")))
            assert code is grpc.StatusCode.OK, details
        old_only = AgentSecurity(pki.bundle("controller"))  # trusts the old CA only
        code, _ = _call(open_channel(str(bound), old_only, Identity.node("n1")))
        assert code is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_an_rsa_certificate_from_the_cluster_ca_is_admitted(pki: Pki, node_n1: Endpoint) -> None:
    """cert-manager issues RSA keys by default; gRPC and Ferry take them."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bundle = TlsBundle.load(pki.handmade(rsa_key, Identity.controller()))
    code, details = _call(open_channel(str(node_n1), AgentSecurity(bundle), Identity.node("n1")))
    assert code is grpc.StatusCode.OK, details
