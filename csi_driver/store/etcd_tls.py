"""Mutual TLS from Ferry's etcd client to the catalog's etcd members (``etcds://``).

The same rules as the agent API (``csi_driver.transport``), spoken over
HTTPS to etcd's gateway instead of gRPC:

- The client presents this process's own certificate (its Ferry identity,
  from ``--tls-dir``); etcd's ``--client-cert-auth`` admits it only if the
  cluster CA signed it.
- The client trusts the cluster CA alone (never the system's roots, never
  ``REQUESTS_CA_BUNDLE``), and the member must prove it is a ``catalog``
  agent: its certificate must name ``catalog.ferry.csi.dev``, whatever
  address it was reached at (the counterpart of the agent API's target-name
  override). A certificate of the same CA for another identity (a node's, the
  controller's) is refused, so a compromised node cannot pose as the catalog.
- The private key never touches the disk: ``ssl`` loads it from an anonymous
  in-memory file that is closed as soon as it is read.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from requests.adapters import HTTPAdapter

from csi_driver.core.errors import FailedPrecondition
from csi_driver.pki import Identity, Role, TlsBundle

#: The name every catalog member's certificate carries (see the module doc).
CATALOG_SERVER_NAME = Identity(Role.CATALOG).dns_name


def client_context(tls: TlsBundle) -> ssl.SSLContext:
    """An ``SSLContext`` presenting ``tls``'s certificate and trusting only its CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=tls.ca_pem.decode())
    # load_cert_chain reads only from a path: give it one that lives in memory.
    fd = os.memfd_create("ferry-etcd-client", os.MFD_CLOEXEC)
    try:
        os.write(fd, tls.cert_pem + tls.key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except (OSError, ssl.SSLError) as exc:
        raise FailedPrecondition(
            f"cannot use the {tls.identity} certificate for the etcd catalog ({exc}): "
            "check the files in --tls-dir (`ferry ca issue` makes a working set)"
        ) from exc
    finally:
        os.close(fd)
    return context


class CatalogTlsAdapter(HTTPAdapter):
    """An HTTPS adapter that speaks to etcd members as ``tls``'s identity (module doc)."""

    def __init__(self, tls: TlsBundle, *, pool_connections: int, pool_maxsize: int) -> None:
        self._context = client_context(tls)
        super().__init__(pool_connections=pool_connections, pool_maxsize=pool_maxsize)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        # urllib3 checks the peer against assert_hostname instead of the
        # address it dialled (and turns the context's own check off for it).
        kwargs.update(ssl_context=self._context, assert_hostname=CATALOG_SERVER_NAME)
        super().init_poolmanager(*args, **kwargs)
