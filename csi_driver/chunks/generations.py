"""A replica's generations: deltas applied into a new image, committed only verified.

Layout under a replica's root::

    gen-<n>/image       committed generation n (the newest is current)
    gen-<n>/manifest    its manifest, verified against the image before commit
    gen-<n>/blocks      its block table (:mod:`.blocks`), verified with it
    staging/            the generation being built, if any:
      image             the previous generation's copy (reflink where possible)
                        with the delta written into it
      blocks            the previous generation's block table, likewise
      manifest          the target manifest (what the image must become)
      base              the generation it was copied from ("0": none)
      copy              how: "reflink" (blocks shared with the base) or "bytes"
      landed            journal of chunk indexes durably written (u32 each)
      whole             chunks to fetch whole, not by blocks: they failed
                        verification once (u32 each)

Invariants:

- A committed generation is never written again. The current one stays
  readable, unchanged, while the next is staged, and until the commit; it
  is removed by the next commit but one, or by ``retire_older`` (so at
  most two generations are kept).
- The commit point is one ``rename(staging, gen-<n+1>)`` followed by an
  fsync of the root, done only after the whole staged image was read back
  and matched the target manifest. A crash before it leaves the current
  generation as it was; a crash after it leaves the new one committed.
- A chunk index enters ``landed`` only after its bytes were checked against
  the target digest (before they were written, :meth:`Staging.write`, or as
  they read back from disk once written, :meth:`Staging.place`) and the
  image was fdatasync'ed, so a resumed staging never asks again for a chunk
  that landed, and never trusts one that did not.
  A chunk the base holds other data for may be written by blocks
  (:meth:`Staging.plan_blocks`): its block digests are checked against the
  target's chunk digest, each block written against its block digest, and
  only blocks whose digests differ from the base's are written at all.
- Starting a staging syncs nothing (its cost follows the delta, not the
  volume's size): the first :meth:`Staging.sync` makes the copy of the base,
  its table, the staging's files and directory durable before any chunk
  counts as landed. Base bytes a crash took from the copy before that are
  caught by verification, which reads every block whose extents are not
  the base's, and fetched again (``whole``), after a restart too.
- Verification reads every block that may differ from a verified generation
  (or, for chunks written whole, reads them back once they are durable,
  :meth:`Staging.read_back`, so that it overlaps with the stream):
  all of them, unless the staged image is a reflink of the base, in which
  case blocks whose extents are still the base's and whose table entries
  are the base's hold the base's verified bytes (see :mod:`.extents`), and
  only the others are read again; every chunk touched must have table
  entries whose digest is the target's. A generation's table is therefore
  as verified as its image.
- Chunks whose digest fails on arrival or at verification are never
  committed: :class:`DataLoss` names them, and they are dropped from
  ``landed`` so that a retry asks for them again.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.changes import describe_since_capture
from csi_driver.chunks.direct import ImageIO
from csi_driver.chunks.durable import write_atomic
from csi_driver.chunks.extents import changed_ranges, extent_map, reflink
from csi_driver.chunks.manifest import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZE,
    HOLE_BLOCK,
    Delta,
    Manifest,
    block_count,
    block_digest,
    block_digests,
    block_size,
    decode,
    delta,
    encode,
    root_digest,
)
from csi_driver.chunks.scan import (
    blocks_touching,
    chunks_touching,
    data_ranges,
    scan_image,
)
from csi_driver.core.errors import (
    DataLoss,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
)
from csi_driver.node.pool import fsync_dir, punch_hole

log = logging.getLogger(__name__)

_GENERATION = re.compile(r"^gen-(\d{8})$")
_INDEX = struct.Struct(">I")


@dataclass(frozen=True)
class Generation:
    number: int
    image: Path
    manifest: Manifest

    @property
    def blocks(self) -> Path:
        """The image's block table."""
        return self.image.with_name("blocks")


