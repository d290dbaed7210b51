"""A backup's hashing and sealing in worker processes, over shared memory.

Why processes: with worker threads a backup gets about one core of two,
because the GIL is held for much of the per-block work (``cryptography``'s
AES-GCM keeps it, and each of a chunk's 64 SHA-256 calls hands it over and
back). In worker processes the hash, zstd and AES-GCM of different chunks
run in parallel; the driving process reads chunks, decides which blocks are
new and copies sealed records into packs, as with threads.

Invariants:

- Never ``fork``: a backup may run inside a gRPC service process (threads,
  locks held by them). Workers come from a ``forkserver``, started on first
  need and reused by every later backup of the process; :func:`shutdown`
  ends them (and the interpreter's exit does).
- Chunk bytes never go through a pipe. A run owns one shared memory segment
  holding a fixed ring of input slots (chunks read) and output slots (sealed
  records): memory is bounded by the ring, whatever the image's size. Only
  slot positions, block numbers, ids and the records' offsets cross.
- A run's segment is unlinked when the run ends, failed or not. Workers map
  segments by name and keep at most two mapped (an old one is dropped when a
  newer run's arrives).
- Workers end with the process that started them, even when it is killed
  (they watch it through a pidfd): nothing outlives a backup's process.
- A worker that dies breaks the pool: the run fails with
  :class:`BackupFailed` (nothing was committed: the manifest is put last),
  the pool is dropped and the next backup starts a new one.
- The workers call the same code as the thread path
  (:func:`~csi_driver.chunks.manifest.block_digests`,
  :meth:`BlockCodec.seal_many`), so the records are the same format.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import queue
import secrets
import select
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from typing import TypeVar

from csi_driver.backup.keys import BackupKey
from csi_driver.backup.packs import RECORD_OVERHEAD, BlockCodec
from csi_driver.backup.upload import ChunkRead, ChunkWorkers, Sealed, image_changed, runs
from csi_driver.chunks.manifest import BLOCK_SIZE, DIGEST_SIZE, block_digest, block_digests
from csi_driver.chunks.scan import read_exactly
from csi_driver.core.errors import BackupFailed

#: Segments are named with this and the creating process's id (tests look for leaks).
SEGMENT_PREFIX = "ferry-backup-"
#: Images smaller than this are sealed on threads: a pool's start (about a
#: second on a busy machine) would cost more than the second core saves.
PROCESS_MIN_BYTES = 256 * 1024 * 1024

_T = TypeVar("_T")


class _Pool:
    """The process's one pool of sealing workers, started lazily and reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._size = 0

    def get(self, workers: int) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None or self._size < workers:
                if self._executor is not None:
                    self._executor.shutdown(wait=False)
                context = multiprocessing.get_context("forkserver")
                # Workers forked from a server that imported this module start in
                # milliseconds, not a second of imports each.
                context.set_forkserver_preload([__name__])
                self._executor = ProcessPoolExecutor(
                    workers, mp_context=context, initializer=_watch, initargs=(os.getpid(),)
                )
                self._size = workers
            return self._executor

    def drop(self, executor: ProcessPoolExecutor) -> None:
        """Forget ``executor`` (broken): the next backup starts a new pool."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and diagnostics)."""
        with self._lock:
            executor = self._executor
        if executor is None:
            return []
        # The executor keeps its processes by pid; no public accessor exists.
        return list(getattr(executor, "_processes", None) or {})


_POOL = _Pool()


def shutdown() -> None:
    """End the sealing workers (a later backup starts them again)."""
    _POOL.shutdown()


def worker_pids() -> list[int]:
    return _POOL.pids()


