"""``ferry backup keygen|create|list|verify|prune|gc`` and ``ferry restore``.

Every command names its target (``--target``: a directory or
``s3://bucket/prefix``, S3 settings in ``--s3-config``: a JSON file or a
mounted Secret's directory) and its key (``--key-file``); each also reads
``FERRY_BACKUP_TARGET``, ``FERRY_BACKUP_S3_CONFIG`` and
``FERRY_BACKUP_KEY_FILE``, which is how the chart passes a Secret mounted in
the node pod. Results go to stdout, progress bars and errors to stderr; a
failure exits 1 with what to do next.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from csi_driver.backup.collection import collect_garbage
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.progress_bar import ProgressBar
from csi_driver.backup.repository import (
    BackupResult,
    Progress,
    Repository,
    RestoreResult,
    backup_image,
    part_path,
    prune,
    restore_image,
    verify_backup,
)
from csi_driver.backup.retention import RetentionPolicy
from csi_driver.backup.snapshots import backup_handle
from csi_driver.backup.targets import open_target
from csi_driver.backup.volumes import (
    backup_volume,
    detect_fs_type,
    pool_image,
    restore_volume,
)
from csi_driver.chunks.manifest import DEFAULT_CHUNK_SIZE
from csi_driver.core.errors import FailedPrecondition, FerryError, InvalidArgument
from csi_driver.csi.client import CsiClient, block_capability, mount_capability
from csi_driver.gen import csi_pb2

MiB = 1024 * 1024


def _common(parser: argparse.ArgumentParser, *, key: bool = True) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("FERRY_BACKUP_TARGET"),
        help="where backups live: an absolute directory or s3://BUCKET[/PREFIX] "
        "(default: $FERRY_BACKUP_TARGET)",
    )
    parser.add_argument(
        "--s3-config",
        type=Path,
        default=os.environ.get("FERRY_BACKUP_S3_CONFIG"),
        help="S3 settings: a JSON file or a directory of files (a mounted Secret) named "
        "endpoint, region, access-key-id, secret-access-key (default: "
        "$FERRY_BACKUP_S3_CONFIG; else boto3's own AWS_* environment)",
    )
    if key:
        parser.add_argument(
            "--key-file",
            type=Path,
            default=os.environ.get("FERRY_BACKUP_KEY_FILE"),
            help="the operator's backup key (default: $FERRY_BACKUP_KEY_FILE)",
        )
    parser.add_argument(
        "--grace",
        type=float,
        default=900.0,
        help="seconds after which a silent backup or collection counts as dead (default 900)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parse_size: Callable[[str], int]
) -> None:
    backup = sub.add_parser("backup", help="back volumes up to a directory or an S3 bucket")
    actions = backup.add_subparsers(dest="backup_command", required=True)

    keygen = actions.add_parser("keygen", help="make a new backup key (keep it safe)")
    keygen.add_argument("--out", type=Path, required=True, help="file to write (mode 0600)")

    create = actions.add_parser("create", help="back up a volume or an image file")
    _common(create)
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--volume-id", help="a Ferry volume in the pool at --pool")
    source.add_argument("--image", type=Path, help="an image file nobody writes to")
    create.add_argument("--pool", type=Path, default=Path("/var/lib/ferry/pool"))
    create.add_argument("--name", help="what retention groups by (default: the volume id)")
    create.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        help="chunk size of a new target (default 4Mi; fixed once the target exists)",
    )

    listing = actions.add_parser("list", help="list the backups in a target")
    _common(listing)
    listing.add_argument("--volume", help="only the backups of this volume name")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    verify = actions.add_parser("verify", help="read backups back and check every chunk")
    _common(verify)
    verify.add_argument("backup_ids", nargs="*", help="backups to verify (default: all)")

    prune_cmd = actions.add_parser("prune", help="delete backups a retention policy drops")
    _common(prune_cmd)
    prune_cmd.add_argument("--keep-last", type=int, default=0)
    prune_cmd.add_argument("--keep-daily", type=int, default=0)
    prune_cmd.add_argument("--keep-weekly", type=int, default=0)
    prune_cmd.add_argument("--dry-run", action="store_true")

    gc = actions.add_parser("gc", help="delete chunks no backup uses (safe during backups)")
    _common(gc)
    gc.add_argument("--dry-run", action="store_true")

    restore = sub.add_parser("restore", help="restore a backup into a new volume or a file")
    _common(restore)
    restore.add_argument("backup_id")
    dest = restore.add_mutually_exclusive_group(required=True)
    dest.add_argument("--to", type=Path, help="a new image file")
    dest.add_argument(
        "--name",
        help="create a volume of this name (CreateVolume on --csi-endpoint) and restore into it",
    )
    dest.add_argument("--volume-id", help="an existing, empty Ferry volume in --pool")
    restore.add_argument("--pool", type=Path, default=Path("/var/lib/ferry/pool"))
    restore.add_argument("--csi-endpoint", default="unix:///csi/csi.sock")
    restore.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a StorageClass parameter for the new volume (repeatable)",
    )


def _repo(args: argparse.Namespace, *, create: bool = False) -> Repository:
    if not args.target:
        raise InvalidArgument("no backup target: give --target or set FERRY_BACKUP_TARGET")
    if not args.key_file:
        raise InvalidArgument("no backup key: give --key-file or set FERRY_BACKUP_KEY_FILE")
    target = open_target(args.target, args.s3_config)
    key = BackupKey.load(args.key_file)
    return Repository.open(
        target,
        key,
        create=create,
        chunk_size=getattr(args, "chunk_size", DEFAULT_CHUNK_SIZE),
        grace_s=args.grace,
    )


def _progress(args: argparse.Namespace) -> Progress:
    return Progress() if args.quiet else ProgressBar()


def _mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _report_backup(result: BackupResult) -> None:
    info = result.backup.info
    rate = result.bytes_read / result.elapsed_s / MiB if result.elapsed_s else 0.0
    print(
        f"backup {info.backup_id} of {info.volume_name}: {_mib(result.backup.manifest.size)} "
        f"image, {_mib(result.bytes_read)} read, {result.blocks_uploaded} new blocks in "
        f"{result.packs_uploaded} packs, "
        f"{_mib(result.bytes_uploaded)} uploaded in {result.elapsed_s:.1f} s ({rate:.0f} MiB/s)"
    )


def _report_restore(result: RestoreResult, where: str) -> None:
    size = result.backup.manifest.data_bytes
    rate = size / result.elapsed_s / MiB if result.elapsed_s else 0.0
    print(
        f"restored backup {result.backup.backup_id} into {where}: {result.chunks_fetched} "
        f"chunks fetched, {result.chunks_kept} kept from an earlier try, "
        f"{_mib(size)} in {result.elapsed_s:.1f} s ({rate:.0f} MiB/s)"
    )


def _create(args: argparse.Namespace) -> int:
    repo = _repo(args, create=True)
    if args.image is not None:
        result = backup_image(
            repo,
            args.image,
            volume_name=args.name or args.image.name,
            fs_type=detect_fs_type(args.image),
            progress=_progress(args),
        )
    else:
        result = backup_volume(
            repo, args.pool, args.volume_id, volume_name=args.name, progress=_progress(args)
        )
    _report_backup(result)
    return 0


def _list(args: argparse.Namespace) -> int:
    for backup in _repo(args).backups():
        info = backup.info
        if args.volume and info.volume_name != args.volume:
            continue
        if args.json:
            doc: dict[str, Any] = {
                "backup_id": info.backup_id,
                "created_at": info.created_at,
                "volume_name": info.volume_name,
                "volume_id": info.volume_id,
                "fs_type": info.fs_type,
                "size_bytes": backup.manifest.size,
                "data_bytes": backup.manifest.data_bytes,
                "source": info.source,
                "encrypted": info.encrypted,
                # A VolumeSnapshotContent's snapshotHandle, in any installation.
                "snapshot_handle": backup_handle(info.backup_id),
            }
            print(json.dumps(doc, sort_keys=True))
        else:
            print(
                f"{info.backup_id}  {_when(info.created_at)}  {info.volume_name:<24} "
                f"{info.fs_type or 'block':<5} {_mib(backup.manifest.size):>12} "
                f"({_mib(backup.manifest.data_bytes)} data)"
            )
    return 0


def _verify(args: argparse.Namespace) -> int:
    repo = _repo(args)
    ids = args.backup_ids or [b.backup_id for b in repo.backups()]
    failed = 0
    for backup_id in ids:
        try:
            result = verify_backup(repo, backup_id, progress=_progress(args))
        except FerryError as exc:
            failed += 1
            print(f"{backup_id}: FAILED: {exc.message}", file=sys.stderr)
            continue
        print(f"{backup_id}: ok, {result.chunks_checked} chunks ({_mib(result.bytes_checked)})")
    if failed:
        print(f"ferry backup verify: {failed} of {len(ids)} backups failed", file=sys.stderr)
        return 1
    return 0


def _prune(args: argparse.Namespace) -> int:
    policy = RetentionPolicy(args.keep_last, args.keep_daily, args.keep_weekly)
    result = prune(_repo(args), policy, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for backup_id in result.removed:
        print(f"{verb} {backup_id}")
    print(f"kept {len(result.kept)} backups, {verb} {len(result.removed)}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    result = collect_garbage(_repo(args), dry_run=args.dry_run, progress=_progress(args))
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb} {result.packs_deleted} packs and rewrote {result.packs_repacked} "
        f"({result.blocks_moved} blocks kept), {_mib(result.bytes_deleted)} freed"
        + (f", {result.chunks_deleted} format 1 chunks" if result.chunks_deleted else "")
        + f"; kept {result.packs_kept} packs; removed {result.stale_claims_removed} stale claims"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    repo = _repo(args)
    if args.to is not None:
        with _resumable(args.to, args.backup_id):
            result = restore_image(repo, args.backup_id, args.to, progress=_progress(args))
        _report_restore(result, str(args.to))
        return 0
    volume_id = args.volume_id or _create_volume(repo, args)
    with _resumable(pool_image(args.pool, volume_id).path, args.backup_id):
        result = restore_volume(
            repo, args.backup_id, args.pool, volume_id, progress=_progress(args)
        )
    _report_restore(result, f"volume {volume_id}")
    print(volume_id)
    return 0


class _Interrupted(FerryError):
    """Ctrl-C (SIGINT) during a restore."""


@contextlib.contextmanager
def _resumable(destination: Path, backup_id: str) -> Iterator[None]:
    """A restore cut short (Ctrl-C, an error) says where what it restored waits and
    how to resume from it (the same command keeps the chunks already right)."""
    try:
        yield
    except (KeyboardInterrupt, FerryError) as exc:
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else exc.message
        try:
            part = part_path(destination, backup_id)
        except InvalidArgument:
            part = None  # no such backup id: nothing was restored anywhere
        if part is None or not part.exists():
            if isinstance(exc, KeyboardInterrupt):
                raise _Interrupted(what) from None
            raise
        raise _Interrupted(
            f"{what}; the {part.stat().st_blocks * 512} bytes restored so far are kept in "
            f"{part}: run the same command again to resume from them, or delete that file"
        ) from None


def _create_volume(repo: Repository, args: argparse.Namespace) -> str:
    """CreateVolume for the backup's size and filesystem; returns the volume id."""
    backup = repo.backup(args.backup_id)
    parameters = {}
    for item in args.parameter:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidArgument(f"--parameter {item!r} is not KEY=VALUE")
        parameters[name] = value
    fs_type = backup.info.fs_type
    capability = mount_capability(fs_type) if fs_type else block_capability()
    request = csi_pb2.CreateVolumeRequest(
        name=args.name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=backup.manifest.size),
        volume_capabilities=[capability],
        parameters=parameters,
    )
    with CsiClient(args.csi_endpoint) as client:
        try:
            client.wait_ready()
            volume = client.controller.CreateVolume(request, timeout=120).volume
        except grpc.FutureTimeoutError:
            raise FailedPrecondition(
                f"no CSI controller answers at {args.csi_endpoint}; give --csi-endpoint"
            ) from None
        except grpc.RpcError as exc:
            raise FailedPrecondition(
                f"CreateVolume {args.name!r} failed: {exc.code().name}: {exc.details()}"
            ) from None
    return str(volume.volume_id)


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "create": _create,
    "list": _list,
    "verify": _verify,
    "prune": _prune,
    "gc": _gc,
}


def run(args: argparse.Namespace) -> int:
    """Carry out ``ferry backup ...`` or ``ferry restore``."""
    name = "restore" if args.command == "restore" else f"backup {args.backup_command}"
    try:
        if args.command == "restore":
            return _restore(args)
        if args.backup_command == "keygen":
            key = BackupKey.generate()
            key.save(args.out)
            print(f"backup key {key.key_id_hex} written to {args.out}; keep a copy off-cluster")
            return 0
        return _ACTIONS[args.backup_command](args)
    except _Interrupted as exc:
        print(f"ferry {name}: {exc.message}", file=sys.stderr)
        return 130  # what a shell reports for a command ended by SIGINT
    except FerryError as exc:
        print(f"ferry {name}: {exc.message}", file=sys.stderr)
        return 1
