"""A replica's generations: deltas applied into a new image, committed only verified.

Layout under a replica's root::

    gen-<n>/image       committed generation n (the newest is current)
    gen-<n>/manifest    its manifest, verified against the image before commit
    staging/            the generation being built, if any:
      image             the previous generation's copy (reflink where possible)
                        with the delta written into it
      manifest          the target manifest (what the image must become)
      base              the generation it was copied from ("0": none)
      copy              how: "reflink" (blocks shared with the base) or "bytes"
      landed            journal of chunk indexes durably written (u32 each)

Invariants:

- A committed generation is never written again. The current one stays
  readable, unchanged, while the next is staged, and until the commit.
- The commit point is one ``rename(staging, gen-<n+1>)`` followed by an
  fsync of the root, done only after the whole staged image was read back
  and matched the target manifest. A crash before it leaves the current
  generation as it was; a crash after it leaves the new one committed.
- A chunk index enters ``landed`` only after its bytes were checked against
  the target digest and the image was fdatasync'ed, so a resumed staging
  never asks again for a chunk that landed, and never trusts one that did not.
- Verification reads every chunk that may differ from a verified generation:
  all of them, unless the staged image is a reflink of the base, in which
  case chunks whose extents are still the base's hold the base's verified
  bytes (see :mod:`.extents`) and only the others are read again.
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

from csi_driver.chunks.durable import write_atomic
from csi_driver.chunks.extents import changed_ranges, extent_map, reflink
from csi_driver.chunks.manifest import Delta, Manifest, chunk_digest, decode, delta, encode
from csi_driver.chunks.scan import chunks_touching, data_ranges, scan_image
from csi_driver.core.errors import DataLoss, FailedPrecondition, ResourceExhausted
from csi_driver.node.pool import fsync_dir, punch_hole

log = logging.getLogger(__name__)

_GENERATION = re.compile(r"^gen-(\d{8})$")
_INDEX = struct.Struct(">I")


@dataclass(frozen=True)
class Generation:
    number: int
    image: Path
    manifest: Manifest


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
        numbers = self._numbers()
        if not numbers:
            return None
        number = numbers[-1]
        directory = self._dir(number)
        manifest = self._manifests.get(number)
        if manifest is None:
            manifest = decode((directory / "manifest").read_bytes())
            self._manifests = {number: manifest}
        return Generation(number, directory / "image", manifest)

    def adopt(self, image: Path, manifest: Manifest) -> Generation:
        """Commit ``image`` (moved here by rename, on this filesystem) as the first
        generation; ``manifest`` must be its manifest, read while it was quiescent.

        A demoted primary keeps its image as its replica's base, so the next
        sync from the new primary sends only what differs.
        """
        if self._numbers():
            raise FailedPrecondition(f"replica {self.root} already has generations")
        building = self.root / ".adopt.tmp"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(mode=0o700)
        os.rename(image, building / "image")
        write_atomic(building / "manifest", encode(manifest))
        os.rename(building, self._dir(1))
        fsync_dir(self.root)
        self._manifests = {1: manifest}
        log.info("generation adopted", extra={"replica": str(self.root)})
        return Generation(1, self._dir(1) / "image", manifest)

    def stage(self, target: Manifest) -> Staging:
        """The staging of the generation holding ``target``: resumed when one for the
        same target and base exists, else started afresh from the current generation."""
        base = self.current()
        base_number = base.number if base else 0
        staging = self.staging_dir
        if _same_staging(staging, target, base_number):
            landed = _read_journal(staging / "landed")
            log.info(
                "staging resumed",
                extra={"replica": str(self.root), "landed_chunks": len(landed)},
            )
            plan = delta(target, base.manifest if base else None)
            return Staging(self, target, plan, base_number, landed)
        shutil.rmtree(staging, ignore_errors=True)
        building = self.root / ".staging.tmp"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(mode=0o700)
        plan = delta(target, base.manifest if base else None)
        copy = _prepare_image(building / "image", base, plan)
        (building / "copy").write_text(copy)
        (building / "landed").touch()
        (building / "base").write_text(str(base_number))
        write_atomic(building / "manifest", encode(target))
        os.rename(building, staging)
        fsync_dir(self.root)
        return Staging(self, target, plan, base_number, set())

    def _commit(self, staging: Staging) -> Generation:
        number = max(self._numbers(), default=0) + 1
        os.rename(self.staging_dir, self._dir(number))
        fsync_dir(self.root)  # the commit point
        self._manifests = {number: staging.target}
        for old in self._numbers():
            if old < number:
                shutil.rmtree(self._dir(old), ignore_errors=True)
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
        )
    except FileNotFoundError:
        return False


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
            reflink(base.image, path)
            copy = "reflink"
        except FailedPrecondition:
            sparse_copy(base.image, path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, plan.target.size)
        for index in plan.punch:
            punch_hole(fd, *plan.target.span(index))
        os.fsync(fd)
    finally:
        os.close(fd)
    return copy


def sparse_copy(source: Path, destination: Path) -> None:
    """Copy only the ranges of ``source`` that hold data; the rest stays holes.

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


