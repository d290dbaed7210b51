"""``etcds://`` with ``--catalog-tls-dir``: an existing etcd with its own PKI.

The etcd of ``etcd_own_pki`` runs with certificates that Ferry's pki did not
make (an RSA CA, a member certificate naming 127.0.0.1 and localhost, a
client certificate with a plain CN, no SPIFFE URI), as an operator's etcd
would. The contract suite runs over it (the ``etcds-own`` backend); here:
the client trusts that CA alone, checks each member by the address it
dialled, and a member or a client that the other side does not accept is
refused with UNAVAILABLE and a message naming what to fix.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi_driver.core.errors import FerryError, InvalidArgument, NotFound
from csi_driver.pki import CA_CERT, CERT, KEY, ClientTlsBundle
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore
from csi_driver.store.url import open_store
from tests.certs import ForeignPki
from tests.store.etcd_cluster import EtcdCluster, EtcdTls
from tests.store.test_etcd_tls import default_roots_probe, refused
from tests.test_cli import ferry


def _client(cluster: EtcdCluster) -> Path:
    """The client bundle the cluster's own health checks use (one it accepts)."""
    assert cluster.tls is not None
    return cluster.tls.client


def _store(cluster: EtcdCluster, client: Path, host: str = "127.0.0.1") -> EtcdStore:
    endpoints = [EtcdEndpoint(host, m.client_port) for m in cluster.members]
    return EtcdStore(endpoints, tls=ClientTlsBundle.load(client), request_timeout_s=2)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_open_store_speaks_to_an_etcd_of_another_pki(etcd_own_pki: EtcdCluster, host: str) -> None:
    etcd_own_pki.wipe()
    url = f"etcds://{host}:{etcd_own_pki.members[0].client_port}"
    # No --tls-dir at all: the catalog's credentials are the etcd's own.
    store = open_store(url, catalog_tls=ClientTlsBundle.load(_client(etcd_own_pki)))
    try:
        assert isinstance(store, EtcdStore) and store.tls
        store.put("k", b"over their tls")
        record = store.get("k")
        assert record is not None and record.value == b"over their tls"
    finally:
        store.close()


def test_only_the_bundles_ca_is_trusted_never_grpcs_default_roots(
    etcd_own_pki: EtcdCluster, tmp_path: Path
) -> None:
    """An etcd of yet another CA, which the environment's gRPC roots trust, stays refused."""
    other = ForeignPki.create(tmp_path / "pki", "someone-elses-ca")
    server = other.issue("etcd-member", ips=("127.0.0.1",), server=True)
    impostor = EtcdCluster(tmp_path, 1, EtcdTls(server, server)).start()
    try:
        printed = default_roots_probe(impostor, _client(etcd_own_pki), "own", "127.0.0.1")
    finally:
        impostor.close()
    assert "default roots: accepted" in printed  # the environment's roots do take effect
    assert "does not accept as the catalog's" in printed, printed


@pytest.fixture(params=["another name", "another CA"])
def misnamed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[EtcdCluster, Path, str]]:
    """An etcd, a client bundle it accepts, and an address at which the member's
    certificate does not prove itself to that bundle's CA."""
    pki = ForeignPki.create(tmp_path / "pki")
    client = pki.issue("ferry-client")
    if request.param == "another name":
        # Valid for 127.0.0.1 (the fixture's health checks dial it), dialled as localhost.
        server = pki.issue("etcd-member", ips=("127.0.0.1",), server=True)
        host = "localhost"
    else:
        other = ForeignPki.create(tmp_path / "other", "someone-elses-ca")
        server = other.issue("etcd-member", dns=("localhost",), ips=("127.0.0.1",), server=True)
        # (The client checks the member before it shows its own certificate.)
        host = "127.0.0.1"
    cluster = EtcdCluster(tmp_path, 1, EtcdTls(server, server)).start()
    yield cluster, client, host
    cluster.close()


def test_a_member_that_does_not_prove_the_dialled_address_is_refused(
    misnamed: tuple[EtcdCluster, Path, str],
) -> None:
    cluster, client, host = misnamed
    refused(
        _store(cluster, client, host),
        "does not accept as the catalog's",
        "names the host or IP address --catalog gives for it",
        f"{client / CA_CERT}",
        "nothing was written",
    )


