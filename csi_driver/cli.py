"""``ferry``: run Ferry's controller, node agent, both, the one-machine demo or the sandbox;
back volumes up and restore them."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from csi_driver import (
    __version__,
    allocator,
    ca_command,
    log,
    snapshot_command,
    volumes_command,
)
from csi_driver.backup import command as backup_command
from csi_driver.backup.snapshots import BackupSettings
from csi_driver.core.errors import FerryError, InvalidArgument
from csi_driver.enrollment import EnrollmentSettings
from csi_driver.metrics import serve as serve_metrics
from csi_driver.pki import ClientTlsBundle, TlsBundle
from csi_driver.runtime import NodeConfig
from csi_driver.sandbox import commands as sandbox_commands
from csi_driver.shutdown import SignalPipe, serve_until_signalled
from csi_driver.store.etcd import DEFAULT_LEASE_TTL_S, ETCD_MIN_LEASE_TTL_S
from csi_driver.transport import AgentSecurity

logger = logging.getLogger("ferry")

_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


def parse_size(text: str) -> int:
    """``512Mi``, ``10G``, ``1048576`` -> bytes (Kubernetes quantity suffixes)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]i?)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512Mi or 10Gi")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]


def _lease_ttl(text: str) -> int:
    seconds = int(text)
    if seconds < ETCD_MIN_LEASE_TTL_S:
        # etcd raises a shorter TTL to its floor without saying so
        raise argparse.ArgumentTypeError(f"at least {ETCD_MIN_LEASE_TTL_S} s (etcd's floor)")
    return seconds


def _node_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node-id",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node's id (default: $NODE_NAME or the hostname)",
    )
    parser.add_argument(
        "--pool",
        type=Path,
        default=Path("/var/lib/ferry/pool"),
        help="directory holding volume images",
    )
    parser.add_argument(
        "--pool-capacity",
        type=parse_size,
        default=None,
        help="bytes the pool may provision (default: its filesystem's size)",
    )
    parser.add_argument(
        "--kubelet-dir",
        type=Path,
        action="append",
        default=None,
        help="root under which staging/target paths must lie "
        "(repeatable; default /var/lib/kubelet)",
    )
    parser.add_argument(
        "--agent-endpoint",
        default="unix:///run/ferry/agent.sock",
        help="where the node agent API listens (unix:// or tcp://host:port)",
    )
    parser.add_argument(
        "--chunk-endpoint",
        default=None,
        help="where this node serves its snapshots' chunks to other nodes (tcp://host:port, "
        "mutual TLS with --tls-dir); clones and restores on other nodes pull from it",
    )
    parser.add_argument("--zone", default="default", help="topology zone of this node")
    parser.add_argument(
        "--max-volumes", type=int, default=0, help="most volumes this node will stage (0: no limit)"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=10.0,
        help="seconds between this node's heartbeats in the catalog (the controller "
        "declares a node lost after --node-lost-after without one)",
    )


def _node_config(args: argparse.Namespace, security: AgentSecurity) -> NodeConfig:
    return NodeConfig(
        node_id=args.node_id,
        pool_root=args.pool,
        kubelet_dirs=tuple(args.kubelet_dir or [Path("/var/lib/kubelet")]),
        agent_endpoint=args.agent_endpoint,
        zone=args.zone,
        max_volumes=args.max_volumes,
        pool_capacity_bytes=args.pool_capacity,
        security=security,
        heartbeat_s=args.heartbeat_interval,
        chunk_endpoint=args.chunk_endpoint,
        # The chart's backup: block ($FERRY_BACKUP_*): snapshots whose class asks
        # for a backup are shipped there, and restored from there on other nodes.
        backup=BackupSettings.from_env(),
    )


