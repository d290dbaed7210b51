"""The cluster PKI: one CA per Ferry cluster and the certificates of its agents.

Ferry's agents (the controller, each node) authenticate each other with
mutual TLS under a cluster CA. This module creates that CA, issues leaf
certificates and loads them; it imports no gRPC (``transport`` does).

Invariants:

- Every leaf names exactly one Ferry :class:`Identity` as a SPIFFE ID
  (``spiffe://ferry.csi.dev/controller``, ``spiffe://ferry.csi.dev/node/<id>``)
  in its only URI SAN: gRPC reports it as the peer's ``peer_spiffe_id``,
  which is what servers authorise. Which cluster a peer belongs to is
  decided by the CA that signed it, not by the name.
- Every leaf also carries the identity's DNS name
  (``controller.ferry.csi.dev``, ``<id>.node.ferry.csi.dev``). Clients check
  the server against that name (a target-name override), so the controller
  knows it reached node ``n1`` whatever address ``n1`` registered.
- Leaves are usable for server and client authentication alike: a node
  serves the controller and, later, calls its peers.
- Keys Ferry makes are ECDSA P-256: gRPC's BoringSSL refuses Ed25519
  certificates in the TLS handshake (NO_COMMON_SIGNATURE_ALGORITHMS, checked
  with grpcio 1.85). RSA keys made elsewhere (cert-manager) load too.
- On disk a bundle is laid out like a Kubernetes TLS Secret (``ca.crt``,
  ``tls.crt``, ``tls.key``), so a mounted Secret and a directory made by
  ``ferry ca`` load the same way. Key files are written 0600, each file
  atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi_driver.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

#: Keys Ferry loads: its own are ECDSA P-256; RSA is accepted for certificates
#: made elsewhere (cert-manager's default).
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

TRUST_DOMAIN = "ferry.csi.dev"
CA_CERT = "ca.crt"
CERT = "tls.crt"
KEY = "tls.key"

CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=365)
#: Tolerates clocks of other machines running slightly behind this one's.
_BACKDATE = datetime.timedelta(minutes=5)

#: A Kubernetes node name: a DNS-1123 subdomain.
_NODE_ID = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_NAME = re.compile(
    r"(\*\.)?[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"
)


class Role(Enum):
    CONTROLLER = "controller"
    NODE = "node"
    #: A member of the catalog's etcd: a server that Ferry's agents reach as clients.
    CATALOG = "catalog"


@dataclass(frozen=True)
class Identity:
    """Who a Ferry agent is: the controller, node ``node_id``, or a catalog member."""

    role: Role
    node_id: str = ""

    @classmethod
    def controller(cls) -> Identity:
        return cls(Role.CONTROLLER)

    @classmethod
    def node(cls, node_id: str) -> Identity:
        if len(node_id) > 200 or not _NODE_ID.fullmatch(node_id):
            raise InvalidArgument(
                f"node id {node_id!r} is not a Kubernetes node name (lowercase letters, digits, "
                "'-' and '.', at most 200 characters here)"
            )
        return cls(Role.NODE, node_id)

    @classmethod
    def parse(cls, text: str) -> Identity:
        """``controller``, ``catalog`` or ``node/<id>``: how operators name identities."""
        if text in (Role.CONTROLLER.value, Role.CATALOG.value):
            return cls(Role(text))
        role, sep, node_id = text.partition("/")
        if role == "node" and sep:
            return cls.node(node_id)
        raise InvalidArgument(
            f"identity {text!r} is not 'controller', 'catalog' or 'node/<node-id>' "
            "(e.g. node/worker-1)"
        )

    @classmethod
    def from_spiffe_id(cls, uri: str) -> Identity | None:
        """The identity a SPIFFE ID names, or None if it is not one of Ferry's."""
        prefix = f"spiffe://{TRUST_DOMAIN}/"
        if not uri.startswith(prefix):
            return None
        try:
            return cls.parse(uri[len(prefix) :])
        except InvalidArgument:
            return None

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/{self}"

    @property
    def dns_name(self) -> str:
        if self.role is Role.NODE:
            return f"{self.node_id}.node.{TRUST_DOMAIN}"
        return f"{self.role.value}.{TRUST_DOMAIN}"

    @property
    def dir_name(self) -> str:
        """A directory name for this identity's bundle (``controller``, ``node-<id>``)."""
        return f"node-{self.node_id}" if self.role is Role.NODE else self.role.value

    def __str__(self) -> str:
        return f"node/{self.node_id}" if self.role is Role.NODE else self.role.value


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600, so a key is never readable by others, even briefly.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """Report a directory Ferry cannot write in its own vocabulary, not as a traceback."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        yield
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot write {exc.filename or directory}: {exc.strerror}; choose another directory"
        ) from exc


def _read(directory: Path, name: str) -> bytes:
    path = directory / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(
            f"{path} does not exist: a TLS directory holds {CA_CERT}, {CERT} and {KEY} "
            "(a Kubernetes TLS Secret, or one made by `ferry ca issue`)"
        ) from None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {path}: {exc.strerror}") from exc


def _load_certs(directory: Path, name: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(directory, name))
    except ValueError as exc:
        raise InvalidArgument(f"{directory / name} is not a PEM certificate: {exc}") from exc


def _load_cert(directory: Path, name: str) -> x509.Certificate:
    return _load_certs(directory, name)[0]


def _load_key(directory: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(directory, KEY), password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(
            f"{directory / KEY} is not an unencrypted PEM private key: {exc}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidArgument(
            f"{directory / KEY} is neither an ECDSA nor an RSA key (gRPC's TLS refuses "
            "Ed25519 certificates): issue it with `ferry ca issue`"
        )
    return key


def _same_key(key: SigningKey, cert: x509.Certificate) -> bool:
    return key.public_key() == cert.public_key()


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_current(cert: x509.Certificate, path: Path, now: datetime.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise FailedPrecondition(
            f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: "
            "check this machine's clock"
        )
    if now >= cert.not_valid_after_utc:
        raise FailedPrecondition(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: issue a new one "
            "(`ferry ca issue`) or renew the Secret"
        )


def _load_pair(
    directory: Path,
) -> tuple[list[x509.Certificate], x509.Certificate, SigningKey]:
    """``ca.crt``'s certificates, ``tls.crt`` and its matching ``tls.key``."""
    cas = _load_certs(directory, CA_CERT)
    cert = _load_cert(directory, CERT)
    key = _load_key(directory)
    if not _same_key(key, cert):
        raise InvalidArgument(
            f"{directory / KEY} is not the key of {directory / CERT}: issue the pair again"
        )
    return cas, cert, key


