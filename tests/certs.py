"""Real certificates for tests: a cluster CA in a directory and bundles it issued.

``ForeignPki`` is another organisation's PKI (an existing etcd's), made
without Ferry's pki at all.

``Pki.handmade`` is a certificate the CA signed outside ``ferry ca``: by
default without a Ferry identity, as another user of a shared CA (a
cert-manager issuer, say) would hold; or with another kind of key.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi_driver.pki import CA_CERT, CERT, KEY, CertificateAuthority, Identity, TlsBundle

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def write_bundle(
    directory: Path, ca: x509.Certificate, cert: x509.Certificate, key: PrivateKey
) -> Path:
    """Write a Secret-shaped bundle as another tool would (plain files, no checks)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CA_CERT).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / KEY).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory


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
        return write_bundle(directory, self.ca.cert, cert, key)


@dataclass(frozen=True)
class ForeignPki:
    """A PKI that is not Ferry's, made with ``cryptography`` directly (an existing etcd's).

    RSA keys, subjects and SANs as an etcd operator would issue them: no
    SPIFFE URI, no Ferry name. Each bundle directory is Secret-shaped, its
    ``ca.crt`` this CA.
    """

    root: Path
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, root: Path, name: str = "etcd-ca") -> ForeignPki:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(root, key, cert)

    def issue(
        self,
        name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
        valid_days: int = 30,
    ) -> Path:
        """A leaf for ``name`` (its CN) in ``root/name``; ``server``: also serverAuth."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        # valid_days < 0: a certificate that expired that many days ago.
        start = now - datetime.timedelta(days=max(0, -valid_days) + 1)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return write_bundle(self.root / name, self.cert, cert, key)
