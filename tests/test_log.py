"""How lines that gRPC core writes to stderr become Ferry log records."""

from __future__ import annotations

import logging

import pytest

from csi_driver.log import native_record

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