class GenerationStore:
    """The generations of one replica image, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Committed generations never change: their manifests are read once.
        self._manifests: dict[int, Manifest] = {}

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    def _dir(self, number: int) -> Path:
        return self.root / f"gen-{number:08d}"

    def _numbers(self) -> list[int]:
        return sorted(
            int(m.group(1)) for p in self.root.iterdir() if (m := _GENERATION.match(p.name))
        )

    def current(self) -> Generation | None:
        """The newest committed generation; None when there is none that this
        version can read (one of an older format is replaced by the next commit)."""
        numbers = self._numbers()
        if not numbers:
            return None
        number = numbers[-1]
        directory = self._dir(number)
        manifest = self._manifests.get(number)
        if manifest is None:
            try:
                manifest = decode((directory / "manifest").read_bytes())
            except InvalidArgument:
                log.warning("generation of an older format ignored", extra={"dir": str(directory)})
                return None
            if not (directory / "blocks").exists():
                return None
            self._manifests = {number: manifest}
        return Generation(number, directory / "image", manifest)

    def adopt(self, image: Path, lineage: Path | None = None) -> Generation:
        """Commit ``image`` (moved here by rename, on this filesystem, and quiescent:
        nothing may write it any more) as the first generation.

        A demoted primary keeps its image as its replica's base, so the next
        sync from the new primary sends only what differs. Its manifest and
        block table are read from the bytes: from the newest capture in
        ``lineage`` (the captures its exports were served from) by comparing
        extents, reading only what changed since, or from the whole image.
        """
        if self._numbers():
            raise FailedPrecondition(f"replica {self.root} already has generations")
        building = self.root / ".adopt.tmp"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(mode=0o700)
        os.rename(image, building / "image")
        scan = None
        if lineage is not None:
            scan = describe_since_capture(lineage, building / "image", building / "blocks")
        if scan is None:
            size = (building / "image").stat().st_size
            table = BlockTable.create(building / "blocks", size, DEFAULT_CHUNK_SIZE)
            try:
                scan = scan_image(building / "image", DEFAULT_CHUNK_SIZE, table=table)
                table.sync()
            finally:
                table.close()
        manifest = scan.manifest
        write_atomic(building / "manifest", encode(manifest))
        os.rename(building, self._dir(1))
        fsync_dir(self.root)
        self._manifests = {1: manifest}
        log.info(
            "generation adopted",
            extra={"replica": str(self.root), "bytes_read": scan.bytes_read},
        )
        return Generation(1, self._dir(1) / "image", manifest)

    def seed(self, base: Generation) -> Generation:
        """Commit a copy of ``base`` (another store's committed generation, on this
        filesystem; a reflink where it can) as this store's first generation: the
        base a pull of a related image (a snapshot of the same volume) is staged
        against, so only the chunks that differ travel.
        """
        if self._numbers():
            raise FailedPrecondition(f"{self.root} already has generations")
        building = self.root / ".seed.tmp"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(mode=0o700)
        try:
            try:
                reflink(base.image, building / "image")
            except FailedPrecondition:
                sparse_copy(base.image, building / "image")
            shutil.copyfile(base.blocks, building / "blocks")
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        write_atomic(building / "manifest", encode(base.manifest))
        os.rename(building, self._dir(1))
        fsync_dir(self.root)
        self._manifests = {1: base.manifest}
        return Generation(1, self._dir(1) / "image", base.manifest)

    def stage(self, target: Manifest) -> Staging:
        """The staging of the generation holding ``target``: resumed when one for the
        same target and base exists, else started afresh from the current generation."""
        base = self.current()
        base_number = base.number if base else 0
        staging = self.staging_dir
        plan = delta(target, base.manifest if base else None)
        if _same_staging(staging, target, base_number):
            landed = _read_journal(staging / "landed")
            log.info(
                "staging resumed",
                extra={"replica": str(self.root), "landed_chunks": len(landed)},
            )
            table = BlockTable(staging / "blocks", target.size, target.chunk_size, writable=True)
            whole = _read_journal(staging / "whole") if (staging / "whole").exists() else set()
            # Chunks that failed verification where the copy of the base was wrong
            # are sent too, though the base's manifest says it holds them.
            extra = {i for i in whole if i < len(target.chunks) and target.chunks[i]}
            if extra - set(plan.send):
                plan = Delta(target, tuple(sorted({*plan.send, *extra})), plan.punch)
            return Staging(
                self, target, plan, base_number, landed, table=table, base=base, whole=whole
            )
        shutil.rmtree(staging, ignore_errors=True)
        building = self.root / ".staging.tmp"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(mode=0o700)
        copy = _prepare_image(building / "image", base, plan)
        same_chunks = base is not None and base.manifest.chunk_size == target.chunk_size
        table = BlockTable.create(
            building / "blocks",
            target.size,
            target.chunk_size,
            copy_of=base.blocks if base is not None and same_chunks else None,
        )
        for index in plan.punch:
            table.punch(index)
        table.close()
        (building / "copy").write_text(copy)
        (building / "landed").touch()
        (building / "base").write_text(str(base_number))
        (building / "manifest").write_bytes(encode(target))
        # Nothing is fsynced yet: the first Staging.sync makes all of it durable
        # before any chunk counts as landed (see the module docstring).
        os.rename(building, staging)
        table = BlockTable(staging / "blocks", target.size, target.chunk_size, writable=True)
        return Staging(self, target, plan, base_number, set(), table=table, base=base)

    def retire_older(self) -> None:
        """Remove the generations older than the current one. A commit leaves the
        previous one (so a caller can report the new one first); the next commit
        removes it anyway."""
        numbers = self._numbers()
        if numbers:
            self._remove_older_than(numbers[-1])

    def _remove_older_than(self, number: int) -> None:
        for old in self._numbers():
            if old < number:
                shutil.rmtree(self._dir(old), ignore_errors=True)

    def _commit(self, staging: Staging) -> Generation:
        number = max(self._numbers(), default=0) + 1
        os.rename(self.staging_dir, self._dir(number))
        fsync_dir(self.root)  # the commit point
        self._manifests = {number: staging.target}
        # The one before stays until retire_older: freeing a reflinked image costs
        # as much as it has extents, and the new generation is usable already.
        self._remove_older_than(number - 1)
        log.info(
            "generation committed",
            extra={"replica": str(self.root), "generation": number},
        )
        return Generation(number, self._dir(number) / "image", staging.target)


def _same_staging(staging: Path, target: Manifest, base_number: int) -> bool:
    try:
        return (
            (staging / "manifest").read_bytes() == encode(target)
            and (staging / "base").read_text() == str(base_number)
            and (staging / "copy").exists()
            and (staging / "blocks").exists()
        )
    except FileNotFoundError:
        return False


def _journal(indexes: set[int]) -> bytes:
    return b"".join(_INDEX.pack(i) for i in sorted(indexes))


def _read_journal(path: Path) -> set[int]:
    data = path.read_bytes()
    whole = len(data) - len(data) % _INDEX.size  # a torn last record never counts
    return {_INDEX.unpack_from(data, at)[0] for at in range(0, whole, _INDEX.size)}


def _prepare_image(path: Path, base: Generation | None, plan: Delta) -> str:
    """``path`` as a copy of ``base``'s image (reflinked when the filesystem can),
    resized to ``plan``'s target and with the chunks it holds as holes punched;
    return how it was copied."""
    copy = "bytes"
    if base is not None:
        try:
            reflink(base.image, path, durable=False)
            copy = "reflink"
        except FailedPrecondition:
            sparse_copy(base.image, path, durable=False)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != plan.target.size:
            os.ftruncate(fd, plan.target.size)
        for index in plan.punch:
            punch_hole(fd, *plan.target.span(index))
    finally:
        os.close(fd)
    return copy


def sparse_copy(source: Path, destination: Path, *, durable: bool = True) -> None:
    """Copy only the ranges of ``source`` that hold data; the rest stays holes; on
    disk before this returns unless ``durable`` is False (the caller syncs it).

    Also what a primary copies its image with, while frozen, on a pool that
    cannot reflink (node/reconcile/exports.py)."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(src).st_size
        os.ftruncate(dst, size)
        for offset, length in data_ranges(src, size):
            done = 0
            while done < length:
                copied = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
                if copied == 0:
                    break
                done += copied
        if durable:
            os.fsync(dst)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(
                f"no room to copy {source} for a new replica generation; free space"
            ) from exc
        raise
    finally:
        os.close(src)
        os.close(dst)


