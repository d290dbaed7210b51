"""The sandbox plan: names, addresses, paths and command lines, no host needed."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from csi_driver.core.errors import InvalidArgument, NotFound
from csi_driver.sandbox.plan import CatalogKind, Role, SandboxPlan

IFNAMSIZ = 15


def test_names_fit_the_kernel_and_carry_the_prefix() -> None:
    plan = SandboxPlan(Path("/s"), "abcdefgh", 200, subnet="10.9.0.0/24")
    names = [plan.bridge] + [n.host_link for n in plan.namespaces()]
    assert all(len(name) <= IFNAMSIZ for name in names)
    assert all(name.startswith("abcdefgh-") for name in names)
    assert all(n.name.startswith("abcdefgh-") for n in plan.namespaces())
    assert len(set(names)) == len(names) == 201 + 1


def test_addresses_are_distinct_and_inside_the_subnet() -> None:
    plan = SandboxPlan(Path("/s"), "ab", 5, subnet="192.168.77.0/24")
    addresses = [ipaddress.IPv4Address(n.address) for n in plan.namespaces()]
    assert len(set(addresses)) == 6
    assert all(a in ipaddress.IPv4Network("192.168.77.0/24") for a in addresses)
    assert plan.catalog_url == "etcds://192.168.77.2:2379"


@pytest.mark.parametrize(
    ("prefix", "nodes", "subnet", "directory"),
    [
        ("A1", 2, "10.9.0.0/24", "/s"),  # upper case
        ("x", 2, "10.9.0.0/24", "/s"),  # too short
        ("abcdefghi", 2, "10.9.0.0/24", "/s"),  # too long for interface names
        ("a-b", 2, "10.9.0.0/24", "/s"),  # a dash would let prefixes overlap
        ("ab", 0, "10.9.0.0/24", "/s"),
        ("ab", 201, "10.9.0.0/24", "/s"),
        ("ab", 2, "8.8.8.0/24", "/s"),  # not private: never route to the world
        ("ab", 2, "10.9.0.0/29", "/s"),  # too small
        ("ab", 2, "nonsense", "/s"),
        ("ab", 2, "10.9.0.0/24", "relative"),
        ("ab", 2, "10.9.0.0/24", "/" + "d" * 100),  # socket path beyond sun_path
    ],
)
def test_bad_choices_are_refused(prefix: str, nodes: int, subnet: str, directory: str) -> None:
    with pytest.raises(InvalidArgument):
        SandboxPlan(Path(directory), prefix, nodes, subnet=subnet)


def test_nodes_reach_the_catalog_over_the_network_only() -> None:
    plan = SandboxPlan(Path("/s"), "ab", 3)
    for member in plan.members():
        command = plan.command(member)
        assert not any(arg.endswith(".db") for arg in command)
        if member.role is not Role.ETCD:
            assert command[command.index("--catalog") + 1] == "etcds://10.251.0.2:2379"
            assert command[command.index("--tls-dir") + 1] == f"/s/tls/{member.name}"
            assert "--insecure-agent-api" not in command
    node2 = plan.member("node-2")
    command = plan.command(node2)
    assert command[command.index("--agent-endpoint") + 1] == "tcp://10.251.0.12:7400"
    assert command[command.index("--chunk-endpoint") + 1] == "tcp://10.251.0.12:7600"
    assert command[command.index("--pool") + 1] == "/s/nodes/node-2/pool"
    assert node2.socket == Path("/s/nodes/node-2/csi.sock")
    assert plan.member("controller").socket == Path("/s/controller/csi.sock")
    controller = plan.command(plan.member("controller"))
    # tests kill controllers: a successor must not wait out etcd's default lease
    assert controller[controller.index("--leader-lease-ttl") + 1] == "3"


def test_an_unknown_member_names_the_known_ones() -> None:
    with pytest.raises(NotFound, match="node-1, node-2"):
        SandboxPlan(Path("/s"), "ab", 2).member("node-3")


def test_on_sqlite_only_the_controller_opens_the_file_and_serves_it() -> None:
    plan = SandboxPlan(Path("/s"), "ab", 2, catalog=CatalogKind.SQLITE)
    assert [m.name for m in plan.members()] == ["controller", "node-1", "node-2"]
    controller = plan.command(plan.member("controller"))
    assert controller[controller.index("--catalog") + 1] == "/s/controller/catalog.db"
    assert controller[controller.index("--catalog-listen") + 1] == "tcp://10.251.0.2:7500"
    assert "--leader-lease-ttl" not in controller  # SQLite's lock has no TTL
    for node in ("node-1", "node-2"):
        command = plan.command(plan.member(node))
        assert command[command.index("--catalog") + 1] == "ferry://10.251.0.2:7500"
        assert not any("catalog.db" in arg for arg in command)


def test_etcd_serves_clients_over_mutual_tls_only() -> None:
    plan = SandboxPlan(Path("/s"), "ab", 1)
    command = plan.command(plan.member("etcd"))
    flag = {name: command[command.index(name) + 1] for name in command if name.endswith("-file")}
    assert command[command.index("--listen-client-urls") + 1] == "https://10.251.0.2:2379"
    assert "--client-cert-auth" in command
    assert flag == {
        "--trusted-ca-file": "/s/tls/etcd/ca.crt",
        "--cert-file": "/s/tls/etcd/tls.crt",
        "--key-file": "/s/tls/etcd/tls.key",
    }
