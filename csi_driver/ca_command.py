"""``ferry ca``: create the cluster CA and issue the certificates of Ferry's agents.

``init`` and ``issue`` need the CA's key; ``enroll`` (a node asking the
controller for its certificate, see :mod:`csi_driver.enrollment`) does not.

Every directory it writes is shaped like a Kubernetes TLS Secret, so it can
be passed to ``--tls-dir`` as is, or loaded into a cluster with
``kubectl create secret generic NAME --from-file=DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from csi_driver.core.errors import FerryError, InvalidArgument, NotFound
from csi_driver.enrollment import enroll, load_token
from csi_driver.pki import CertificateAuthority, Identity, Role


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="create the cluster CA and issue agent certificates")
    actions = ca.add_subparsers(dest="ca_command", required=True)
    init = actions.add_parser("init", help="create a cluster CA in DIR")
    init.add_argument("--dir", type=Path, required=True, help="directory for the CA")
    issue = actions.add_parser("issue", help="issue a certificate signed by the CA in DIR")
    issue.add_argument("--dir", type=Path, required=True, help="the CA's directory")
    issue.add_argument(
        "--name",
        required=True,
        help="the identity: 'controller', 'catalog' (an etcd member) or 'node/<node-id>'",
    )
    issue.add_argument(
        "--ip", action="append", default=[], help="an IP address to add to the SANs (repeatable)"
    )
    issue.add_argument(
        "--dns", action="append", default=[], help="a DNS name to add to the SANs (repeatable)"
    )
    issue.add_argument(
        "--out", type=Path, default=None, help="where to write it (default: DIR/<identity>)"
    )
    enroll = actions.add_parser(
        "enroll",
        help="get this node's certificate from the controller (no CA key needed)",
    )
    enroll.add_argument(
        "--server", required=True, help="the controller's --enroll-listen (tcp://host:port)"
    )
    enroll.add_argument("--token-file", type=Path, required=True, help="the enrollment token")
    enroll.add_argument(
        "--ca-cert", type=Path, required=True, help="the cluster CA certificate (ca.crt)"
    )
    enroll.add_argument("--name", required=True, help="this node's identity: 'node/<node-id>'")
    enroll.add_argument(
        "--ip", action="append", default=[], help="an IP address to add to the SANs (repeatable)"
    )
    enroll.add_argument("--out", type=Path, required=True, help="where to write the bundle")
    enroll.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the controller"
    )


def run(args: argparse.Namespace) -> int:
    """Carry out ``ferry ca init|issue``; a bad input is exit 1 with a message on stderr."""
    try:
        if args.ca_command == "init":
            ca = CertificateAuthority.create()
            ca.save(args.dir)
            until = ca.cert.not_valid_after_utc
            print(f"cluster CA written to {args.dir} (valid until {until:%Y-%m-%d})")
            return 0
        if args.ca_command == "enroll":
            return _enroll(args)
        identity = Identity.parse(args.name)
        bundle = CertificateAuthority.load(args.dir).issue(
            identity, ips=tuple(args.ip), dns_names=tuple(args.dns)
        )
        out = args.out or args.dir / identity.dir_name
        bundle.write(out)
        print(
            f"certificate for {identity} written to {out} (valid until {bundle.not_after:%Y-%m-%d})"
        )
        return 0
    except FerryError as exc:
        print(f"ferry ca {args.ca_command}: {exc.message}", file=sys.stderr)
        return 1


def _enroll(args: argparse.Namespace) -> int:
    identity = Identity.parse(args.name)
    if identity.role is not Role.NODE:
        raise InvalidArgument(
            f"only nodes enroll, not {identity}: the controller's and catalog's "
            "certificates are issued where the CA's key is (`ferry ca issue`)"
        )
    try:
        ca_pem = args.ca_cert.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no CA certificate at {args.ca_cert}") from None
    bundle = enroll(
        args.server,
        load_token(args.token_file),
        identity.node_id,
        ca_pem,
        ips=tuple(args.ip),
        timeout_s=args.timeout,
    )
    bundle.write(args.out)
    until = bundle.not_after
    print(f"certificate for {identity} written to {args.out} (valid until {until:%Y-%m-%d})")
    return 0
