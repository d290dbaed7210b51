"""What a sandbox consists of, derived from a handful of choices.

A :class:`SandboxPlan` is a pure value: from the directory, the name prefix,
the subnet and the node count it derives every name, address, path and
command line, so the same plan (persisted in the directory) always names the
same things. Invariants:

- every network namespace and host link is ``<prefix>-...``; the prefix is
  validated so that no name exceeds the kernel's 15-character interface limit
  and no prefix is a prefix-plus-dash of another sandbox's names;
- every address is inside the plan's subnet, which exists only on the
  sandbox's bridge and in its namespaces (the host gets no address and no
  route there, so sandboxes never touch the host's own networks or each other);
- every file is below the plan's directory;
- the controller and the nodes speak to each other, and to etcd, over mutual
  TLS under the sandbox's own CA (``DIR/tls``), as in a cluster: etcd serves
  clients only over TLS, admits only certificates of that CA and presents a
  ``catalog`` certificate itself.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.errors import InvalidArgument, NotFound
from csi_driver.pki import CA_CERT, CERT, KEY

PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{1,7}$")
DEFAULT_SUBNET = "10.251.0.0/24"
MAX_NODES = 200
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
AGENT_PORT = 7400
CHUNK_PORT = 7600
CATALOG_PORT = 7500
ZONE = "sandbox"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

CONTROL = "control"
ETCD = "etcd"
CONTROLLER = "controller"


class CatalogKind(enum.Enum):
    """Where the sandbox's catalog lives."""

    ETCD = "etcd"
    SQLITE = "sqlite"


class Role(enum.Enum):
    ETCD = "etcd"
    CONTROLLER = "controller"
    NODE = "node"


@dataclass(frozen=True)
class Namespace:
    """A network namespace on the sandbox bridge."""

    name: str  # the netns name (``ip netns``)
    host_link: str  # the host end of its veth pair, enslaved to the bridge
    address: str  # the address of its ``eth0``


@dataclass(frozen=True)
class Member:
    """One process of the sandbox."""

    name: str  # "etcd", "controller", "node-1", ...
    role: Role
    namespace: Namespace
    socket: Path | None  # its CSI socket (etcd has none)
    log: Path


#: Liveness in the sandbox: fast enough for a failover demo in seconds.
SANDBOX_HEARTBEAT_S = 1.0
SANDBOX_NODE_LOST_AFTER_S = 5.0
#: A killed controller's successor leads within this (its lease lapses): tests kill them.
SANDBOX_LEADER_LEASE_TTL_S = 3