def differing_entries(ours: bytes, theirs: bytes) -> set[int]:
    """The indexes of the block digests that differ between two chunks' entries of
    the same length (compared as integers: the work is per differing entry, not
    per block, in Python)."""
    if len(ours) != len(theirs):
        raise InternalError(f"{len(ours)} and {len(theirs)} bytes of block digests compared")
    if ours == theirs:
        return set()
    bits = DIGEST_SIZE * 8
    last = len(ours) // DIGEST_SIZE - 1
    diff = int.from_bytes(ours, "big") ^ int.from_bytes(theirs, "big")
    found: set[int] = set()
    while diff:
        entry = last - (diff.bit_length() - 1) // bits
        found.add(entry)
        diff &= (1 << ((last - entry) * bits)) - 1  # this entry and those before it
    return found


@dataclass(frozen=True)
class BlockPatch:
    """How chunk ``index`` is written by blocks: the target's block ``digests``
    (checked against its chunk digest), the ``runs`` of blocks to fetch as
    (first, count), and the blocks to zero (holes in the target, data in the base)."""

    index: int
    digests: bytes
    runs: tuple[tuple[int, int], ...]
    zero: tuple[int, ...]

    def run_digests(self, first: int, count: int) -> bytes:
        return self.digests[first * DIGEST_SIZE : (first + count) * DIGEST_SIZE]


