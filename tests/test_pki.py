"""The cluster PKI: identities, the CA, issued certificates and their directories."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from csi_driver.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi_driver.pki import (
    CA_CERT,
    CERT,
    KEY,
    CertificateAuthority,
    Identity,
    Role,
    TlsBundle,
    identity_of,
)
from tests.certs import Pki

NOW = datetime.datetime.now(datetime.UTC)


@pytest.mark.parametrize(
    ("text", "identity", "spiffe_id", "dns_name"),
    [
        (
            "controller",
            Identity(Role.CONTROLLER),
            "spiffe://ferry.csi.dev/controller",
            "controller.ferry.csi.dev",
        ),
        (
            "catalog",
            Identity(Role.CATALOG),
            "spiffe://ferry.csi.dev/catalog",
            "catalog.ferry.csi.dev",
        ),
        (
            "node/worker-1",
            Identity(Role.NODE, "worker-1"),
            "spiffe://ferry.csi.dev/node/worker-1",
            "worker-1.node.ferry.csi.dev",
        ),
        (
            "node/ip-10-0-0-1.ec2.internal",
            Identity(Role.NODE, "ip-10-0-0-1.ec2.internal"),
            "spiffe://ferry.csi.dev/node/ip-10-0-0-1.ec2.internal",
            "ip-10-0-0-1.ec2.internal.node.ferry.csi.dev",
        ),
    ],
)
def test_identities_have_one_text_spiffe_id_and_dns_name(
    text: str, identity: Identity, spiffe_id: str, dns_name: str
) -> None:
    assert Identity.parse(text) == identity
    assert str(identity) == text
    assert identity.spiffe_id == spiffe_id
    assert identity.dns_name == dns_name
    assert Identity.from_spiffe_id(spiffe_id) == identity


@pytest.mark.parametrize(
    "text",
    ["", "node", "node/", "node/Upper", "node/-x", "node/a_b", "nodes/a", "admin", "node/a/b"],
)
def test_bad_identity_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Identity.parse(text)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://other.domain/controller",
        "spiffe://ferry.csi.dev/admin",
        "spiffe://ferry.csi.dev/node/",
        "https://ferry.csi.dev/controller",
    ],
)
def test_foreign_spiffe_ids_are_no_identity(uri: str) -> None:
    assert Identity.from_spiffe_id(uri) is None


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def test_the_ca_signs_leaves_only(ca: CertificateAuthority) -> None:
    basic = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (basic.ca, basic.path_length) == (True, 0)
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc >= datetime.timedelta(
        days=3650
    )


def test_a_leaf_names_its_identity_and_serves_and_calls(ca: CertificateAuthority) -> None:
    bundle = ca.issue(
        Identity.node("n1"), ips=("10.0.0.2", "fd00::2", "10.0.0.2"), dns_names=("n1.lan",)
    )
    cert = x509.load_pem_x509_certificate(bundle.cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://ferry.csi.dev/node/n1"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["n1.node.ferry.csi.dev", "n1.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.2"),
        ipaddress.ip_address("fd00::2"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert identity_of(cert) == bundle.identity == Identity.node("n1")


def test_a_leaf_never_outlives_its_ca(ca: CertificateAuthority) -> None:
    bundle = ca.issue(Identity.controller(), lifetime=datetime.timedelta(days=100_000))
    assert bundle.not_after == ca.cert.not_valid_after_utc


@pytest.mark.parametrize(
    ("ips", "dns_names"), [(("10.0.0",), ()), (("host",), ()), ((), ("bad name",)), ((), ("-x",))]
)
def test_bad_sans_are_refused(
    ca: CertificateAuthority, ips: tuple[str, ...], dns_names: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidArgument):
        ca.issue(Identity.controller(), ips=ips, dns_names=dns_names)


def test_written_bundles_load_back_with_private_keys(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    issued = ca.issue(Identity.node("n1"))
    issued.write(tmp_path / "n1")
    assert (tmp_path / "n1" / KEY).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "n1" / CERT).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in (tmp_path / "n1").iterdir()) == [CA_CERT, CERT, KEY]
    assert TlsBundle.load(tmp_path / "n1") == issued


def test_the_ca_directory_is_secret_shaped_and_never_replaced(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    ca.save(tmp_path)
    assert (tmp_path / KEY).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / CA_CERT).read_bytes() == (tmp_path / CERT).read_bytes()
    with pytest.raises(AlreadyExists, match="cut off every agent"):
        CertificateAuthority.create().save(tmp_path)
    loaded = CertificateAuthority.load(tmp_path)
    assert loaded.cert == ca.cert
    x509.load_pem_x509_certificate(
        loaded.issue(Identity.controller()).cert_pem
    ).verify_directly_issued_by(ca.cert)


def test_a_leaf_directory_is_not_a_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue(Identity.controller()).write(tmp_path)
    with pytest.raises(InvalidArgument, match="ferry ca init"):
        CertificateAuthority.load(tmp_path)
    with pytest.raises(NotFound, match="ferry ca init"):
        CertificateAuthority.load(tmp_path / "absent")


def test_loading_checks_each_file_and_says_which(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    ca = pki.ca
    other = CertificateAuthority.create()
    ca.issue(Identity.node("n1")).write(tmp_path / "n1")
    ca.issue(Identity.node("n2")).write(tmp_path / "n2")
    other.issue(Identity.node("n1")).write(tmp_path / "other")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in (CA_CERT, CERT):
        (mixed / name).write_bytes((tmp_path / "n1" / name).read_bytes())
    (mixed / KEY).write_bytes((tmp_path / "n2" / KEY).read_bytes())
    with pytest.raises(InvalidArgument, match="is not the key of"):
        TlsBundle.load(mixed)

    (mixed / KEY).write_bytes((tmp_path / "n1" / KEY).read_bytes())
    (mixed / CA_CERT).write_bytes((tmp_path / "other" / CA_CERT).read_bytes())
    with pytest.raises(InvalidArgument, match="not signed by the CA"):
        TlsBundle.load(mixed)

    (mixed / CA_CERT).write_text("garbage")
    with pytest.raises(InvalidArgument, match="not a PEM certificate"):
        TlsBundle.load(mixed)

    (mixed / CA_CERT).write_bytes((tmp_path / "n1" / CA_CERT).read_bytes())
    (mixed / KEY).unlink()
    with pytest.raises(NotFound, match=r"tls\.key does not exist"):
        TlsBundle.load(mixed)

    with pytest.raises(InvalidArgument, match="names no Ferry identity"):
        TlsBundle.load(pki.handmade())


def test_expired_and_future_certificates_are_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    ca.issue(Identity.controller(), lifetime=datetime.timedelta(days=1)).write(tmp_path)
    with pytest.raises(FailedPrecondition, match=r"expired .* issue a new one"):
        TlsBundle.load(tmp_path, now=NOW + datetime.timedelta(days=2))
    with pytest.raises(FailedPrecondition, match="check this machine's clock"):
        TlsBundle.load(tmp_path, now=NOW - datetime.timedelta(days=1))


def test_ca_crt_may_trust_an_old_and_a_new_ca_while_rotating(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    new = CertificateAuthority.create()
    new.issue(Identity.node("n1")).write(tmp_path)
    both = ca.issue(Identity.controller()).ca_pem + (tmp_path / CA_CERT).read_bytes()
    (tmp_path / CA_CERT).write_bytes(both)
    bundle = TlsBundle.load(tmp_path)
    assert bundle.ca_pem == both
    assert x509.load_pem_x509_certificates(bundle.ca_pem) == [ca.cert, new.cert]


def test_rsa_keys_made_elsewhere_load_and_ed25519_is_refused(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    loaded = TlsBundle.load(pki.handmade(rsa_key, Identity.controller()))
    assert loaded.identity == Identity.controller()
    with pytest.raises(InvalidArgument, match="refuses Ed25519"):
        TlsBundle.load(pki.handmade(ed25519.Ed25519PrivateKey.generate(), Identity.controller()))
