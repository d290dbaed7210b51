"""Mutual TLS from Ferry's etcd client to the catalog's etcd members (``etcds://``).

Two ways to trust the members, chosen by where the credentials come from:

- **Ferry's own PKI** (``--tls-dir``, a :class:`TlsBundle`): the same rules as
  the agent API (``csi_driver.transport``), spoken to etcd's gRPC API. The
  client presents this process's own certificate (its Ferry identity);
  etcd's ``--client-cert-auth`` admits it only if the cluster CA signed it.
  The member must prove it is a ``catalog`` agent: its certificate must name
  ``catalog.ferry.csi.dev``, whatever address it was reached at (gRPC's
  target-name override, as for the agent API). A certificate of the same CA
  for another identity (a node's, the controller's) is refused, so a
  compromised node cannot pose as the catalog.
- **The etcd's own PKI** (``--catalog-tls-dir``, a :class:`ClientTlsBundle`),
  for an existing etcd that will not trust Ferry's CA: the client presents
  that bundle's certificate, trusts that bundle's CA, and checks each member
  by the host name or IP address it dialled (standard verification).

Either way:

- Only the bundle's CA counts: gRPC is given it as the root certificates, so
  it never falls back to its bundled roots or to
  ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``.
- There is no fallback to plaintext.
- The private key never touches the disk: gRPC takes it from memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

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

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials presenting this certificate and trusting only this CA."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """gRPC channel arguments that make each member prove ``server_name``, if set."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]