def _log_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level", default=default, choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default=default, choices=["json", "text"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    _log_args(parser, argparse.SUPPRESS)
    parser.set_defaults(log_level="info", log_format="json")
    # Manifests put every flag after the command (``ferry node --log-level=debug``);
    # accept the logging flags on either side of it.
    logging_flags = argparse.ArgumentParser(add_help=False)
    _log_args(logging_flags, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def service(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, parents=[logging_flags])
        p.add_argument(
            "--endpoint",
            default="unix:///csi/csi.sock",
            help="CSI endpoint (unix:///path or tcp://host:port)",
        )
        p.add_argument(
            "--catalog",
            default="/var/lib/ferry/catalog.db",
            help="the catalog: a SQLite file path (or sqlite:///abs/path.db), "
            "etcds://host:port[,host:port...] (etcd over mutual TLS as --tls-dir's identity), "
            "etcd://host:port[,...] (plain HTTP, a local etcd only) or ferry://host:port "
            "(a controller's --catalog-listen)",
        )
        p.add_argument(
            "--grace-period",
            type=float,
            default=5.0,
            help="seconds calls in flight get to finish after SIGTERM/SIGINT (a second "
            "signal exits at once)",
        )
        p.add_argument(
            "--metrics-port",
            type=int,
            default=0,
            help="serve Prometheus /metrics on this port (0: off)",
        )
        p.add_argument(
            "--tls-dir",
            type=Path,
            help="mTLS between Ferry's agents: ca.crt, tls.crt, tls.key (see `ferry ca`)",
        )
        p.add_argument(
            "--catalog-tls-dir",
            type=Path,
            help="for an etcds:// catalog with its own PKI: ca.crt (the etcd's CA), tls.crt "
            "and tls.key (a client certificate it accepts); members are checked by the "
            "address dialled (default: --tls-dir's cluster CA and identity)",
        )
        p.add_argument(
            "--insecure-agent-api",
            action="store_true",
            help="allow the node agent API over plaintext TCP (local development only)",
        )
        return p

    def catalog_listen(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--node-lost-after",
            type=float,
            default=30.0,
            help="seconds without a heartbeat after which a node counts as lost: its "
            "volumes with failoverPolicy promote fail over to their freshest replica",
        )
        p.add_argument(
            "--leader-lease-ttl",
            type=_lease_ttl,
            default=DEFAULT_LEASE_TTL_S,
            help="seconds an etcd leader election lease lives: a killed leader's standby "
            "(or restart) takes over after it lapses; shorter fails over sooner, but a "
            "leader starved longer than it steps down (etcd's floor: 2)",
        )
        p.add_argument(
            "--catalog-listen",
            default=None,
            help="also serve the catalog to nodes (tcp://host:port); "
            "they use --catalog ferry://host:port",
        )
        return p

    controller = catalog_listen(service("controller", "serve CSI Identity + Controller"))
    controller.add_argument(
        "--enroll-listen",
        default=None,
        help="also issue node certificates here (tcp://host:port; `ferry ca enroll` asks): "
        "needs --ca-dir and --enroll-token-file",
    )
    controller.add_argument(
        "--ca-dir", type=Path, default=None, help="the cluster CA (tls.crt, tls.key) to sign with"
    )
    controller.add_argument(
        "--enroll-token-file",
        type=Path,
        default=None,
        help="the enrollment token nodes must present (Secret ferry-enrollment)",
    )
    _node_args(service("node", "serve CSI Identity + Node and the node agent API"))
    _node_args(catalog_listen(service("all-in-one", "serve controller and node from one process")))

    demo = sub.add_parser("demo", help="run Ferry on this machine and walk a volume's life")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/ferry-demo"),
        help="where the demo keeps its pool, catalog and mounts",
    )
    demo.add_argument("--size", type=parse_size, default=parse_size("256Mi"))
    demo.add_argument("--fs-type", default="ext4", choices=["ext4", "xfs"])
    demo.add_argument("--keep", action="store_true", help="leave the workdir behind")
    demo.add_argument(
        "--local",
        action="store_true",
        help="the one-node walk instead (stage, write, restage, expand) on SQLite",
    )
    ca_command.add_parser(sub)
    snapshot_command.add_parser(sub)
    sandbox_commands.add_parser(sub, parse_size)
    backup_command.add_parsers(sub, parse_size)
    volumes_command.add_parser(sub)
    return parser


def _enrollment(args: argparse.Namespace) -> EnrollmentSettings | None:
    if args.enroll_listen is None:
        return None
    if args.ca_dir is None or args.enroll_token_file is None:
        raise InvalidArgument("--enroll-listen needs --ca-dir and --enroll-token-file")
    return EnrollmentSettings(args.enroll_listen, args.ca_dir, args.enroll_token_file)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        log.configure(args.log_level if args.log_level != "info" else "warning", "text")
        if args.local:
            from csi_driver.demo import run_demo

            return run_demo(args.workdir, args.size, args.fs_type, keep=args.keep)
        from csi_driver.sandbox.demo import run_mobility_demo

        return run_mobility_demo(args.workdir, args.size, keep=args.keep)
    if args.command == "ca":
        return ca_command.run(args)
    if args.command in ("backup", "restore"):
        log.configure(args.log_level if args.log_level != "info" else "warning", "text")
        return backup_command.run(args)
    if args.command == "snapshot":
        return snapshot_command.run(args)
    if args.command == "sandbox":
        log.configure(args.log_level if args.log_level != "info" else "warning", "text")
        return sandbox_commands.run(args)
    if args.command in ("volumes", "drain"):
        log.configure(args.log_level if args.log_level != "info" else "warning", "text")
        return volumes_command.run(args)

    allocator.limit_arenas()  # before any thread of the service starts
    if args.log_format == "json":
        log.route_native_stderr()  # gRPC core's lines (TLS refusals) become JSON too
    log.configure(args.log_level, args.log_format)
    from csi_driver import runtime

    # Before starting: a signal that arrives during startup (whose steps are all bounded)
    # is acted on once it completes, and none can land in between with its default effect.
    signals = SignalPipe()
    try:
        tls = TlsBundle.load(args.tls_dir) if args.tls_dir else None
        security = AgentSecurity(tls, plaintext_tcp=args.insecure_agent_api)
        catalog_tls = ClientTlsBundle.load(args.catalog_tls_dir) if args.catalog_tls_dir else None
        if args.command == "controller":
            services = runtime.start_controller(
                args.endpoint,
                args.catalog,
                security,
                catalog_listen=args.catalog_listen,
                catalog_tls=catalog_tls,
                node_lost_after_s=args.node_lost_after,
                backup=BackupSettings.from_env(),
                lease_ttl_s=args.leader_lease_ttl,
                enrollment=_enrollment(args),
            )
        elif args.command == "node":
            config = _node_config(args, security)
            services = runtime.start_node(args.endpoint, config, args.catalog, catalog_tls)
        else:
            config = _node_config(args, security)
            services = runtime.start_all_in_one(
                args.endpoint,
                config,
                args.catalog,
                args.catalog_listen,
                catalog_tls,
                node_lost_after_s=args.node_lost_after,
                lease_ttl_s=args.leader_lease_ttl,
            )
        serve_metrics(args.metrics_port)
    except FerryError as exc:
        logger.error("cannot start", extra={"error": exc.message})
        return 1
    logger.info("ferry started", extra={"command": args.command, "version": __version__})
    serve_until_signalled(services, signals, args.grace_period)


if __name__ == "__main__":
    sys.exit(main())