@dataclass(frozen=True)
class SandboxPlan:
    directory: Path
    prefix: str
    node_count: int
    subnet: str = DEFAULT_SUBNET
    catalog: CatalogKind = CatalogKind.ETCD
    pool_capacity_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if not PREFIX_PATTERN.fullmatch(self.prefix):
            raise InvalidArgument(
                f"sandbox prefix {self.prefix!r} must be 2-8 lowercase letters and digits, "
                "starting with a letter"
            )
        if not 1 <= self.node_count <= MAX_NODES:
            raise InvalidArgument(f"--nodes must be between 1 and {MAX_NODES}")
        if not self.directory.is_absolute():
            raise InvalidArgument(f"sandbox directory {self.directory} must be absolute")
        try:
            network = ipaddress.IPv4Network(self.subnet)
        except ValueError as exc:
            raise InvalidArgument(f"subnet {self.subnet!r} is not an IPv4 network") from exc
        if not network.is_private or network.num_addresses < self.node_count + 16:
            raise InvalidArgument(
                f"subnet {self.subnet} must be private and hold {self.node_count + 16} addresses"
            )
        if self.pool_capacity_bytes <= 0:
            raise InvalidArgument("the pool capacity must be positive")
        longest = self.node_dir(self.node_ids()[-1]) / "csi.sock"
        if len(str(longest).encode()) > MAX_SOCKET_PATH:
            raise InvalidArgument(
                f"socket path {longest} is longer than the kernel's {MAX_SOCKET_PATH} bytes "
                "for unix sockets: choose a shorter --dir"
            )

    # -- names and addresses ---------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def _address(self, offset: int) -> str:
        return str(ipaddress.IPv4Network(self.subnet).network_address + offset)

    @property
    def control(self) -> Namespace:
        """The control plane's namespace: etcd and the controller."""
        return Namespace(f"{self.prefix}-{CONTROL}", f"{self.prefix}-c", self._address(2))

    def node_ids(self) -> tuple[str, ...]:
        return tuple(f"node-{i}" for i in range(1, self.node_count + 1))

    def node_namespace(self, index: int) -> Namespace:
        return Namespace(
            f"{self.prefix}-node-{index}", f"{self.prefix}-h{index}", self._address(10 + index)
        )

    def namespaces(self) -> tuple[Namespace, ...]:
        nodes = (self.node_namespace(i) for i in range(1, self.node_count + 1))
        return (self.control, *nodes)

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.control.address}:{ETCD_CLIENT_PORT}"

    @property
    def catalog_url(self) -> str:
        """How the nodes reach the catalog: over the network only, never a file.

        etcd (over mutual TLS): the controller too. SQLite: the controller
        opens its file and serves it to the nodes as the catalog service
        (``ferry://``).
        """
        if self.catalog is CatalogKind.ETCD:
            return f"etcds://{self.etcd_endpoint}"
        return f"ferry://{self.control.address}:{CATALOG_PORT}"

    @property
    def sqlite_file(self) -> Path:
        """The SQLite catalog, opened by the controller alone."""
        return self.directory / "controller" / "catalog.db"

    # -- files -------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.directory / "sandbox.json"

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    def node_dir(self, node_id: str) -> Path:
        return self.directory / "nodes" / node_id

    @property
    def tls(self) -> Path:
        """The sandbox's own cluster CA (``ca/``) and one certificate per agent."""
        return self.directory / "tls"

    # -- members -----------------------------------------------------------------

    def members(self) -> tuple[Member, ...]:
        control = self.control
        members = [
            Member(
                CONTROLLER,
                Role.CONTROLLER,
                control,
                self.directory / "controller" / "csi.sock",
                self.logs / "controller.log",
            ),
        ]
        if self.catalog is CatalogKind.ETCD:
            members.insert(0, Member(ETCD, Role.ETCD, control, None, self.logs / "etcd.log"))
        for index, node_id in enumerate(self.node_ids(), start=1):
            members.append(
                Member(
                    node_id,
                    Role.NODE,
                    self.node_namespace(index),
                    self.node_dir(node_id) / "csi.sock",
                    self.logs / f"{node_id}.log",
                )
            )
        return tuple(members)

    def member(self, name: str) -> Member:
        for member in self.members():
            if member.name == name:
                return member
        known = ", ".join(m.name for m in self.members())
        raise NotFound(f"the sandbox has no member {name!r}; it has {known}")

    def command(self, member: Member) -> tuple[str, ...]:
        """The command line that runs ``member`` (inside its namespace)."""
        if member.role is Role.ETCD:
            return self._etcd_command(member)
        ferry = (sys.executable, "-m", "csi_driver.cli", "--log-format", "json")
        assert member.socket is not None
        common = (
            "--endpoint", f"unix://{member.socket}",
            "--tls-dir", str(self.tls / member.name),
        )  # fmt: skip
        if member.role is Role.CONTROLLER:
            # Nodes beat every second here, so a node killed or cut in a test or
            # the demo counts as lost (failoverPolicy promote) within seconds.
            lost: tuple[str, ...] = ("--node-lost-after", str(SANDBOX_NODE_LOST_AFTER_S))
            if self.catalog is CatalogKind.ETCD:
                lost += ("--leader-lease-ttl", str(SANDBOX_LEADER_LEASE_TTL_S))
                return (*ferry, "controller", *common, *lost, "--catalog", self.catalog_url)
            listen = f"tcp://{self.control.address}:{CATALOG_PORT}"
            catalog = ("--catalog", str(self.sqlite_file), "--catalog-listen", listen)
            return (*ferry, "controller", *common, *lost, *catalog)
        node_dir = self.node_dir(member.name)
        return (
            *ferry,
            "node",
            *common,
            "--catalog",
            self.catalog_url,
            "--node-id",
            member.name,
            "--pool",
            str(node_dir / "pool"),
            "--pool-capacity",
            str(self.pool_capacity_bytes),
            "--kubelet-dir",
            str(node_dir / "kubelet"),
            "--agent-endpoint",
            f"tcp://{member.namespace.address}:{AGENT_PORT}",
            "--chunk-endpoint",
            f"tcp://{member.namespace.address}:{CHUNK_PORT}",
            "--zone",
            ZONE,
            "--heartbeat-interval",
            str(SANDBOX_HEARTBEAT_S),
        )

    def _etcd_command(self, member: Member) -> tuple[str, ...]:
        # The peer URL stays on the namespace's loopback: a one-member cluster
        # talks to no peer, and clients come in over the bridge only.
        peer = f"http://127.0.0.1:{ETCD_PEER_PORT}"
        client = f"https://{self.etcd_endpoint}"
        name = f"{self.prefix}-etcd"
        tls = self.tls / member.name
        return (
            "etcd",
            "--name",
            name,
            "--data-dir",
            str(self.directory / "etcd"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{name}={peer}",
            "--initial-cluster-token",
            name,
            "--initial-cluster-state",
            "new",
            "--client-cert-auth",
            "--trusted-ca-file",
            str(tls / CA_CERT),
            "--cert-file",
            str(tls / CERT),
            "--key-file",
            str(tls / KEY),
        )
