"""``ferry sandbox ...``: the command-line face of :mod:`csi_driver.sandbox.harness`."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from csi_driver.core.errors import FerryError
from csi_driver.sandbox.harness import MemberStatus, Sandbox, Teardown
from csi_driver.sandbox.plan import DEFAULT_SUBNET, CatalogKind, SandboxPlan

DEFAULT_DIR = Path("/var/tmp/ferry-sandbox")
FAULTS = {
    "kill": "SIGKILL a member's process (a crash)",
    "stop": "SIGTERM a member's process (an orderly stop)",
    "start": "start a member again with the same command line",
    "cut": "take a member's network link down",
    "heal": "bring a member's network link back up",
}
COLUMNS = ("NODE", "NAMESPACE", "ADDRESS", "PID", "SOCKET", "STATE")


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    parse_size: Callable[[str], int],
) -> None:
    """Register ``ferry sandbox`` and its actions on the top-level parser."""
    sandbox = sub.add_parser(
        "sandbox", help="run several Ferry nodes in network namespaces on this machine"
    )
    actions = sandbox.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text)
        p.add_argument(
            "--dir",
            type=Path,
            default=DEFAULT_DIR,
            help=f"the sandbox's directory: state, logs, pools, sockets (default {DEFAULT_DIR})",
        )
        return p

    up = action("up", "start etcd, a controller and N nodes; return when all are ready")
    up.add_argument("--nodes", type=int, default=3, help="how many node services (default 3)")
    up.add_argument(
        "--catalog",
        choices=[k.value for k in CatalogKind],
        default="etcd",
        help="etcd (default), or sqlite: the controller serves its SQLite file to the nodes",
    )
    up.add_argument(
        "--prefix",
        default=None,
        help="name prefix of the namespaces and links (default: fy + 6 random hex digits)",
    )
    up.add_argument(
        "--subnet",
        default=DEFAULT_SUBNET,
        help=f"private subnet of the sandbox's bridge (default {DEFAULT_SUBNET})",
    )
    up.add_argument(
        "--pool-capacity",
        type=parse_size,
        default=parse_size("2Gi"),
        help="bytes each node's pool may provision (default 2Gi)",
    )
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    action("status", "show each member: namespace, address, pid, socket, alive/dead/cut")
    down = action("down", "stop everything and remove namespaces, links, mounts, loop devices")
    down.add_argument(
        "--prefix", default=None, help="clean up by this prefix when the state file is lost"
    )
    for name, help_text in FAULTS.items():
        action(name, help_text).add_argument("member", help="node-N, controller or etcd")


def format_table(rows: Sequence[MemberStatus]) -> str:
    cells = [COLUMNS] + [
        (
            r.name,
            r.namespace,
            r.address,
            str(r.pid) if r.pid is not None else "-",
            str(r.socket) if r.socket is not None else "-",
            r.state.value,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _describe(teardown: Teardown) -> str:
    return (
        f"sandbox down: stopped {len(teardown.processes)} processes, removed "
        f"{len(teardown.namespaces)} namespaces and {len(teardown.links)} links"
    )


def run(args: argparse.Namespace) -> int:
    sandbox = Sandbox(args.dir)
    try:
        if args.action == "up":
            plan = SandboxPlan(
                directory=sandbox.directory,
                prefix=args.prefix or f"fy{secrets.token_hex(3)}",
                node_count=args.nodes,
                subnet=args.subnet,
                catalog=CatalogKind(args.catalog),
                pool_capacity_bytes=args.pool_capacity,
            )
            print(format_table(sandbox.up(plan, args.timeout)))
        elif args.action == "status":
            print(format_table(sandbox.status()))
        elif args.action == "down":
            print(_describe(sandbox.down(args.prefix)))
        else:
            fault: Callable[[str], MemberStatus] = getattr(sandbox, args.action)
            print(format_table([fault(args.member)]))
    except FerryError as exc:
        print(f"ferry sandbox {args.action}: {exc.message}", file=sys.stderr)
        return 1
    return 0
