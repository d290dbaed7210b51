"""Real certificates for tests: a cluster CA in a directory and bundles it issued.

``Pki.handmade`` is a certificate the CA signed outside ``ferry ca``: by
default without a Ferry identity, as another user of a shared CA (a
cert-manager issuer, say) would hold; or with another kind of key.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from csi_driver.pki import CA_CERT, CERT, KEY, CertificateAuthority, Identity, TlsBundle

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class Pki:
    root: Path
    ca: CertificateAuthority

    @classmethod
    def create(cls, root: Path) -> Pki:
        ca = CertificateAuthority.create()
        ca.save(root / "ca")
        return cls(root, ca)

    def issue(self, name: str, *, ips: tuple[str, ...] = ()) -> Path:
        """Issue ``name`` (``controller``, ``node/<id>``) into its own directory."""
        identity = Identity.parse(name)
        directory = self.root / identity.dir_name
        self.ca.issue(identity, ips=ips).write(directory)
        return directory

    def bundle(self, name: str) -> TlsBundle:
        return TlsBundle.load(self.issue(name))

    def handmade(self, key: PrivateKey | None = None, identity: Identity | None = None) -> Path:
        now = datetime.datetime.now(datetime.UTC)
        key = key or ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName("someone.example")]
        if identity is not None:
            names = [x509.UniformResourceIdentifier(identity.spiffe_id)]
        ca_key = serialization.load_pem_private_key((self.root / "ca" / KEY).read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")]))
            .issuer_name(self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        directory = self.root / f"handmade-{type(key).__name__}-{identity}"
        directory.mkdir(exist_ok=True)
        (directory / CA_CERT).write_bytes(self.ca.cert.public_bytes(serialization.Encoding.PEM))
        (directory / CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / KEY).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return directory
