"""Garbage collection: packs no backup uses go, packs mostly unused are rewritten.

Invariants (the protocol that makes them hold next to running backups and
restores is in :mod:`.claims`):

- Nothing a manifest or a live claim names is deleted: a pack is deleted
  only when none of its blocks is named, and never while claimed; a
  damaged manifest or index stops the collection before it deletes
  anything.
- A pack's index goes before the pack, so no index names a missing pack.
- A repacked pack's live records are authenticated and copied as they are
  into new packs, which are durable and indexed before the old pack and
  its index are deleted.
- Format 1 chunk objects no format 1 manifest names are deleted too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from csi_driver.backup.claims import CLAIMS, Sweep, read_claims
from csi_driver.backup.packs import Entry
from csi_driver.backup.repository import CHUNKS, Progress, Repository
from csi_driver.backup.targets import StoredObject, Target
from csi_driver.backup.upload import PACKS, PackWriter, index_key
from csi_driver.core.errors import Aborted

log = logging.getLogger(__name__)

#: A pack whose blocks still in use hold less than this share of its bytes is
#: rewritten by garbage collection (its live blocks copied into a new pack):
#: below half, the space won is at least the bytes copied.
REPACK_BELOW = 0.5


@dataclass(frozen=True)
class GcResult:
    packs_deleted: int  # no block in use
    packs_repacked: int  # rewritten: their live blocks copied into new packs
    packs_kept: int
    bytes_deleted: int  # of packs (and format 1 chunks) deleted
    blocks_moved: int
    stale_claims_removed: int
    chunks_deleted: int = 0  # format 1 chunk objects


@dataclass(frozen=True)
class _Plan:
    """What a collection removes: objects whose every byte is garbage, and packs to
    rewrite with their live blocks."""

    delete: list[StoredObject]  # packs (their index goes first) and format 1 chunks
    repack: list[tuple[StoredObject, list[Entry]]]  # a pack and its live entries
    kept: int


def _plan(
    repo: Repository, referenced: set[str], indexes: dict[bytes, list[Entry]], repack_below: float
) -> _Plan:
    delete = [s for s in repo.target.list(CHUNKS) if s.key.rsplit("/", 1)[-1] not in referenced]
    repack: list[tuple[StoredObject, list[Entry]]] = []
    kept = 0
    now = time.time()
    for stored in repo.target.list(PACKS):
        name = stored.key.rsplit("/", 1)[-1]
        entries = indexes.get(bytes.fromhex(name))
        if name in referenced:  # claimed: being written, or read by a restore
            kept += 1
        elif entries is None:
            # Unindexed: a backup that died before its indexes (or is still running,
            # but then it claimed the pack).
            if now - stored.modified > repo.grace_s:
                delete.append(stored)
            else:
                kept += 1
        else:
            live = [e for e in entries if e.block_id.hex() in referenced]
            if not live:
                delete.append(stored)
            elif sum(e.stored for e in live) < repack_below * sum(e.stored for e in entries):
                repack.append((stored, live))
            else:
                kept += 1
    return _Plan(delete, repack, kept)


def _remove(target: Target, stored: StoredObject) -> None:
    if stored.key.startswith(PACKS):
        # The index first: an index never names a pack that is gone.
        target.delete(index_key(bytes.fromhex(stored.key.rsplit("/", 1)[-1])))
    target.delete(stored.key)


def _repack(repo: Repository, repack: list[tuple[StoredObject, list[Entry]]]) -> int:
    """Copy the live blocks of ``repack``'s packs into new packs, durable and indexed
    before the old ones go; how many blocks moved."""
    moved = 0
    codec = repo.codecs.get()
    with PackWriter(repo.target, repo.key, None, repo.pack_bytes) as writer:
        for stored, live in repack:
            pack = memoryview(repo.target.get(stored.key))
            for entry in live:
                record = pack[entry.offset : entry.offset + entry.stored]
                codec.authenticate(entry.block_id, record)
                writer.add(entry.block_id, record, entry.length)
                moved += 1
        writer.commit()
    repo.target.flush()
    return moved


def collect_garbage(
    repo: Repository,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    before_delete: Callable[[int], None] | None = None,
    keep_sweeps_s: float = 86400.0,
    repack_below: float = REPACK_BELOW,
) -> GcResult:
    """Delete packs (and format 1 chunks) no manifest and no live claim uses, and
    rewrite packs whose live blocks hold less than ``repack_below`` of their bytes
    (see :mod:`.claims` for why a running backup or restore is safe).

    ``before_delete`` is told how many objects are about to go (deleted or
    repacked), once, after the mark and before the first change, while the
    sweep holds new backups back (a caller may report, or pause there).
    """
    progress = progress or Progress()
    target = repo.target
    with Sweep(target, repo.grace_s) as sweep:
        claims = read_claims(target, repo.grace_s)
        referenced = set(claims.names)
        for backup in repo.backups():  # DataLoss on a damaged manifest: delete nothing
            if backup.format == 1:
                referenced.update(name for name in repo.names_of(backup.manifest) if name)
            else:
                referenced.update(block_id.hex() for block_id in repo.block_ids(backup))
        indexes = repo.indexes()  # DataLoss on a damaged index: delete nothing
        plan = _plan(repo, referenced, indexes, repack_below)
        if before_delete is not None:
            before_delete(len(plan.delete) + len(plan.repack))
        doomed = plan.delete + [stored for stored, _ in plan.repack]
        progress.start("gc", sum(s.size for s in doomed))
        moved = 0
        if not dry_run:
            if plan.repack:
                moved = _repack(repo, plan.repack)
            for number, stored in enumerate(doomed):
                if not sweep.fresh():
                    raise Aborted(
                        "garbage collection could not renew its sweep record in time and "
                        f"stopped after {number} objects (a backup may now rely on the "
                        "others); run it again"
                    )
                _remove(target, stored)
                progress.advance(stored.size)
            for op in claims.stale_ops:
                for stale in list(target.list(f"{CLAIMS}{op}/")):
                    target.delete(stale.key)
            sweep.forget_old(keep_sweeps_s)
            target.remove_leftovers(repo.grace_s)
        progress.finish()
    packs_deleted = sum(1 for s in plan.delete if s.key.startswith(PACKS))
    result = GcResult(
        packs_deleted=packs_deleted,
        packs_repacked=len(plan.repack),
        packs_kept=plan.kept,
        bytes_deleted=sum(s.size for s in doomed),
        blocks_moved=moved,
        stale_claims_removed=0 if dry_run else len(claims.stale_ops),
        chunks_deleted=len(plan.delete) - packs_deleted,
    )
    log.info(
        "garbage collected",
        extra={
            "packs_deleted": result.packs_deleted,
            "packs_repacked": result.packs_repacked,
            "bytes_deleted": result.bytes_deleted,
            "dry_run": dry_run,
        },
    )
    return result