def worker_cpu_s() -> float:
    """User and system seconds the live workers have run (``getrusage`` of this
    process does not count them: they are the forkserver's children)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in worker_pids():
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class _Ring:
    """One run's shared segment: ``inputs`` chunk slots, then ``outputs`` record slots."""

    def __init__(self, inputs: int, input_size: int, outputs: int, output_size: int) -> None:
        # SharedMemory names the segment and registers it with the resource
        # tracker (which unlinks it should this process die); the mapping is this
        # ring's own, so that a view an error path still holds only delays the unmap.
        self.segment = SharedMemory(
            f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}",
            create=True,
            size=inputs * input_size + outputs * output_size,
        )
        self.segment.close()
        self.name = self.segment.name
        self._map = _map(self.name)
        spans = [(n * input_size, input_size) for n in range(inputs)]
        base = inputs * input_size
        spans += [(base + n * output_size, output_size) for n in range(outputs)]
        with memoryview(self._map) as whole:
            self._views = [whole[at : at + size] for at, size in spans]
        # A slot is known by its view's identity: views are made once and kept.
        self._slots = {
            id(view): (at, size) for view, (at, size) in zip(self._views, spans, strict=True)
        }
        self._inputs: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._outputs: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for n, view in enumerate(self._views):
            (self._inputs if n < inputs else self._outputs).put(view)

    def take_input(self) -> memoryview:
        return self._inputs.get()

    def take_output(self) -> memoryview:
        return self._outputs.get()

    def span(self, view: memoryview) -> tuple[int, int]:
        """Offset and size of slot ``view`` in the segment."""
        return self._slots[id(view)]

    def give_input(self, view: memoryview) -> None:
        self._inputs.put(view)

    def give_output(self, view: memoryview) -> None:
        self._outputs.put(view)

    def close(self) -> None:
        """Unlink the segment; unmap it unless a view of it is still held (an error
        path's), in which case the mapping goes with the last view."""
        self.segment.unlink()
        for view in self._views:
            view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