@dataclass
class Staging:
    """A generation being built: write the chunks :meth:`missing` names, then commit."""

    store: GenerationStore
    target: Manifest
    delta: Delta
    base_number: int
    landed: set[int]
    verified_bytes: int = 0  # what the last commit read back to verify
    _pending: list[int] = field(default_factory=list)
    _fd: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sync_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def image(self) -> Path:
        return self.store.staging_dir / "image"

    def missing(self) -> list[int]:
        """Chunks still to write, in order: the delta's, less those landed."""
        with self._lock:
            return [i for i in self.delta.send if i not in self.landed]

    def check(self, index: int, data: bytes) -> None:
        """DataLoss unless ``data`` is exactly chunk ``index`` of the target."""
        wanted = self.target.chunks[index] if 0 <= index < len(self.target.chunks) else None
        if wanted is None:
            raise DataLoss(f"chunk {index} is not a data chunk of the target image", (index,))
        if len(data) != self.target.chunk_length(index) or chunk_digest(data) != wanted:
            raise DataLoss(
                f"chunk {index} does not match its digest in the manifest; it was not "
                "written and will be asked for again",
                (index,),
            )

    def write(self, index: int, data: bytes) -> None:
        """Write chunk ``index`` after checking it; durable at the next :meth:`sync`."""
        self.check(index, data)
        if self._fd is None:
            self._fd = os.open(self.image, os.O_WRONLY | os.O_CLOEXEC)
        offset = self.target.span(index)[0]
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"the filesystem holding replica {self.store.root} is full; free space "
                    "on it (what landed is kept: the transfer resumes)"
                ) from exc
            raise
        with self._lock:
            self._pending.append(index)

    def sync(self) -> list[int]:
        """Make the chunks written so far durable, then record them as landed; return
        them. Safe to call from another thread while :meth:`write` goes on: a chunk
        written after the call began waits for the next one."""
        with self._sync_lock:
            with self._lock:
                durable, self._pending = self._pending, []
            if not durable:
                return []
            if self._fd is not None:
                os.fdatasync(self._fd)
            with open(self.store.staging_dir / "landed", "ab") as journal:
                journal.write(b"".join(_INDEX.pack(i) for i in durable))
                journal.flush()
                os.fsync(journal.fileno())
            with self._lock:
                self.landed.update(durable)
            return durable

    def close(self) -> None:
        self.sync()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def commit(self) -> Generation:
        """Verify the whole staged image against the target, then commit it."""
        self.close()
        if self.missing():
            raise FailedPrecondition(
                f"{len(self.missing())} chunks have not landed yet; fetch them before commit"
            )
        found = self._verify()
        if found != self.target:
            bad = tuple(
                i
                for i, (a, b) in enumerate(zip(found.chunks, self.target.chunks, strict=True))
                if a != b
            )
            self._forget(bad)
            raise DataLoss(
                f"the staged image differs from its manifest in chunks {list(bad[:8])}; "
                "nothing was committed, they will be fetched again",
                bad,
            )
        return self.store._commit(self)

    def _verify(self) -> Manifest:
        """The staged image's manifest, read back from disk (see the module docstring)."""
        base = self.store.current()
        if (base.number if base else 0) != self.base_number:
            raise FailedPrecondition(
                f"replica {self.store.root} was committed to by someone else while this "
                "staging was built; stage again"
            )
        chunk_size = self.target.chunk_size
        copy = (self.store.staging_dir / "copy").read_text()
        scan = None
        if (
            base is not None
            and copy == "reflink"
            and base.manifest.size == self.target.size
            and base.manifest.chunk_size == chunk_size
        ):
            try:
                ranges = changed_ranges(
                    extent_map(base.image), extent_map(self.image), self.target.size
                )
                changed = chunks_touching(ranges, chunk_size)
                scan = scan_image(self.image, chunk_size, previous=base.manifest, changed=changed)
            except FailedPrecondition:
                scan = None  # no extent map here: read it all
        if scan is None:
            scan = scan_image(self.image, chunk_size)
        self.verified_bytes = scan.bytes_read
        return scan.manifest

    def _forget(self, bad: tuple[int, ...]) -> None:
        holes = [i for i in bad if self.target.chunks[i] is None]
        if holes:
            fd = os.open(self.image, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for index in holes:
                    punch_hole(fd, *self.target.span(index))
                os.fsync(fd)
            finally:
                os.close(fd)
        self.landed.difference_update(bad)
        journal = b"".join(_INDEX.pack(i) for i in sorted(self.landed))
        write_atomic(self.store.staging_dir / "landed", journal)
        # A chunk that was a hole in the base and must be data is in the delta
        # already; a bad chunk outside it (the copied base was wrong) must be sent.
        extra = tuple(i for i in bad if i not in self.delta.send and self.target.chunks[i])
        if extra:
            self.delta = Delta(self.target, tuple(sorted({*self.delta.send, *extra})), ())