@dataclass
class Staging:
    """A generation being built: write the chunks :meth:`missing` names, then commit."""

    store: GenerationStore
    target: Manifest
    delta: Delta
    base_number: int
    landed: set[int]
    verified_bytes: int = 0  # what the last commit read back to verify
    table: BlockTable | None = None
    #: The generation this one is built on (None: built from nothing).
    base: Generation | None = None
    #: Chunks to fetch whole, not by blocks (their blocks did not verify once).
    whole: set[int] = field(default_factory=set)
    _pending: list[int] = field(default_factory=list)
    #: Chunks written by :meth:`place` and not checked yet (:meth:`sync` does).
    _unchecked: set[int] = field(default_factory=set)
    #: Chunks :meth:`sync` found not to be the target's, until :meth:`take_rejected`.
    _rejected: list[int] = field(default_factory=list)
    #: Block digests of the chunks in ``_pending``, written to the table by :meth:`sync`.
    _entries: dict[int, bytes] = field(default_factory=dict)
    #: Chunks written in this process and not yet read back: None when written
    #: whole, else the blocks written or zeroed.
    _written: dict[int, frozenset[int] | None] = field(default_factory=dict)
    #: Chunks read back from disk once durable whose bytes matched their block
    #: digests: None for all of the chunk, else those blocks.
    _read_back: dict[int, frozenset[int] | None] = field(default_factory=dict)
    _io: ImageIO | None = None
    #: The syncer's reader of what landed (another thread than the writer's).
    _reader: ImageIO | None = None
    _base_table: BlockTable | None = None
    #: Whether the staging's files and directory are known durable (after a
    #: first :meth:`sync`; :meth:`GenerationStore.stage` leaves that to it).
    _staging_durable: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sync_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.table is None:
            self.table = BlockTable(
                self.store.staging_dir / "blocks",
                self.target.size,
                self.target.chunk_size,
                writable=True,
            )
        base = self.base
        if base is not None and base.manifest.chunk_size == self.target.chunk_size:
            self._base_table = BlockTable(base.blocks, base.manifest.size, base.manifest.chunk_size)

    @property
    def image(self) -> Path:
        return self.store.staging_dir / "image"

    def _table(self) -> BlockTable:
        assert self.table is not None  # set by __post_init__
        return self.table

    def missing(self) -> list[int]:
        """Chunks still to write, in order: the delta's, less those landed."""
        with self._lock:
            return [i for i in self.delta.send if i not in self.landed]

    def by_blocks(self, index: int) -> bool:
        """Whether chunk ``index`` is fetched by blocks: the base has a chunk of the
        same length there (data or a hole) whose block digests are known, so
        only blocks that differ from it need to travel."""
        base = self.base
        return (
            self._base_table is not None
            and base is not None
            and index not in self.whole
            and index < len(base.manifest.chunks)
            and base.manifest.chunk_length(index) == self.target.chunk_length(index)
        )

    def _expect(self, index: int, length: int) -> bool:
        """DataLoss unless chunk ``index`` is a data chunk of the target; whether
        ``length`` is its length."""
        if not 0 <= index < len(self.target.chunks) or self.target.chunks[index] is None:
            raise DataLoss(f"chunk {index} is not a data chunk of the target image", (index,))
        return length == self.target.chunk_length(index)

    def check(self, index: int, data: bytes) -> bytes:
        """DataLoss unless ``data`` is exactly chunk ``index`` of the target; return
        its block digests."""
        digests = b""
        if self._expect(index, len(data)):
            digests = block_digests(data, self.target.chunk_size)
        if not digests or root_digest(digests) != self.target.chunks[index]:
            raise DataLoss(
                f"chunk {index} does not match its digest in the manifest; it was not "
                "written and will be asked for again",
                (index,),
            )
        return digests

    def write(self, index: int, data: bytes) -> None:
        """Write chunk ``index`` after checking it; durable at the next :meth:`sync`."""
        digests = self.check(index, data)
        self._pwrite(self.target.span(index)[0], data)
        with self._lock:
            self._pending.append(index)
            self._entries[index] = digests
            self._written[index] = None
            self._read_back.pop(index, None)

    def place(self, index: int, data: bytes) -> None:
        """Write chunk ``index`` unchecked: :meth:`sync` reads it back from disk and
        checks it before it counts as landed, so its bytes are hashed once where
        :meth:`write` and :meth:`read_back` hash them twice. One that does not
        match never lands, and :meth:`take_rejected` names it. DataLoss at once
        when ``data`` cannot be the chunk (a hole in the target, another length)."""
        if not self._expect(index, len(data)):
            raise DataLoss(
                f"chunk {index} arrived with {len(data)} bytes, not "
                f"{self.target.chunk_length(index)}; it will be asked for again",
                (index,),
            )
        self._pwrite(self.target.span(index)[0], data)
        with self._lock:
            self._pending.append(index)
            self._unchecked.add(index)
            self._entries.pop(index, None)
            self._written.pop(index, None)
            self._read_back.pop(index, None)

    def take_rejected(self) -> list[int]:
        """The chunks :meth:`sync` found not to match the target since the last call
        (written by :meth:`place`; not landed: fetch them again)."""
        with self._lock:
            rejected, self._rejected = self._rejected, []
        return rejected

    def plan_blocks(self, index: int, digests: bytes) -> BlockPatch:
        """The blocks to fetch for chunk ``index`` whose target block digests the
        sender says are ``digests``; DataLoss unless the manifest's chunk digest
        commits to them."""
        if not self.by_blocks(index) or self._base_table is None:
            raise DataLoss(f"chunk {index} is not fetched by blocks", (index,))
        count = block_count(self.target.chunk_length(index), self.target.chunk_size)
        if len(digests) != count * DIGEST_SIZE or root_digest(digests) != self.target.chunks[index]:
            raise DataLoss(
                f"the block digests sent for chunk {index} do not match its digest in the "
                "manifest; it will be asked for again",
                (index,),
            )
        have = self._base_table.read(index)
        runs: list[tuple[int, int]] = []
        zero: list[int] = []
        for block in sorted(differing_entries(digests, have)):
            at = block * DIGEST_SIZE
            wanted = digests[at : at + DIGEST_SIZE]
            if wanted == HOLE_BLOCK:
                zero.append(block)
            elif runs and sum(runs[-1]) == block:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((block, 1))
        return BlockPatch(index, digests, tuple(runs), tuple(zero))

    def write_run(self, patch: BlockPatch, first: int, data: bytes) -> None:
        """Write the run of ``patch``'s blocks from ``first``, each checked against
        its digest first; DataLoss (nothing written) when one does not match."""
        count = next((n for start, n in patch.runs if start == first), 0)
        step = block_size(self.target.chunk_size)
        offset, length = self.target.span(patch.index)
        expected = min(count * step, length - first * step)
        if not count or len(data) != expected:
            raise DataLoss(
                f"chunk {patch.index} got an unasked run at block {first}", (patch.index,)
            )
        view = memoryview(data)
        wanted = patch.run_digests(first, count)
        for n in range(count):
            got = block_digest(view[n * step : (n + 1) * step])
            if got != wanted[n * DIGEST_SIZE : (n + 1) * DIGEST_SIZE]:
                raise DataLoss(
                    f"block {first + n} of chunk {patch.index} does not match its digest; "
                    "the chunk will be asked for again",
                    (patch.index,),
                )
        self._pwrite(offset + first * step, data, cached=True)

    def finish(self, patch: BlockPatch) -> None:
        """Chunk ``patch.index`` is whole once its runs are written: zero its blocks
        that became holes, record its block digests; durable at the next :meth:`sync`."""
        step = block_size(self.target.chunk_size)
        offset, length = self.target.span(patch.index)
        if patch.zero:
            fd = self._open().fd
            for block in patch.zero:
                punch_hole(fd, offset + block * step, min(step, length - block * step))
        written = {b for first, count in patch.runs for b in range(first, first + count)}
        with self._lock:
            self._pending.append(patch.index)
            self._entries[patch.index] = patch.digests
            self._written[patch.index] = frozenset(written | set(patch.zero))
            self._read_back.pop(patch.index, None)

    def _open(self) -> ImageIO:
        """The writer of the staged image (the syncer only syncs through it)."""
        with self._lock:
            if self._io is None:
                # Around the page cache where it can (.direct): the bytes are read
                # back from disk once durable, and never served from here before commit.
                self._io = ImageIO(self.image, write=True, buffer_size=self.target.chunk_size)
            return self._io

    def _pwrite(self, offset: int, data: bytes, *, cached: bool = False) -> None:
        try:
            self._open().write(offset, data, cached=cached)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"the filesystem holding replica {self.store.root} is full; free space "
                    "on it (what landed is kept: the transfer resumes)"
                ) from exc
            raise

    def sync(self) -> list[int]:
        """Check the chunks :meth:`place` wrote against the target (read back from
        disk), make the chunks written so far durable, then record them as landed;
        return them. Safe to call from another thread while :meth:`write` goes on:
        a chunk written after the call began waits for the next one."""
        with self._sync_lock:
            with self._lock:
                durable, self._pending = self._pending, []
                entries, self._entries = self._entries, {}
                unchecked = [i for i in durable if i in self._unchecked]
                self._unchecked.difference_update(unchecked)
            if unchecked:
                checked, bad = self._check_placed(unchecked)
                entries.update(checked)
                durable = [i for i in durable if i not in bad]
                with self._lock:
                    self._rejected.extend(bad)
            if not durable and self._staging_durable:
                return []
            # Table writes batched here, off the receiving thread, in index order.
            self._table().write_many(entries)
            # The image and table as a whole, not only what was written: the
            # first sync also makes the staging's copy of the base durable.
            self._open().sync()
            self._table().sync()
            if not self._staging_durable:
                for name in ("manifest", "base", "copy"):
                    with open(self.store.staging_dir / name, "rb") as handle:
                        os.fsync(handle.fileno())
                fsync_dir(self.store.root)
                self._staging_durable = True
            if not durable:
                return []
            with open(self.store.staging_dir / "landed", "ab") as journal:
                journal.write(_journal(set(durable)))
                journal.flush()
                os.fsync(journal.fileno())
            with self._lock:
                self.landed.update(durable)
            return durable

    def _check_placed(self, indexes: list[int]) -> tuple[dict[int, bytes], set[int]]:
        """The block digests of the chunks ``indexes`` that read back from disk as the
        target's, and the chunks that do not; the former count as read back."""
        reader = self._reader_io()
        checked: dict[int, bytes] = {}
        bad: set[int] = set()
        for index in indexes:
            offset, length = self.target.span(index)
            digests = block_digests(reader.read(offset, length), self.target.chunk_size)
            if root_digest(digests) == self.target.chunks[index]:
                checked[index] = digests
            else:
                bad.add(index)
                log.warning(
                    "chunk read back unlike its digest; it will be fetched again",
                    extra={"replica": str(self.store.root), "chunk": index},
                )
        with self._lock:
            for index in checked:
                self._read_back[index] = None
        return checked, bad

    def _reader_io(self) -> ImageIO:
        """The reader of what was written (used under the sync lock only)."""
        if self._reader is None:
            self._reader = ImageIO(self.image, buffer_size=self.target.chunk_size)
        return self._reader

    def read_back(self, indexes: list[int]) -> int:
        """Read what this process wrote of the durable chunks ``indexes`` back from
        disk (whole chunks, or the blocks written by blocks) and check it against
        the block digests; return the bytes read.

        Verification before commit then skips what matched: the receiver calls
        this as chunks land, so reading back overlaps with the stream instead
        of following it. What does not match is left for the commit's
        verification to find.
        """
        with self._sync_lock:
            return self._read_back_written(indexes)

    def _read_back_written(self, indexes: list[int]) -> int:
        with self._lock:
            wanted = {
                i: self._written.pop(i) for i in indexes if i in self._written and i in self.landed
            }
        if not wanted:
            return 0
        table = BlockTable(self.table_path, self.target.size, self.target.chunk_size)
        reader = self._reader_io()
        step = block_size(self.target.chunk_size)
        read = 0
        try:
            for index, blocks in wanted.items():
                offset, length = self.target.span(index)
                entries = table.read(index)
                if blocks is None:
                    view = reader.read(offset, length)
                    read += length
                    matched = block_digests(view, self.target.chunk_size) == entries
                else:
                    matched = True
                    for block in sorted(blocks):
                        size = min(step, length - block * step)
                        view = reader.read(offset + block * step, size, cached=True)
                        read += size
                        at = block * DIGEST_SIZE
                        matched = matched and block_digest(view) == entries[at : at + DIGEST_SIZE]
                if matched:
                    with self._lock:
                        self._read_back[index] = blocks
        finally:
            table.close()
        return read

    @property
    def table_path(self) -> Path:
        return self.store.staging_dir / "blocks"

    def close(self) -> None:
        self.sync()
        for io in (self._io, self._reader):
            if io is not None:
                io.close()
        self._io = self._reader = None
        self._table().close()
        if self._base_table is not None:
            self._base_table.close()

    def commit(self) -> Generation:
        """Verify the whole staged image against the target, then commit it."""
        self.close()
        if self.missing():
            raise FailedPrecondition(
                f"{len(self.missing())} chunks have not landed yet; fetch them before commit"
            )
        bad = self._verify()
        self._table().close()
        if bad:
            self._forget(bad)
            raise DataLoss(
                f"the staged image differs from its manifest in chunks {list(bad[:8])}; "
                "nothing was committed, they will be fetched again",
                bad,
            )
        return self.store._commit(self)

    def _verify(self) -> tuple[int, ...]:
        """The chunks whose staged bytes or block digests are not the target's, read
        back from disk (see the module docstring)."""
        base = self.store.current()
        if (base.number if base else 0) != self.base_number:
            raise FailedPrecondition(
                f"replica {self.store.root} was committed to by someone else while this "
                "staging was built; stage again"
            )
        copy = (self.store.staging_dir / "copy").read_text()
        if (
            base is not None
            and copy == "reflink"
            and base.manifest.size == self.target.size
            and base.manifest.chunk_size == self.target.chunk_size
        ):
            try:
                return self._verify_against(base)
            except FailedPrecondition:
                pass  # no extent map here: read it all
        # The table is rewritten from the bytes on disk, so it is theirs by
        # construction; chunks read back as they landed are not read again.
        known: list[bytes | None] = [None] * len(self.target.chunks)
        table = self._table()
        whole = {i for i, blocks in self._read_back.items() if blocks is None}
        for index in whole:
            known[index] = root_digest(table.read(index))
        scan = scan_image(
            self.image,
            self.target.chunk_size,
            previous=Manifest(self.target.size, self.target.chunk_size, tuple(known)),
            changed=set(range(len(known))) - whole,
            table=table,
        )
        table.sync()
        self.verified_bytes = scan.bytes_read
        return tuple(
            i
            for i, (a, b) in enumerate(zip(scan.manifest.chunks, self.target.chunks, strict=True))
            if a != b
        )

    def _verify_against(self, base: Generation) -> tuple[int, ...]:
        """Verification of a staged reflink of ``base``: only blocks whose extents or
        table entries differ from ``base``'s are read."""
        target, table = self.target, self._table()
        step = block_size(target.chunk_size)
        per_chunk = block_count(target.chunk_size, target.chunk_size)
        moved = changed_ranges(extent_map(base.image), extent_map(self.image), target.size)
        suspects = blocks_touching(moved, target.chunk_size)
        entries_moved = changed_ranges(
            extent_map(base.blocks), extent_map(table.path), os.stat(table.path).st_size
        )
        checked = set(suspects)
        checked |= chunks_touching(entries_moved, per_chunk * DIGEST_SIZE)
        checked |= {*self.delta.send, *self.delta.punch}
        base_table = BlockTable(base.blocks, base.manifest.size, base.manifest.chunk_size)
        bad: list[int] = []
        read = 0
        reader = ImageIO(self.image, buffer_size=step)
        try:
            for index, (wanted, held) in enumerate(
                zip(target.chunks, base.manifest.chunks, strict=True)
            ):
                if index not in checked:
                    if wanted != held:
                        bad.append(index)
                    continue
                entries = table.read(index)
                if root_digest(entries) != wanted:
                    bad.append(index)
                    continue
                read_back = self._read_back.get(index, frozenset())
                if read_back is None:
                    continue  # its bytes were read back and matched these entries
                # Blocks whose entries are the base's, on the base's extents, hold the
                # base's verified bytes; those read back as they landed matched their
                # entries: the rest is read.
                count = len(entries) // DIGEST_SIZE
                unread = suspects.get(index, set()) | differing_entries(
                    entries, base_table.read(index)
                )
                offset, length = target.span(index)
                for block in sorted(b for b in unread - read_back if b < count):
                    at = block * DIGEST_SIZE
                    size = min(step, length - block * step)
                    view = reader.read(offset + block * step, size, cached=True)
                    read += size
                    if block_digest(view) != entries[at : at + DIGEST_SIZE]:
                        bad.append(index)
                        break
        finally:
            reader.close()
            base_table.close()
        self.verified_bytes = read
        return tuple(bad)

    def _forget(self, bad: tuple[int, ...]) -> None:
        holes = [i for i in bad if self.target.chunks[i] is None]
        if holes:
            fd = os.open(self.image, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for index in holes:
                    punch_hole(fd, *self.target.span(index))
                    self._table().punch(index)
                os.fsync(fd)
                self._table().sync()
            finally:
                os.close(fd)
                self._table().close()
        # Blocks that rotted where they equal the base's would never be sent
        # again by blocks: these chunks come whole from now on, even after a restart.
        self.whole.update(bad)
        write_atomic(self.store.staging_dir / "whole", _journal(self.whole))
        self.landed.difference_update(bad)
        write_atomic(self.store.staging_dir / "landed", _journal(self.landed))
        for index in bad:
            self._read_back.pop(index, None)
        # A chunk that was a hole in the base and must be data is in the delta
        # already; a bad chunk outside it (the copied base was wrong) must be sent.
        extra = tuple(i for i in bad if i not in self.delta.send and self.target.chunks[i])
        if extra:
            self.delta = Delta(self.target, tuple(sorted({*self.delta.send, *extra})), ())
