"""The sandbox's network: one bridge, one namespace and veth pair per member host.

Every change goes through ``ip`` via the command runner. The host end of each
veth pair carries the sandbox prefix and is enslaved to the bridge; the other
end is ``eth0`` inside the namespace, with the member's address and only the
subnet's connected route (no default route: traffic cannot leave the bridge).
The host gets no address on the bridge, so the sandbox adds no host route.
Bridged frames skip the host's iptables (``nf_call_*`` off on this bridge
only), so a host firewall cannot silently drop the sandbox's traffic.

Processes enter a namespace with ``nsenter --net`` rather than ``ip netns
exec``: they keep the host's mount namespace, so the mounts a node makes are
the host's mounts, as a CSI node plugin's are under kubelet.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_driver.core.errors import CommandFailed
from csi_driver.node.runner import CommandRunner
from csi_driver.sandbox.plan import Namespace

NETNS_DIR = Path("/run/netns")
SYS_CLASS_NET = Path("/sys/class/net")
_IFF_UP = 0x1


def netns_file(name: str) -> Path:
    return NETNS_DIR / name


def in_namespace(name: str, argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` run inside the network namespace ``name`` (and nothing else changed)."""
    return ("nsenter", f"--net={netns_file(name)}", "--", *argv)


class SandboxNetwork:
    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner

    def create_bridge(self, bridge: str) -> None:
        if not (SYS_CLASS_NET / bridge).exists():
            # Bridged frames bypass the host's iptables on this bridge only.
            off = ("nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0")
            self._runner.run(["ip", "link", "add", bridge, "type", "bridge", *off])
        self._runner.run(["ip", "link", "set", bridge, "up"])

    def add_namespace(self, namespace: Namespace, bridge: str, prefixlen: int) -> None:
        """Create ``namespace`` joined to ``bridge``; repeating it is harmless."""
        name = namespace.name
        if not netns_file(name).exists():
            self._runner.run(["ip", "netns", "add", name])
        if not (SYS_CLASS_NET / namespace.host_link).exists():
            peer = ("peer", "name", "eth0", "netns", name)
            self._runner.run(["ip", "link", "add", namespace.host_link, "type", "veth", *peer])
        self._runner.run(["ip", "link", "set", namespace.host_link, "master", bridge, "up"])
        self._runner.run(
            ["ip", "-n", name, "addr", "replace", f"{namespace.address}/{prefixlen}", "dev", "eth0"]
        )
        self._runner.run(["ip", "-n", name, "link", "set", "eth0", "up"])
        self._runner.run(["ip", "-n", name, "link", "set", "lo", "up"])

    def set_link(self, host_link: str, *, up: bool) -> None:
        self._runner.run(["ip", "link", "set", host_link, "up" if up else "down"])

    def link_up(self, host_link: str) -> bool:
        """Whether the host end of a member's link is administratively up."""
        try:
            flags = (SYS_CLASS_NET / host_link / "flags").read_text(encoding="utf-8")
        except FileNotFoundError:
            return False
        return bool(int(flags, 16) & _IFF_UP)

    # -- finding and removing by prefix ------------------------------------------

    @staticmethod
    def namespaces(prefix: str) -> list[str]:
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(prefix + "-"))

    @staticmethod
    def links(prefix: str) -> list[str]:
        return sorted(n for n in os.listdir(SYS_CLASS_NET) if n.startswith(prefix + "-"))

    def delete_namespace(self, name: str) -> None:
        try:
            self._runner.run(["ip", "netns", "delete", name])
        except CommandFailed:
            if netns_file(name).exists():
                raise

    def delete_link(self, name: str) -> None:
        try:
            self._runner.run(["ip", "link", "delete", name])
        except CommandFailed:
            # A veth vanishes with its peer's namespace: gone is what we wanted.
            if (SYS_CLASS_NET / name).exists():
                raise


@contextmanager
def linked_namespaces(
    runner: CommandRunner, prefix: str, count: int = 2, subnet: str = "10.231.0"
) -> Iterator[list[Namespace]]:
    """``count`` namespaces ``<prefix>-1..n`` on one bridge (``<prefix>-br``), with
    addresses ``<subnet>.1..n``/24; all removed afterwards, whatever happened.

    For tests and benchmarks that need two hosts and nothing else of a sandbox:
    give each run its own ``prefix`` (at most 10 characters).
    """
    network = SandboxNetwork(runner)
    members = [
        Namespace(f"{prefix}-{n}", f"{prefix}-{n}", f"{subnet}.{n}") for n in range(1, count + 1)
    ]
    try:
        network.create_bridge(f"{prefix}-br")
        for member in members:
            network.add_namespace(member, f"{prefix}-br", 24)
        yield members
    finally:
        for name in network.namespaces(prefix):
            network.delete_namespace(name)
        for link in network.links(prefix):
            network.delete_link(link)
