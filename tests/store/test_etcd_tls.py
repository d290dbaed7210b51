"""``etcds://``: Ferry's etcd client over mutual TLS, against real etcd processes.

The contract itself runs over TLS in test_contract.py (the ``etcds``
backend). Here: who is refused, and how. The etcd of ``etcd_tls`` requires
client certificates of a CA made by Ferry's pki (``--client-cert-auth``); a
client without one, with a stranger CA's, or in plaintext is refused with
UNAVAILABLE and a message saying what to fix; and Ferry's client refuses an
etcd whose certificate is not a ``catalog`` certificate of its own CA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from csi_driver.core.errors import FailedPrecondition, StoreUnavailable
from csi_driver.pki import CA_CERT, TlsBundle
from csi_driver.rpc.errors import status_for
from csi_driver.store.base import CatalogStore
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore
from csi_driver.store.etcd_tls import CATALOG_SERVER_NAME
from csi_driver.store.url import open_store
from csi_driver.transport import AgentSecurity
from tests.certs import Pki
from tests.store.conftest import TlsEtcd
from tests.store.etcd_cluster import EtcdCluster, EtcdTls
from tests.test_cli import ferry


def _endpoints(cluster: EtcdCluster) -> list[EtcdEndpoint]:
    return [EtcdEndpoint("127.0.0.1", m.client_port) for m in cluster.members]


def refused(store: CatalogStore, *complaints: str) -> str:
    """Reads and writes both fail UNAVAILABLE, saying each of ``complaints``; the last
    message is returned."""
    try:
        for attempt in (lambda: store.get("k"), lambda: store.put("k", b"v")):
            with pytest.raises(StoreUnavailable) as caught:
                attempt()
            assert status_for(caught.value) is grpc.StatusCode.UNAVAILABLE
            for complaint in complaints:
                assert complaint in caught.value.message, caught.value.message
        return caught.value.message
    finally:
        store.close()


def test_open_store_speaks_tls_as_the_process_identity(etcd_tls: TlsEtcd) -> None:
    etcd_tls.cluster.wipe()
    security = AgentSecurity(TlsBundle.load(etcd_tls.client))
    store = open_store(etcd_tls.cluster.url, security=security)
    try:
        assert isinstance(store, EtcdStore) and store.tls
        store.put("k", b"over tls")
        record = store.get("k")
        assert record is not None and record.value == b"over tls"
    finally:
        store.close()


@pytest.mark.parametrize("security", [None, AgentSecurity(plaintext_tcp=True)])
def test_etcds_without_a_certificate_is_refused_before_any_connection(
    security: AgentSecurity | None,
) -> None:
    with pytest.raises(FailedPrecondition, match="give --tls-dir"):
        open_store("etcds://127.0.0.1:2379", security=security)


def test_a_client_without_a_certificate_is_refused_and_logged(etcd_tls: TlsEtcd) -> None:
    member = etcd_tls.cluster.members[0]
    with requests.Session() as anonymous:
        anonymous.trust_env = False
        anonymous.verify = str(etcd_tls.client / CA_CERT)  # it trusts the server alright
        with pytest.raises(requests.exceptions.SSLError):
            anonymous.post(member.client_url + "/v3/kv/range", json={"key": "AA=="}, timeout=5)
    assert "rejected connection" in member.log_path.read_text()


def test_a_client_certificate_of_another_ca_is_refused(etcd_tls: TlsEtcd, tmp_path: Path) -> None:
    theirs = Pki.create(tmp_path).bundle("controller")
    # It trusts our CA, so only etcd's refusal of its certificate can stop it.
    ours = etcd_tls.pki.ca.cert.public_bytes(serialization.Encoding.PEM)
    stranger = TlsBundle(ours, theirs.cert_pem, theirs.key_pem, theirs.identity, theirs.not_after)
    store = EtcdStore(_endpoints(etcd_tls.cluster), tls=stranger, request_timeout_s=2)
    refused(store, "certificate")


def test_plaintext_against_the_tls_etcd_is_refused_and_says_etcds(etcd_tls: TlsEtcd) -> None:
    store = EtcdStore(_endpoints(etcd_tls.cluster), request_timeout_s=2)
    refused(store, "the catalog URL must be etcds://")


@pytest.fixture(params=["another CA", "another identity"])
def impostor(
    request: pytest.FixtureRequest, etcd_tls: TlsEtcd, tmp_path: Path
) -> Iterator[EtcdCluster]:
    """An etcd that is not this cluster's catalog (it uses its bundle for its own checks)."""
    if request.param == "another CA":
        server = Pki.create(tmp_path / "other").issue("catalog", ips=("127.0.0.1",))
    else:
        server = etcd_tls.pki.issue("node/n1", ips=("127.0.0.1",))
    cluster = EtcdCluster(tmp_path, 1, EtcdTls(server, server)).start()
    yield cluster
    cluster.close()