def identity_of(cert: x509.Certificate) -> Identity | None:
    """The Ferry identity a certificate names in its URI SAN, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return Identity.from_spiffe_id(uris[0]) if len(uris) == 1 else None


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    start: datetime.datetime,
    end: datetime.datetime,
    *,
    signs_certificates: bool,
) -> x509.CertificateBuilder:
    """What a CA and a leaf certificate share: names, key, validity, key usage."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=signs_certificates,
                crl_sign=signs_certificates,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
    )


@dataclass(frozen=True)
class TlsBundle:
    """One agent's credentials: the cluster CA, its certificate and its key (PEM)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity: Identity
    not_after: datetime.datetime

    @classmethod
    def load(cls, directory: Path, *, now: datetime.datetime | None = None) -> TlsBundle:
        """Load and check a Secret-shaped directory; errors say which file is wrong.

        ``ca.crt`` may hold several CA certificates (old and new, while the CA
        is rotated): all are trusted, and one of them must have signed ``tls.crt``.
        """
        cas, cert, key = _load_pair(directory)
        ca = next((ca for ca in cas if _signed_by(cert, ca)), None)
        if ca is None:
            raise InvalidArgument(
                f"{directory / CERT} is not signed by the CA in {directory / CA_CERT}: "
                "issue it from this cluster's CA"
            )
        identity = identity_of(cert)
        if identity is None:
            raise InvalidArgument(
                f"{directory / CERT} names no Ferry identity (a URI SAN spiffe://{TRUST_DOMAIN}/"
                "controller or .../node/<id>): issue it with `ferry ca issue`"
            )
        when = now or datetime.datetime.now(datetime.UTC)
        _check_current(ca, directory / CA_CERT, when)
        _check_current(cert, directory / CERT, when)
        return cls.of(cas, cert, key, identity)

    @classmethod
    def of(
        cls,
        cas: list[x509.Certificate],
        cert: x509.Certificate,
        key: SigningKey,
        identity: Identity,
    ) -> TlsBundle:
        """The bundle of checked parts: CA certificates, the leaf, its key and identity."""
        return cls(
            ca_pem=b"".join(_pem(ca) for ca in cas),
            cert_pem=_pem(cert),
            key_pem=_key_pem(key),
            identity=identity,
            not_after=cert.not_valid_after_utc,
        )

    def write(self, directory: Path) -> None:
        """Write as ``ca.crt``, ``tls.crt``, ``tls.key``: the key first, then the certificates."""
        with _writing(directory):
            _write_atomically(directory / KEY, self.key_pem, 0o600)
            _write_atomically(directory / CERT, self.cert_pem, 0o644)
            _write_atomically(directory / CA_CERT, self.ca_pem, 0o644)


class CertificateAuthority:
    """The cluster CA: signs the certificates of Ferry's agents.

    On disk it is Secret-shaped as well (``tls.crt``, ``tls.key`` and
    ``ca.crt`` = ``tls.crt``), the layout cert-manager gives a self-signed
    CA, so the same directory can back a cert-manager CA issuer.
    """

    def __init__(self, key: SigningKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert

    @classmethod
    def create(
        cls,
        common_name: str = "Ferry cluster CA",
        *,
        lifetime: datetime.timedelta = CA_LIFETIME,
        now: datetime.datetime | None = None,
    ) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        start = (now or datetime.datetime.now(datetime.UTC)) - _BACKDATE
        cert = (
            _builder(name, name, key.public_key(), start, start + lifetime, signs_certificates=True)
            # path_length=0: the CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        if not (directory / CERT).exists():
            raise NotFound(
                f"{directory} holds no cluster CA: create one with "
                f"`ferry ca init --dir {directory}`"
            )
        cert = _load_cert(directory, CERT)
        key = _load_key(directory)
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not basic.ca or not _same_key(key, cert):
            raise InvalidArgument(
                f"{directory} does not hold a CA certificate and its key; "
                "create one with `ferry ca init`"
            )
        return cls(key, cert)

    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    def save(self, directory: Path) -> None:
        """Write the CA; refuses to replace one, which would orphan every issued certificate."""
        if (directory / KEY).exists() or (directory / CERT).exists():
            raise AlreadyExists(
                f"{directory} already holds a CA; replacing it would cut off every agent it "
                "certified: choose another directory (see 'Rotating the CA' in docs/operations.md)"
            )
        with _writing(directory):
            _write_atomically(directory / KEY, _key_pem(self._key), 0o600)
            _write_atomically(directory / CERT, _pem(self.cert), 0o644)
            _write_atomically(directory / CA_CERT, _pem(self.cert), 0o644)

    def issue(
        self,
        identity: Identity,
        *,
        ips: tuple[str, ...] = (),
        dns_names: tuple[str, ...] = (),
        lifetime: datetime.timedelta = LEAF_LIFETIME,
        now: datetime.datetime | None = None,
    ) -> TlsBundle:
        """A leaf for ``identity``, valid for server and client auth, with extra SANs."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(identity, key.public_key(), ips, dns_names, lifetime, now)
        return TlsBundle(
            ca_pem=_pem(self.cert),
            cert_pem=_pem(cert),
            key_pem=_key_pem(key),
            identity=identity,
            not_after=cert.not_valid_after_utc,
        )

    def sign_request(
        self, csr_pem: bytes, identity: Identity, *, ips: tuple[str, ...] = ()
    ) -> bytes:
        """A leaf (PEM) for ``identity`` over the public key of a signing request.

        The request's own names are ignored: what the certificate says is what
        the caller decided, so a requester cannot ask for more than ``identity``.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise InvalidArgument("the certificate signing request is not a PEM CSR") from None
        if not csr.is_signature_valid:
            raise InvalidArgument("the certificate signing request's signature does not verify")
        public = csr.public_key()
        if not (
            (isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1")
            or (isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048)
        ):
            raise InvalidArgument("the request's key must be ECDSA P-256 or RSA of 2048+ bits")
        return _pem(self._sign(identity, public, ips, (), LEAF_LIFETIME, None))

    def _sign(
        self,
        identity: Identity,
        public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        ips: tuple[str, ...],
        dns_names: tuple[str, ...],
        lifetime: datetime.timedelta,
        now: datetime.datetime | None,
    ) -> x509.Certificate:
        addresses = []
        for text in ips:
            try:
                addresses.append(ipaddress.ip_address(text))
            except ValueError:
                raise InvalidArgument(f"{text!r} is not an IP address") from None
        for name in dns_names:
            if len(name) > 253 or not _DNS_NAME.fullmatch(name):
                raise InvalidArgument(f"{name!r} is not a DNS name")
        start = (now or datetime.datetime.now(datetime.UTC)) - _BACKDATE
        end = min(start + lifetime, self.cert.not_valid_after_utc)
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(identity.spiffe_id),
            x509.DNSName(identity.dns_name),
            *(x509.DNSName(name) for name in dict.fromkeys(dns_names)),
            *(x509.IPAddress(address) for address in dict.fromkeys(addresses)),
        ]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))])
        return (
            _builder(subject, self.cert.subject, public, start, end, signs_certificates=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )


def signing_request(key: SigningKey) -> bytes:
    """A PEM certificate signing request over ``key`` (it carries no names: the CA
    decides those)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def enrolled_bundle(key: SigningKey, cert_pem: bytes, ca_pem: bytes) -> TlsBundle:
    """A bundle from a key made here and the certificate a CA signed for it,
    checked as :meth:`TlsBundle.load` checks one read from disk."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise InvalidArgument("the enrollment answer holds no PEM certificate") from None
    identity = identity_of(cert)
    if identity is None or not _same_key(key, cert) or not any(_signed_by(cert, c) for c in cas):
        raise InvalidArgument(
            "the enrollment answer is not a certificate of this key signed by the cluster CA"
        )
    return TlsBundle.of(cas, cert, key, identity)


@dataclass(frozen=True)
class ClientTlsBundle:
    """A client's credentials under a PKI that is not Ferry's (an existing etcd's).

    Laid out like a TLS Secret: ``ca.crt`` holds the CA(s) that sign the
    servers this client talks to, ``tls.crt`` and ``tls.key`` a client
    certificate those servers accept. Unlike :class:`TlsBundle` the
    certificate names no Ferry identity, and ``ca.crt`` need not have signed
    it: a server may check clients against another CA than its own.
    """

    directory: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime.datetime

    @classmethod
    def load(cls, directory: Path, *, now: datetime.datetime | None = None) -> ClientTlsBundle:
        """Load and check ``directory``; errors name the directory or file that is wrong."""
        if not directory.is_dir():
            raise NotFound(
                f"{directory} is not a directory: give one holding {CA_CERT} (the servers' CA), "
                f"{CERT} and {KEY} (a client certificate they accept), e.g. a mounted TLS Secret"
            )
        cas, cert, key = _load_pair(directory)
        _check_current(cert, directory / CERT, now or datetime.datetime.now(datetime.UTC))
        return cls(
            directory=directory,
            ca_pem=b"".join(_pem(ca) for ca in cas),
            cert_pem=_pem(cert),
            key_pem=_key_pem(key),
            not_after=cert.not_valid_after_utc,
        )
