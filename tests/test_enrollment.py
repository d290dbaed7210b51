"""Node enrollment on real gRPC over loopback TCP, and ``ferry ca enroll`` as a real process.

A node gets a certificate for its own key, for ``node/<id>`` only, from a
controller that holds the CA's key, by the enrollment token; nothing it
can send yields a controller certificate, and a node certificate cannot
act as the controller.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from csi_driver.agent_api.server import admitted_callers
from csi_driver.core.errors import DeadlineExceeded, InvalidArgument, Unauthenticated
from csi_driver.csi.identity import IdentityServicer
from csi_driver.enrollment import EnrollmentSettings, enroll, serve_enrollment
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.gen.ferry.v1 import enrollment_pb2, enrollment_pb2_grpc
from csi_driver.pki import CA_CERT, KEY, Identity, TlsBundle, identity_of, signing_request
from csi_driver.runtime import start_controller
from csi_driver.transport import AgentSecurity, Endpoint, open_channel, start_server
from tests.certs import Pki

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t" * 40


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
def controller(pki: Pki, tmp_path: Path) -> Iterator[Endpoint]:
    """The controller's enrollment service, holding the CA's key."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    settings = EnrollmentSettings("tcp://127.0.0.1:0", pki.root / "ca", token)
    server, bound = serve_enrollment(settings, pki.bundle("controller"))
    try:
        yield bound
    finally:
        server.stop(0)


def _ca_pem(pki: Pki) -> bytes:
    return (pki.root / "ca" / CA_CERT).read_bytes()


def _raw_enroll(endpoint: Endpoint, pki: Pki, node_id: str, token: str = TOKEN) -> bytes:
    """One Enroll call as any client could make it."""
    credentials = grpc.ssl_channel_credentials(root_certificates=_ca_pem(pki))
    options = [("grpc.ssl_target_name_override", Identity.controller().dns_name)]
    key = ec.generate_private_key(ec.SECP256R1())
    with grpc.secure_channel(endpoint.address, credentials, options=options) as channel:
        reply = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
            enrollment_pb2.EnrollRequest(
                token=token, node_id=node_id, csr_pem=signing_request(key)
            ),
            timeout=10,
        )
    return bytes(reply.cert_pem)


def _ferry_ca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", "ca", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


def test_a_node_enrolls_with_the_token_and_keeps_its_key(
    pki: Pki, controller: Endpoint, tmp_path: Path
) -> None:
    token = tmp_path / "node-token"
    token.write_text(TOKEN)
    ca_cert = tmp_path / "ca.crt"  # what a node pod gets: the certificate only
    ca_cert.write_bytes(_ca_pem(pki))
    out = tmp_path / "tls"
    done = _ferry_ca(
        "enroll",
        f"--server=tcp://{controller.address}",
        f"--token-file={token}",
        f"--ca-cert={ca_cert}",
        "--name=node/worker-1",
        "--ip=10.0.0.11",
        f"--out={out}",
        "--timeout=30",
    )
    assert done.returncode == 0, done.stderr
    bundle = TlsBundle.load(out)
    assert bundle.identity == Identity.node("worker-1")
    cert = x509.load_pem_x509_certificate(bundle.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.11"]
    assert (out / KEY).stat().st_mode & 0o777 == 0o600
    # The enrolled node works as an agent: it serves the controller over mTLS.
    server, bound = start_server(
        "tcp://127.0.0.1:0",
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(
                IdentityServicer([], controller=False), s
            )
        ],
        agents=(AgentSecurity(bundle), admitted_callers("worker-1")),
    )
    try:
        security = AgentSecurity(pki.bundle("controller"))
        with open_channel(str(bound), security, Identity.node("worker-1")) as channel:
            csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=10
            )
    finally:
        server.stop(0)


def test_a_wrong_token_is_refused_and_logged(
    pki: Pki, controller: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="csi_driver.enrollment"),
        pytest.raises(Unauthenticated, match="wrong enrollment token"),
    ):
        enroll(f"tcp://{controller.address}", "x" * 40, "worker-1", _ca_pem(pki))
    refused = [r for r in caplog.records if r.getMessage() == "enrollment refused"]
    assert refused and refused[0].__dict__["node"] == "worker-1"
    assert "127.0.0.1" in refused[0].__dict__["peer_address"]
    assert "x" * 40 not in caplog.text and TOKEN not in caplog.text


def test_no_request_yields_a_controller_certificate(
    pki: Pki, controller: Endpoint, tmp_path: Path
) -> None:
    # Whatever the node id says, the certificate names a node.
    cert = x509.load_pem_x509_certificate(_raw_enroll(controller, pki, "controller"))
    assert identity_of(cert) == Identity.node("controller")
    for bad in ("catalog/", "../controller", "node/n1"):
        with pytest.raises(grpc.RpcError) as refused:
            _raw_enroll(controller, pki, bad)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    token = tmp_path / "token"
    token.write_text(TOKEN)
    done = _ferry_ca(
        "enroll",
        f"--server=tcp://{controller.address}",
        f"--token-file={token}",
        f"--ca-cert={pki.root / 'ca' / CA_CERT}",
        "--name=controller",
        f"--out={tmp_path / 'out'}",
    )
    assert done.returncode == 1 and "only nodes enroll" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_node_certificate_cannot_act_as_the_controller(
    pki: Pki, controller: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = enroll(f"tcp://{controller.address}", TOKEN, "worker-1", _ca_pem(pki))
    # Calling another node's agent API (the controller's right): refused and logged.
    server, bound = start_server(
        "tcp://127.0.0.1:0",
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(
                IdentityServicer([], controller=False), s
            )
        ],
        agents=(AgentSecurity(pki.bundle("node/worker-2")), admitted_callers("worker-2")),
    )
    try:
        with (
            caplog.at_level(logging.WARNING, logger="csi_driver.transport"),
            open_channel(str(bound), AgentSecurity(node), Identity.node("worker-2")) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=10
            )
    finally:
        server.stop(0)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert any(r.getMessage() == "peer refused" for r in caplog.records)
    # Running the controller with it: refused before anything starts.
    with pytest.raises(InvalidArgument, match="runs as controller"):
        start_controller(
            f"unix://{tmp_path}/csi.sock", f"sqlite://{tmp_path}/c.db", AgentSecurity(node)
        )
    # Serving enrollment with it (so that nodes would trust a node as their issuer): refused.
    settings = EnrollmentSettings("tcp://127.0.0.1:0", pki.root / "ca", tmp_path / "none")
    with pytest.raises(InvalidArgument, match="controller's certificate"):
        serve_enrollment(settings, node)


def test_a_node_refuses_an_issuer_that_is_not_the_controller(pki: Pki, tmp_path: Path) -> None:
    """A node checks the issuer: a server with a node certificate gets no request."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    impostor = pki.bundle("node/n9")
    settings = EnrollmentSettings("tcp://127.0.0.1:0", pki.root / "ca", token)
    with pytest.raises(InvalidArgument):
        serve_enrollment(settings, impostor)
    # Even a server that presents it (bypassing serve_enrollment's check) is refused.
    server, bound = start_server("tcp://127.0.0.1:0", [], enrolling=impostor)
    try:
        with pytest.raises(DeadlineExceeded, match="no controller answered"):
            enroll(f"tcp://{bound.address}", TOKEN, "worker-1", _ca_pem(pki), timeout_s=3)
    finally:
        server.stop(0)