def test_an_etcd_without_this_clusters_catalog_certificate_is_refused(
    impostor: EtcdCluster, etcd_tls: TlsEtcd
) -> None:
    store = EtcdStore(
        _endpoints(impostor), tls=TlsBundle.load(etcd_tls.client), request_timeout_s=2
    )
    refused(store, "does not accept as the catalog's", "nothing was written")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "asks for mutual TLS but this process has no certificate: give --tls-dir"),
        (("--tls-dir", "/nonexistent/tls"), "/nonexistent/tls/ca.crt does not exist"),
    ],
)
def test_ferry_on_etcds_without_a_usable_bundle_exits_1(
    tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    done = ferry(
        "controller", "--endpoint", f"unix://{tmp_path}/csi.sock",
        "--catalog", "etcds://127.0.0.1:2379", *extra,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


#: Run in a child process, so gRPC reads GRPC_DEFAULT_SSL_ROOTS_FILE_PATH afresh:
#: a call with gRPC's default roots (the control, which must succeed), then the
#: store's read; prints what each did.
_DEFAULT_ROOTS_PROBE = """
import sys
from pathlib import Path
import grpc
from csi_driver.core.errors import StoreUnavailable
from csi_driver.gen.etcd import rpc_pb2, rpc_pb2_grpc
from csi_driver.pki import CA_CERT, CERT, KEY, ClientTlsBundle, TlsBundle
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore
from csi_driver.store.etcd_tls import CATALOG_SERVER_NAME

port, member, client, kind = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
defaults = grpc.ssl_channel_credentials(
    None, (member / KEY).read_bytes(), (member / CERT).read_bytes()
)
channel = grpc.secure_channel(
    f"127.0.0.1:{port}", defaults, [("grpc.ssl_target_name_override", sys.argv[5])]
)
rpc_pb2_grpc.MaintenanceStub(channel).Status(rpc_pb2.StatusRequest(), timeout=5)
print("default roots: accepted")
bundle = TlsBundle.load(client) if kind == "ferry" else ClientTlsBundle.load(client)
store = EtcdStore([EtcdEndpoint("127.0.0.1", port)], tls=bundle, request_timeout_s=2)
try:
    store.get("k")
    print("store: accepted")
except StoreUnavailable as exc:
    print("store:", exc.message)
"""


def default_roots_probe(impostor: EtcdCluster, client: Path, kind: str, name: str) -> str:
    """What the probe printed against ``impostor``, whose own bundle (its CA as
    ``ca.crt``) is also the roots the environment gives gRPC."""
    assert impostor.tls is not None
    member = impostor.tls.server
    env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(member / CA_CERT)}
    port = str(impostor.members[0].client_port)
    argv = [sys.executable, "-c", _DEFAULT_ROOTS_PROBE, port, str(member), str(client), kind]
    done = subprocess.run([*argv, name], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_only_the_cluster_ca_is_trusted_never_grpcs_default_roots(
    etcd_tls: TlsEtcd, tmp_path: Path
) -> None:
    """Given no roots, gRPC trusts GRPC_DEFAULT_SSL_ROOTS_FILE_PATH (or roots it ships);
    the store gives the cluster CA, so a catalog of another CA stays refused even
    where the environment trusts that CA."""
    server = Pki.create(tmp_path / "other").issue("catalog", ips=("127.0.0.1",))
    impostor = EtcdCluster(tmp_path, 1, EtcdTls(server, server)).start()
    try:
        printed = default_roots_probe(impostor, etcd_tls.client, "ferry", CATALOG_SERVER_NAME)
    finally:
        impostor.close()
    assert "default roots: accepted" in printed  # the environment's roots do take effect
    assert "store: etcd member" in printed or "store: no etcd member" in printed, printed
    assert "does not accept as the catalog's" in printed