def test_a_client_certificate_the_etcd_does_not_trust_is_refused(
    etcd_own_pki: EtcdCluster, tmp_path: Path
) -> None:
    stranger = ForeignPki.create(tmp_path, "stranger-ca").issue("ferry-client")
    # It trusts the etcd's CA, so only etcd's refusal of its certificate can stop it.
    (stranger / CA_CERT).write_bytes((_client(etcd_own_pki) / CA_CERT).read_bytes())
    message = refused(
        _store(etcd_own_pki, stranger),
        "--catalog-tls-dir",
        "--trusted-ca-file must hold the CA that signed",
    )
    assert "this cluster's CA" not in message  # no advice about Ferry's own PKI here


def _copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in (CA_CERT, CERT, KEY):
        (target / name).write_bytes((source / name).read_bytes())
    return target


#: How a bundle directory is spoiled, the error and what it says ({d}: the directory).
SPOILED: dict[str, tuple[Callable[[Path], object], type[FerryError], str]] = {
    "no directory": (lambda d: shutil.rmtree(d), NotFound, "{d} is not a directory"),
    "no ca.crt": (lambda d: (d / CA_CERT).unlink(), NotFound, "{d}/ca.crt does not exist"),
    "bad ca.crt": (lambda d: (d / CA_CERT).write_text("x"), InvalidArgument, "{d}/ca.crt is not"),
    "bad tls.crt": (lambda d: (d / CERT).write_text("x"), InvalidArgument, "{d}/tls.crt is not"),
    "bad tls.key": (lambda d: (d / KEY).write_text("x"), InvalidArgument, "{d}/tls.key is not"),
}


@pytest.mark.parametrize("how", list(SPOILED))
def test_a_bad_bundle_names_the_file(tmp_path: Path, how: str) -> None:
    spoil, error, message = SPOILED[how]
    bundle = _copy(ForeignPki.create(tmp_path / "pki").issue("client"), tmp_path / "bundle")
    spoil(bundle)
    with pytest.raises(error, match=message.format(d=bundle)):
        ClientTlsBundle.load(bundle)


def test_a_mismatched_or_expired_client_certificate_is_refused(tmp_path: Path) -> None:
    pki = ForeignPki.create(tmp_path / "pki")
    one, other = pki.issue("one"), pki.issue("other")
    mixed = _copy(one, tmp_path / "mixed")
    (mixed / KEY).write_bytes((other / KEY).read_bytes())
    with pytest.raises(InvalidArgument, match=f"{mixed}/tls.key is not the key of"):
        ClientTlsBundle.load(mixed)
    expired = pki.issue("expired", valid_days=-1)
    with pytest.raises(FerryError, match=f"{expired}/tls.crt expired on"):
        ClientTlsBundle.load(expired)
    assert ClientTlsBundle.load(one).not_after > datetime.datetime.now(datetime.UTC)


def test_a_catalog_bundle_for_a_catalog_without_tls_is_refused(tmp_path: Path) -> None:
    bundle = ClientTlsBundle.load(ForeignPki.create(tmp_path).issue("ferry-client"))
    for url in (f"{tmp_path}/catalog.db", "etcd://127.0.0.1:2379", "ferry://127.0.0.1:1"):
        with pytest.raises(InvalidArgument, match="use etcds://"):
            open_store(url, catalog_tls=bundle)
    assert not (tmp_path / "catalog.db").exists()


@pytest.mark.parametrize(
    ("catalog", "given", "message"),
    [
        ("etcds://127.0.0.1:2379", "missing", "/missing is not a directory"),
        ("etcds://127.0.0.1:2379", "empty", "/empty/ca.crt does not exist"),
        ("sqlite:///{tmp}/c.db", "good", "is for an etcd spoken to over TLS"),
    ],
)
def test_ferry_with_an_unusable_catalog_tls_dir_exits_1(
    tmp_path: Path, catalog: str, given: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    ForeignPki.create(tmp_path).issue("good")
    done = ferry(
        "controller", "--endpoint", f"unix://{tmp_path}/csi.sock",
        "--catalog", catalog.format(tmp=tmp_path),
        "--catalog-tls-dir", str(tmp_path / given),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "c.db").exists()
