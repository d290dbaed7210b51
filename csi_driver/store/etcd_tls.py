"""Mutual TLS from Ferry's etcd client to the catalog's etcd members (``etcds://``).

Two ways to trust the members, chosen by where the credentials come from:

- **Ferry's own PKI** (``--tls-dir``, a :class:`TlsBundle`): the same rules as
  the agent API (``csi_driver.transport``), spoken over HTTPS to etcd's
  gateway instead of gRPC. The client presents this process's own
  certificate (its Ferry identity); etcd's ``--client-cert-auth`` admits it
  only if the cluster CA signed it. The member must prove it is a
  ``catalog`` agent: its certificate must name ``catalog.ferry.csi.dev``,
  whatever address it was reached at (the counterpart of the agent API's
  target-name override). A certificate of the same CA for another identity
  (a node's, the controller's) is refused, so a compromised node cannot pose
  as the catalog.
- **The etcd's own PKI** (``--catalog-tls-dir``, a :class:`ClientTlsBundle`),
  for an existing etcd that will not trust Ferry's CA: the client presents
  that bundle's certificate, trusts that bundle's CA, and checks each member
  by the host name or IP address it dialled (standard verification).

Either way:

- Only the bundle's CA counts: never the system's roots, never certifi's,
  never ``REQUESTS_CA_BUNDLE`` (``requests`` would add a bundle path to every
  connection; :class:`CatalogTlsAdapter` refuses to let it).
- There is no fallback to plaintext.
- The private key never touches the disk: ``ssl`` loads it from an anonymous
  in-memory file that is closed as soon as it is read.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool

from csi_driver.core.errors import FailedPrecondition
from csi_driver.pki import CA_CERT, CERT, ClientTlsBundle, Identity, Role, TlsBundle

#: The name every catalog member's certificate carries under Ferry's PKI (module doc).
CATALOG_SERVER_NAME = Identity(Role.CATALOG).dns_name


@dataclass(frozen=True)
class CatalogTls:
    """How this process speaks TLS to the etcd members, and how it explains refusals."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    #: The name each member must prove; None: the host or address it was dialled at.
    server_name: str | None
    #: What to fix when a member's certificate is refused, and when it refuses ours.
    member_hint: str
    client_hint: str
    #: Who this process is, as a message says it.
    presenting: str

    @classmethod
    def of(cls, tls: TlsBundle | ClientTlsBundle) -> CatalogTls:
        if isinstance(tls, TlsBundle):
            return cls(
                tls.ca_pem,
                tls.cert_pem,
                tls.key_pem,
                server_name=CATALOG_SERVER_NAME,
                member_hint="each etcd member needs a certificate of this cluster's CA for the "
                f"identity 'catalog' (`ferry ca issue --name catalog`, naming "
                f"{CATALOG_SERVER_NAME})",
                client_hint="etcd's --trusted-ca-file must hold this cluster's CA, and "
                "--tls-dir a certificate it issued",
                presenting=f"the {tls.identity} certificate of --tls-dir",
            )
        where = tls.directory
        return cls(
            tls.ca_pem,
            tls.cert_pem,
            tls.key_pem,
            server_name=None,
            member_hint=f"each etcd member needs a certificate signed by a CA in "
            f"{where / CA_CERT} that names the host or IP address --catalog gives for it "
            "(a subjectAltName)",
            client_hint=f"etcd's --trusted-ca-file must hold the CA that signed "
            f"{where / CERT} (--catalog-tls-dir)",
            presenting=f"the client certificate in --catalog-tls-dir {where}",
        )

    def context(self) -> ssl.SSLContext:
        """An ``SSLContext`` presenting this certificate and trusting only this CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cadata=self.ca_pem.decode())
        # load_cert_chain reads only from a path: give it one that lives in memory.
        fd = os.memfd_create("ferry-etcd-client", os.MFD_CLOEXEC)
        try:
            os.write(fd, self.cert_pem + self.key_pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        except (OSError, ssl.SSLError) as exc:
            raise FailedPrecondition(
                f"cannot use {self.presenting} for the etcd catalog ({exc}): check those files"
            ) from exc
        finally:
            os.close(fd)
        return context


class CatalogTlsAdapter(HTTPAdapter):
    """An HTTPS adapter that speaks to etcd members as ``tls`` says (module doc)."""

    def __init__(self, tls: CatalogTls, *, pool_connections: int, pool_maxsize: int) -> None:
        self._tls = tls
        self.context = tls.context()
        super().__init__(pool_connections=pool_connections, pool_maxsize=pool_maxsize)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(ssl_context=self.context)
        if self._tls.server_name is not None:
            # urllib3 checks the peer against assert_hostname instead of the
            # address it dialled (and turns the context's own check off for it).
            kwargs.update(assert_hostname=self._tls.server_name)
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: HTTPConnectionPool, url: str, verify: Any, cert: Any) -> None:
        # requests would hand every connection certifi's bundle (or the
        # environment's), which urllib3 loads into our context on top of the
        # bundle's CA. Verification stays on; the context alone says whom to trust.
        super().cert_verify(conn, url, verify, cert)
        conn.ca_certs = None  # type: ignore[attr-defined]
        conn.ca_cert_dir = None  # type: ignore[attr-defined]
