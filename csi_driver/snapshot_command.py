"""``ferry snapshot create|list|delete``: snapshots from the command line.

Speaks CSI to a running controller's socket, as the external-snapshotter
does, so what it shows is what Kubernetes sees: ``create`` waits (up to
``--timeout``) until the snapshot is ready to use and prints how long it
took. ``--backup`` (the VolumeSnapshotClass parameter ``backup: "true"``)
ships it into the backup target too, which can take a while: the wait shows
on stderr, and the result says the rate; ``ferry backup list`` shows the
backup and its handle.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grpc

from csi_driver.csi.client import CsiClient
from csi_driver.gen import csi_pb2

COLUMNS = ("SNAPSHOT", "SOURCE VOLUME", "SIZE", "READY", "CREATED")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snapshot = sub.add_parser("snapshot", help="create, list and delete volume snapshots")
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text)
        p.add_argument(
            "--endpoint",
            default="unix:///csi/csi.sock",
            help="the Ferry controller's CSI endpoint",
        )
        p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait at most")
        return p

    create = action("create", help_text="snapshot a volume and wait until it is ready")
    create.add_argument("--name", required=True, help="the snapshot's name (idempotency key)")
    create.add_argument("--volume", required=True, help="the source volume's id")
    create.add_argument(
        "--backup",
        action="store_true",
        help='ship it into the backup target too (VolumeSnapshotClass backup: "true")',
    )
    create.add_argument("--quiet", action="store_true", help="no progress while waiting")
    listing = action("list", help_text="list snapshots")
    listing.add_argument("--volume", default="", help="only the snapshots of this volume")
    delete = action("delete", help_text="delete a snapshot")
    delete.add_argument("snapshot_id")


def _size(size: int) -> str:
    for unit, scale in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def _row(snapshot: Any) -> tuple[str, ...]:
    created = time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(snapshot.creation_time.ToNanoseconds() / 1e9)
    )
    return (
        snapshot.snapshot_id,
        snapshot.source_volume_id,
        _size(snapshot.size_bytes),
        "yes" if snapshot.ready_to_use else "no",
        created,
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _waiting(snapshot_id: str, elapsed: float, backup: bool) -> None:
    doing = "backing up" if backup else "taking"
    print(f"\rsnapshot {snapshot_id}: {doing}, {elapsed:.0f}s", end="", file=sys.stderr)


def _create(client: CsiClient, args: argparse.Namespace) -> int:
    started = time.monotonic()
    request = csi_pb2.CreateSnapshotRequest(
        name=args.name,
        source_volume_id=args.volume,
        parameters={"backup": "true"} if args.backup else {},
    )
    shown = False
    while True:
        left = args.timeout - (time.monotonic() - started)
        snapshot = client.controller.CreateSnapshot(request, timeout=max(left, 1.0)).snapshot
        if snapshot.ready_to_use or left <= 0:
            break
        if not args.quiet:
            _waiting(snapshot.snapshot_id, time.monotonic() - started, args.backup)
            shown = True
        time.sleep(0.2)
    if shown:
        print(file=sys.stderr)
    elapsed = time.monotonic() - started
    state = "ready" if snapshot.ready_to_use else "not ready yet (run it again to wait)"
    line = f"snapshot {snapshot.snapshot_id} of {args.volume}: {state} in {elapsed:.3f}s"
    if args.backup and snapshot.ready_to_use:
        # The whole size over the whole wait: a lower bound on the backup's own rate.
        rate = snapshot.size_bytes / max(elapsed, 1e-3) / (1 << 20)
        line += f", backed up ({_size(snapshot.size_bytes)} at {rate:.1f} MiB/s or better)"
    print(line)
    return 0 if snapshot.ready_to_use else 1


def _list(client: CsiClient, args: argparse.Namespace) -> int:
    rows: list[tuple[str, ...]] = [COLUMNS]
    token = ""
    while True:
        page = client.controller.ListSnapshots(
            csi_pb2.ListSnapshotsRequest(
                source_volume_id=args.volume, starting_token=token, max_entries=100
            ),
            timeout=args.timeout,
        )
        rows += [_row(e.snapshot) for e in page.entries]
        token = page.next_token
        if not token:
            break
    print(_table(rows))
    return 0


def _delete(client: CsiClient, args: argparse.Namespace) -> int:
    request = csi_pb2.DeleteSnapshotRequest(snapshot_id=args.snapshot_id)
    client.controller.DeleteSnapshot(request, timeout=args.timeout)
    print(f"snapshot {args.snapshot_id} deleted")
    return 0


def run(args: argparse.Namespace) -> int:
    """Carry out ``ferry snapshot ...``; a refusal is exit 1 with its code and message."""
    actions = {"create": _create, "list": _list, "delete": _delete}
    with CsiClient(args.endpoint) as client:
        try:
            return actions[args.snapshot_command](client, args)
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            print(f"ferry snapshot {args.snapshot_command}: {code}: {details}", file=sys.stderr)
            return 1
