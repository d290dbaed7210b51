"""How lines that gRPC core writes to stderr become Ferry log records."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from csi_driver.log import NativeLines, native_record
from csi_driver.pki import CA_CERT, CERT, KEY
from tests.certs import Pki
from tests.store.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster, EtcdTls

ROOT = Path(__file__).resolve().parents[1]

NO_CERT = (
    "I1126 21:01:13.301672   12736 ssl_transport_security.cc:2563] Handshake failed with error "
    "SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:"
    "PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context"
)


@pytest.mark.parametrize(
    ("line", "level", "message", "fields"),
    [
        (
            NO_CERT,
            logging.WARNING,
            "tls handshake failed",
            {
                "source": "ssl_transport_security.cc:2563",
                "reason": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
                "detail": NO_CERT.partition("] ")[2],
            },
        ),
        (
            "E1126 21:01:13.305847   12728 ssl_transport_security.cc:3238] No match found for "
            "server name: n2.node.ferry.csi.dev",
            logging.ERROR,
            "No match found for server name: n2.node.ferry.csi.dev",
            {"source": "ssl_transport_security.cc:3238"},
        ),
        (
            "W0000 00:00:1732655000.123 4242 chttp2_transport.cc:99] keepalive",
            logging.WARNING,
            "keepalive",
            {"source": "chttp2_transport.cc:99"},
        ),
        ("Segmentation fault", logging.WARNING, "Segmentation fault", {}),
    ],
)
def test_native_lines_keep_their_severity_and_source(
    line: str, level: int, message: str, fields: dict[str, str]
) -> None:
    assert native_record(line) == (level, message, fields)


#: What gRPC core wrote when etcd refused a client certificate of another CA (TLS 1.3:
#: the refusal is an alert after the client's handshake), from a real run.
REFUSED_AFTER_HANDSHAKE = (
    "E1127 08:17:27.651811   23330 ssl_transport_security_utils.cc:115] Corruption detected.",
    "E1127 08:17:27.651864   23330 ssl_transport_security_utils.cc:72] "
    "error:10000412:SSL routines:OPENSSL_internal:SSLV3_ALERT_BAD_CERTIFICATE",
    "E1127 08:17:27.651874   23330 secure_endpoint.cc:269] Decryption error: TSI_DATA_CORRUPTED",
)


def _fed(lines: tuple[str, ...]) -> list[tuple[int, str, dict[str, str]]]:
    reader = NativeLines()
    return [record for line in lines for record in reader.feed(line)]


def test_a_peers_refusal_after_the_handshake_is_one_warning_not_corruption() -> None:
    records = _fed(REFUSED_AFTER_HANDSHAKE)
    assert records[0] == (
        logging.WARNING,
        "tls connection refused by the peer",
        {
            "source": "ssl_transport_security_utils.cc:115",
            "reason": "SSLV3_ALERT_BAD_CERTIFICATE",
            "detail": REFUSED_AFTER_HANDSHAKE[1].partition("] ")[2],
        },
    )
    assert [level for level, _, _ in records[1:]] == [logging.DEBUG]
    assert not any("orrupt" in message for _, message, _ in records)


def test_real_corruption_is_still_an_error() -> None:
    bad_mac = (
        REFUSED_AFTER_HANDSHAKE[0],
        "E1127 08:17:27.651864   23330 ssl_transport_security_utils.cc:72] "
        "error:1e000065:Cipher functions:OPENSSL_internal:BAD_DECRYPT",
        REFUSED_AFTER_HANDSHAKE[2],
    )
    records = _fed(bad_mac)
    assert records[0][:2] == (logging.ERROR, "tls data corrupted")
    assert records[0][2]["reason"] == "BAD_DECRYPT"
    assert records[1] == (
        logging.ERROR,
        "Decryption error: TSI_DATA_CORRUPTED",
        {"source": "secure_endpoint.cc:269"},
    )
    # A "Corruption detected." without a reason after it is not lost either.
    assert _fed((REFUSED_AFTER_HANDSHAKE[0], NO_CERT))[0][:2] == (
        logging.ERROR,
        "tls data corrupted",
    )


REFUSED_CLIENT = """
import sys
from pathlib import Path
from csi_driver import log
from csi_driver.core.errors import StoreUnavailable
from csi_driver.pki import TlsBundle
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore

log.route_native_stderr()
log.configure("debug", "json")
bundle = TlsBundle.load(Path(sys.argv[2]))
store = EtcdStore([EtcdEndpoint("127.0.0.1", int(sys.argv[1]))], tls=bundle, request_timeout_s=2)
try:
    store.get("k")
except StoreUnavailable:
    print("refused")
"""


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EtcdCluster, Pki]]:
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    pki = Pki.create(tmp_path / "pki")
    server = pki.issue("catalog", ips=("127.0.0.1",))
    cluster = EtcdCluster(tmp_path, 1, EtcdTls(server, pki.issue("controller"))).start()
    try:
        yield cluster, pki
    finally:
        cluster.close()


def test_a_ferry_process_logs_an_etcd_refusal_as_one(
    tls_etcd: tuple[EtcdCluster, Pki], tmp_path: Path
) -> None:
    """A real process whose certificate (of another CA) a real TLS etcd refuses."""
    cluster, pki = tls_etcd
    stranger = Pki.create(tmp_path / "other").issue("controller")
    # It trusts the etcd's CA (and its own, so that it loads), so only etcd's refusal
    # of its certificate stops it.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in (CERT, KEY):
        (bundle / name).write_bytes((stranger / name).read_bytes())
    etcd_ca = pki.ca.cert.public_bytes(serialization.Encoding.PEM)
    (bundle / CA_CERT).write_bytes(etcd_ca + (stranger / CA_CERT).read_bytes())
    done = subprocess.run(
        [sys.executable, "-c", REFUSED_CLIENT, str(cluster.members[0].client_port), str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.stdout.strip() == "refused", done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    refusals = [r for r in records if r["msg"] == "tls connection refused by the peer"]
    assert refusals and refusals[0]["reason"] == "SSLV3_ALERT_BAD_CERTIFICATE"
    assert "Corruption" not in done.stderr and "tls data corrupted" not in done.stderr