class ProcessChunkWorkers(ChunkWorkers):
    """:class:`ChunkWorkers` whose hashing and sealing run in worker processes.

    The workers also read the image into the ring (through this process's open
    file, ``/proc/<pid>/fd/<fd>``: the same file whatever its path names
    meanwhile), so the kernel's copy from the page cache is spread over them
    too; threads of this process only wait on them, one per chunk in flight."""

    def __init__(
        self, key: BackupKey, fd: int, size: int, chunk_size: int, workers: int, batch: int
    ) -> None:
        inputs = batch + 2 * workers  # as the thread path's buffers: never waited for
        outputs = 2 * workers + 2
        super().__init__(key, fd, size, chunk_size, workers, batch, threads=inputs + outputs)
        self._executor = _POOL.get(workers)
        self._secret = key.secret
        record_room = chunk_size + (chunk_size // BLOCK_SIZE + 1) * RECORD_OVERHEAD
        self._ring = _Ring(inputs, chunk_size, outputs, record_room)
        self._image = f"/proc/{os.getpid()}/fd/{fd}"

    def _call(self, task: Callable[..., _T], *args: object) -> _T:
        try:
            return self._executor.submit(task, *args).result()
        except BrokenProcessPool:
            _POOL.drop(self._executor)
            raise BackupFailed(
                "a backup worker process died (killed, or out of memory?); nothing of "
                "this backup was committed: retry it"
            ) from None

    def _read(self, index: int) -> ChunkRead:
        view = self._ring.take_input()
        try:
            at, _ = self._ring.span(view)
            length = self._length(index)
            blocks = self._call(
                _read_and_hash,
                self._ring.name,
                self._image,
                at,
                index * self._chunk_size,
                length,
                self._chunk_size,
            )
            return ChunkRead(index, view, view[:length], blocks)
        except BaseException:
            self._ring.give_input(view)
            raise

    def release(self, read: ChunkRead) -> None:
        assert isinstance(read.buffer, memoryview)
        self._ring.give_input(read.buffer)

    def give_output(self, out: bytearray | memoryview) -> None:
        assert isinstance(out, memoryview)
        self._ring.give_output(out)

    def _sealed(
        self,
        index: int,
        bytes_read: int,
        source: memoryview,
        wanted: list[tuple[int, bytes]],
        digests: bytes | None,
    ) -> Sealed:
        """With ``digests``, the workers read blocks ``wanted`` first and check them."""
        out = self._ring.take_output()
        try:
            at, _ = self._ring.span(source)
            out_at, out_size = self._ring.span(out)
            found = self._call(
                _seal,
                self._secret,
                self._ring.name,
                self._image if digests is not None else None,
                at,
                index * self._chunk_size,
                self._length(index),
                wanted,
                out_at,
                out_size,
                digests,
            )
            if isinstance(found, int):
                raise image_changed(index)
            return Sealed(index, bytes_read, out, found)
        except BaseException:
            self._ring.give_output(out)
            raise

    def _seal(self, read: ChunkRead, wanted: list[tuple[int, bytes]]) -> Sealed:
        try:
            assert isinstance(read.buffer, memoryview)
            return self._sealed(read.index, 0, read.buffer, wanted, None)
        finally:
            self.release(read)

    def _read_and_seal(self, index: int, wanted: list[tuple[int, bytes]], blocks: bytes) -> Sealed:
        view = self._ring.take_input()
        try:
            return self._sealed(index, self.wanted_bytes(index, wanted), view, wanted, blocks)
        finally:
            self._ring.give_input(view)

    def close(self) -> None:
        super().close()
        self._ring.close()


# What follows runs in the worker processes.


def _watch(parent: int) -> None:
    """End this worker when ``parent`` ends. A killed parent closes no pipe the
    workers would notice (each holds both ends of the pool's queues), and the
    forkserver is their parent, not the backup's process."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(0)

    def wait() -> None:
        select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=wait, name="backup-parent-watch", daemon=True).start()


_mapped: OrderedDict[str, mmap.mmap] = OrderedDict()
_images: dict[str, int] = {}  # the image each mapped run reads, opened once
_codec: tuple[bytes, BlockCodec] | None = None


def _segment(name: str) -> memoryview:
    """A view of segment ``name``, mapped once per worker. Mapped from /dev/shm
    directly (as the ring maps it): attaching with SharedMemory would register it with the
    resource tracker the workers share with the backup's process, and a
    worker's exit would then unregister (or unlink) the run's segment."""
    found = _mapped.get(name)
    if found is None:
        while len(_mapped) >= 2:
            gone, old = _mapped.popitem(last=False)
            with contextlib.suppress(BufferError):  # a view outlived its task
                old.close()
            if gone in _images:
                os.close(_images.pop(gone))
        found = _mapped[name] = _map(name)
    return memoryview(found)


def _map(name: str) -> mmap.mmap:
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CLOEXEC)
    try:
        # Populated up front: one fault per 4 KiB page, in every process and every
        # run, cost more than the batch.
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)


def _image_fd(name: str, image: str) -> int:
    fd = _images.get(name)
    if fd is None:
        fd = _images[name] = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    return fd


def _read_and_hash(
    name: str, image: str, at: int, start: int, length: int, chunk_size: int
) -> bytes:
    """Read ``length`` bytes of ``image`` at ``start`` into the slot at ``at``; their
    block digests."""
    with _segment(name) as view:
        data = read_exactly(_image_fd(name, image), view[at:], start, length)
        return block_digests(data, chunk_size)


def _seal(
    secret: bytes,
    name: str,
    image: str | None,
    at: int,
    start: int,
    length: int,
    wanted: list[tuple[int, bytes]],
    out_at: int,
    out_size: int,
    digests: bytes | None,
) -> list[tuple[bytes, int, int, int]] | int:
    """Seal blocks ``wanted`` of the chunk at ``at`` into the slot at ``out_at``. With
    ``image``, those blocks are first read from it (the chunk is at ``start``
    there) and each checked against its digest in ``digests``: the number of
    the first block that differs is returned instead."""
    global _codec
    if _codec is None or _codec[0] != secret:
        _codec = (secret, BlockCodec(BackupKey(secret)))
    with _segment(name) as view:
        chunk = view[at : at + length]
        if image is not None:
            fd = _image_fd(name, image)
            for run in runs(sorted(block for block, _ in wanted)):
                offset = run[0] * BLOCK_SIZE
                end = min((run[-1] + 1) * BLOCK_SIZE, length)
                read_exactly(fd, chunk[offset:], start + offset, end - offset)
        blocks = []
        for block, block_id in wanted:
            data = chunk[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE]
            if (
                digests is not None
                and block_digest(data) != digests[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE]
            ):
                return block
            blocks.append((block_id, data))
        return _codec[1].seal_many(blocks, view[out_at : out_at + out_size])
