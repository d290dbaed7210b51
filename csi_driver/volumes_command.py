"""``ferry volumes`` and ``ferry drain``: see where volumes live, and empty a node.

``ferry volumes`` lists every volume with its primary, epoch, replicas and
their lag, its move, and the transfers in flight (``--watch``: redrawn
every second, with progress bars and rates). ``ferry drain NODE`` gives
every volume whose primary is on NODE a fresh replica elsewhere and waits
until it holds a capture taken now, so the moves that follow the
operator's ``kubectl drain`` ship only seconds of changes.

Both read the catalog as the controller does (``--catalog``, ``--tls-dir``);
``--sandbox DIR`` reaches a sandbox's catalog from inside its control
namespace, with the controller's certificate.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from csi_driver.controller.overview import VolumeView, drain, drained, overview, undrain
from csi_driver.core.errors import FerryError, InvalidArgument
from csi_driver.core.records import encode
from csi_driver.pki import TlsBundle
from csi_driver.sandbox.network import netns_file
from csi_driver.sandbox.plan import CONTROLLER
from csi_driver.sandbox.state import StateFile
from csi_driver.store.catalog import Catalog
from csi_driver.store.url import open_store
from csi_driver.transport import AgentSecurity

MiB = 1024 * 1024
BAR = 24
_CLONE_NEWNET = 0x40000000


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def catalog_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--catalog", help="the catalog URL, as the controller's --catalog")
        p.add_argument("--tls-dir", type=Path, help="a certificate the catalog admits")
        p.add_argument("--sandbox", type=Path, help="a sandbox's directory instead")

    volumes = sub.add_parser("volumes", help="list volumes: primary, replicas, lag, transfers")
    catalog_args(volumes)
    volumes.add_argument("--watch", action="store_true", help="redraw every second")
    volumes.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    drain_p = sub.add_parser("drain", help="bring NODE's volumes to fresh replicas elsewhere")
    drain_p.add_argument("node", help="the node about to be drained")
    drain_p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    drain_p.add_argument(
        "--undo", action="store_true", help="forget the drain: NODE takes copies again"
    )
    catalog_args(drain_p)


def _enter_namespace(path: Path) -> None:
    """Join the network namespace at ``path`` (this process only: a syscall, no command)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise InvalidArgument(f"cannot enter {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def _catalog(args: argparse.Namespace) -> Catalog:
    if args.sandbox is not None:
        state = StateFile(args.sandbox.resolve()).require()
        plan = state.plan
        _enter_namespace(netns_file(plan.control.name))  # etcd is reachable from there only
        security = AgentSecurity(TlsBundle.load(plan.tls / CONTROLLER))
        return Catalog(open_store(plan.catalog_url, security=security))
    if not args.catalog:
        raise InvalidArgument("give --catalog (and --tls-dir), or --sandbox DIR")
    security = AgentSecurity(TlsBundle.load(args.tls_dir) if args.tls_dir else None)
    return Catalog(open_store(args.catalog, security=security))


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def render(views: Sequence[VolumeView]) -> str:
    """The table ``ferry volumes`` prints, then one progress bar per transfer."""
    rows = [("VOLUME", "NAME", "PRIMARY", "EPOCH", "REPLICAS (lag)", "MOVE")]
    for view in views:
        replicas = " ".join(
            f"{r.node_id}({_age(r.lag_s) if r.synced else r.phase})" for r in view.replicas
        )
        v = view.volume
        rows.append(
            (v.volume_id, v.name, v.primary_node, str(v.epoch), replicas or "-", view.move or "-")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    ]
    transfers = [t for view in views for t in view.transfers]
    if transfers:
        lines += ["", "TRANSFERS"]
    for t in transfers:
        filled = int(BAR * t.fraction)
        eta = f"ETA {t.eta_s:.0f}s" if t.eta_s >= 0 else "ETA -"
        lines.append(
            f"{t.volume_id} {t.source_node} -> {t.node_id} [{'#' * filled}{'.' * (BAR - filled)}] "
            f"{t.fraction:4.0%} {t.bytes_done / MiB:.1f}/{t.bytes_total / MiB:.1f} MiB "
            f"{t.rate_bytes_per_s / MiB:.1f} MiB/s {eta}"
        )
    return "\n".join(lines)


def as_json(view: VolumeView) -> dict[str, Any]:
    """A volume's view as plain JSON: every record value by its field names."""
    return {
        "volume_id": view.volume.volume_id,
        "name": view.volume.name,
        "primary": view.volume.primary_node,
        "epoch": view.volume.epoch,
        "replicas": [asdict(r) for r in view.replicas],
        "transfers": [asdict(t) for t in view.transfers],
        "move": json.loads(encode(view.last_move)) if view.last_move else None,
        "failover": json.loads(encode(view.last_failover)) if view.last_failover else None,
        "fence": json.loads(encode(view.last_fence)) if view.last_fence else None,
    }


def run(args: argparse.Namespace) -> int:
    try:
        catalog = _catalog(args)
        try:
            if args.command == "volumes" and args.json:
                print(json.dumps([as_json(v) for v in overview(catalog)], indent=2))
                return 0
            if args.command == "volumes":
                return _volumes(catalog, args.watch)
            if args.undo:
                found = undrain(catalog, args.node)
                print(f"{args.node} {'is no longer drained' if found else 'was not drained'}")
                return 0
            return _drain(catalog, args.node, args.timeout)
        finally:
            catalog.store.close()
    except FerryError as exc:
        print(f"ferry {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _volumes(catalog: Catalog, watch: bool) -> int:
    while True:
        text = render(overview(catalog))
        if not watch:
            print(text)
            return 0
        print("\033[2J\033[H" + text, flush=True)  # clear the screen, then draw
        time.sleep(1.0)


def _drain(catalog: Catalog, node_id: str, timeout_s: float) -> int:
    wanted = drain(catalog, node_id)
    if not wanted:
        print(f"no volume has its primary on {node_id}: nothing to prepare")
        return 0
    print(f"{len(wanted)} volume(s) on {node_id}: shipping a fresh capture to their replicas")
    ends = time.monotonic() + timeout_s
    while True:
        done = drained(catalog, node_id, wanted)
        if all(done.values()):
            print(f"ready: every volume on {node_id} has a replica current to now elsewhere")
            return 0
        if time.monotonic() > ends:
            late = ", ".join(v for v, ok in done.items() if not ok)
            print(f"ferry drain: still syncing after {timeout_s:.0f}s: {late}", file=sys.stderr)
            return 1
        time.sleep(0.5)
