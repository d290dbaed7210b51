"""``--catalog`` forms: parsing, refusals, and Ferry running on an etcd catalog."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi_driver.cli import build_parser
from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.runtime import start_all_in_one, start_controller
from csi_driver.store.etcd import DEFAULT_LEASE_TTL_S, EtcdStore
from csi_driver.store.sqlite import SqliteStore
from csi_driver.store.url import CatalogUrl, open_store, parse_catalog_url
from tests.csi.conftest import node_config
from tests.store.etcd_cluster import EtcdCluster


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/var/lib/ferry/catalog.db", CatalogUrl(sqlite_path=Path("/var/lib/ferry/catalog.db"))),
        ("relative/c.db", CatalogUrl(sqlite_path=Path("relative/c.db"))),
        ("sqlite:///abs/c.db", CatalogUrl(sqlite_path=Path("/abs/c.db"))),
        ("etcd://10.0.0.1:2379", CatalogUrl(etcd_endpoints=(("10.0.0.1", 2379),))),
        (
            "etcd://a.example:2379,b.example:2380/",
            CatalogUrl(etcd_endpoints=(("a.example", 2379), ("b.example", 2380))),
        ),
        ("ETCD://[::1]:2379", CatalogUrl(etcd_endpoints=(("::1", 2379),))),
        (
            "etcds://e-0.etcd.ns.svc:2379,e-1.etcd.ns.svc:2379",
            CatalogUrl(
                etcd_endpoints=(("e-0.etcd.ns.svc", 2379), ("e-1.etcd.ns.svc", 2379)),
                etcd_tls=True,
            ),
        ),
        ("ETCDS://[::1]:2379/", CatalogUrl(etcd_endpoints=(("::1", 2379),), etcd_tls=True)),
        ("ferry://ctl.ferry:7070", CatalogUrl(service="ctl.ferry:7070")),
        ("ferry://[::1]:7070", CatalogUrl(service="[::1]:7070")),
        (
            "ferry://10.0.0.1:7070,10.0.0.2:7071",
            CatalogUrl(service="10.0.0.1:7070", service_fallbacks=("10.0.0.2:7071",)),
        ),
    ],
)
def test_catalog_url_forms(text: str, expected: CatalogUrl) -> None:
    assert parse_catalog_url(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("sqlite://relative.db", "absolute path"),
        ("etcd://", "not host:port"),
        ("etcd://host", "not host:port"),
        ("etcd://host:99999", "not host:port"),
        ("etcd://a:1,,b:2", "not host:port"),
        ("etcds://", "not host:port"),
        ("https://host:2379", "unknown scheme"),
        ("http://host:2379", "unknown scheme"),
        ("ferry://a:1,b:2", "must be IP addresses"),
        ("ferry://10.0.0.1:1,ctl:2", "must be IP addresses"),
    ],
)
def test_bad_catalog_urls_are_refused_with_the_forms(text: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match=complaint):
        parse_catalog_url(text)


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    sqlite = open_store(tmp_path / "c.db")
    assert isinstance(sqlite, SqliteStore) and sqlite.path == tmp_path / "c.db"
    sqlite.close()
    etcd = open_store("etcd://127.0.0.1:1,127.0.0.1:2")
    assert isinstance(etcd, EtcdStore) and [e.port for e in etcd.endpoints] == [1, 2]
    etcd.close()


def test_controller_on_an_unreachable_etcd_answers_unavailable(tmp_path: Path) -> None:
    services = start_controller(f"unix://{tmp_path}/csi.sock", "etcd://127.0.0.1:1")
    try:
        with CsiClient(f"unix://{tmp_path}/csi.sock") as client:
            with pytest.raises(grpc.RpcError) as failed:
                client.controller.ListVolumes(csi_pb2.ListVolumesRequest())
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "etcd" in (failed.value.details() or "")
    finally:
        services.stop(grace_s=0)


def test_all_in_one_runs_on_an_etcd_catalog(tmp_path: Path, etcd_single: EtcdCluster) -> None:
    (tmp_path / "kubelet").mkdir()
    endpoint = f"unix://{tmp_path}/csi.sock"
    services = start_all_in_one(endpoint, node_config(tmp_path), etcd_single.url)
    try:
        with CsiClient(endpoint) as client:
            request = csi_pb2.CreateVolumeRequest(
                name="pvc-on-etcd",
                capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
                volume_capabilities=[mount_capability()],
            )
            volume = client.controller.CreateVolume(request).volume
            again = client.controller.CreateVolume(request).volume
            assert again.volume_id == volume.volume_id
            listed = client.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
            assert [e.volume.volume_id for e in listed] == [volume.volume_id]
            client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    finally:
        services.stop(grace_s=0)
    store = open_store(etcd_single.url)
    assert store.list("volumes/") == [] and store.list("names/") == []
    assert [r.key for r in store.list("nodes/")] == ["nodes/" + node_config(tmp_path).node_id]
    store.close()


def test_the_cli_passes_catalog_urls_through_unchanged() -> None:
    args = build_parser().parse_args(
        ["controller", "--catalog", "etcd://a:1,b:2", "--catalog-listen", "tcp://0.0.0.0:7070"]
    )
    assert args.catalog == "etcd://a:1,b:2" and args.catalog_listen == "tcp://0.0.0.0:7070"
    node = build_parser().parse_args(["node", "--catalog", "ferry://10.1.0.1:7070"])
    assert node.catalog == "ferry://10.1.0.1:7070"
    assert build_parser().parse_args(["all-in-one"]).catalog == "/var/lib/ferry/catalog.db"


def test_the_leader_lease_ttl_reaches_the_etcd_election_and_has_etcds_floor() -> None:
    parse = build_parser().parse_args
    assert parse(["controller"]).leader_lease_ttl == DEFAULT_LEASE_TTL_S
    assert parse(["all-in-one", "--leader-lease-ttl", "3"]).leader_lease_ttl == 3
    for refused in ("1", "0", "two"):
        with pytest.raises(SystemExit):
            parse(["controller", "--leader-lease-ttl", refused])
    etcd = open_store("etcd://127.0.0.1:1", lease_ttl_s=3)
    assert isinstance(etcd, EtcdStore) and etcd.lease_ttl_s == 3
    etcd.close()
