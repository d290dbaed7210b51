"""The receiving side: pull the chunks a replica lacks into a new generation.

Invariants:

- Flow control: at most ``window_bytes`` of chunks are asked for and not yet
  landed at any time (one chunk when a chunk is larger), so memory stays flat
  whatever the image's size.
- Every chunk is checked against the manifest's digest before it counts as
  landed: a whole chunk as it is read back from disk after it was written
  (:meth:`Staging.place`, checked by :meth:`Staging.sync`: its bytes are
  hashed once, from what the disk holds), and the stream ends only once the
  last of them passed; a bad one is asked for again, up to
  ``chunk_attempts`` times, then the pull fails with DATA_LOSS and nothing
  is committed. A chunk the replica holds older data for is fetched by
  blocks: its block digests first, checked against the chunk digest, then
  only the blocks that differ, each checked against its digest
  (:meth:`Staging.plan_blocks`); a chunk whose blocks fail is asked for
  again whole.
- What landed is durable (:meth:`Staging.sync`, every :data:`SYNC_SECONDS`
  and when a stream ends) before the stream is given up
  or retried, so a dropped connection or a restarted receiver resumes
  without asking again for any chunk that landed.
- The replica's new generation is committed only after the whole image
  verifies against the manifest (:meth:`Staging.commit`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from csi_driver.chunks.generations import BlockPatch, Generation, GenerationStore, Staging
from csi_driver.chunks.manifest import (
    DIGEST_SIZE,
    MAX_CHUNK_SIZE,
    Manifest,
    MiB,
    block_count,
    block_size,
    decode,
)
from csi_driver.core.errors import DataLoss, FerryError, InternalError, Unavailable
from csi_driver.gen.ferry.v1 import transfer_pb2, transfer_pb2_grpc
from csi_driver.metrics import TRANSFER_BYTES, TRANSFER_CHUNKS
from csi_driver.rpc.errors import CODES
from csi_driver.transfer.progress import Progress, ProgressMeter

log = logging.getLogger(__name__)

DEFAULT_WINDOW_BYTES = 16 * MiB
#: Make written chunks durable (and landed) this often, in the background: a
#: crash costs at most this much receiving again.
SYNC_SECONDS = 0.5
#: Channel arguments: one chunk per message (a dead peer is noticed by the
#: keepalive every channel of transport.open_channel has).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_CHUNK_SIZE + MiB),
)
#: Codes after which the same pull, on a new connection, can succeed.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
)


@dataclass
class Attempt:
    """One connection's worth of a pull: what was asked for and what landed
    (durably: a chunk counts as landed once synced)."""

    requested: list[int] = field(default_factory=list)
    landed: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    error: str = ""
    #: Bytes that arrived: chunk data, block runs and block digests.
    bytes_received: int = 0


@dataclass(frozen=True)
class PullResult:
    generation: Generation
    progress: Progress
    landed_before: int  # chunks that had landed in an earlier run of this pull
    attempts: tuple[Attempt, ...]
    #: Seconds spent per phase: manifest, stage, stream (until every chunk landed,
    #: durably), verify_commit (the last verification and the commit).
    phases: tuple[tuple[str, float], ...] = ()

    @property
    def chunks_received(self) -> int:
        return sum(len(a.landed) for a in self.attempts)

    @property
    def chunks_rejected(self) -> int:
        return sum(len(a.rejected) for a in self.attempts)

    @property
    def bytes_received(self) -> int:
        """What crossed the wire (less than the chunks' size when sent by blocks)."""
        return sum(a.bytes_received for a in self.attempts)


def _domain_error(exc: grpc.RpcError, what: str) -> FerryError:
    """The domain error for a status the sender answered with."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    for kind, mapped in CODES:
        if mapped is code:
            return kind(f"{what}: {details}")
    if code in RETRYABLE:
        return Unavailable(f"{what}: {details}; the sending node is unreachable, retry")
    return InternalError(f"{what}: {code.name}: {details}")


class Receiver:
    """Pulls transfers from one sending node over ``channel_factory``'s channels.

    ``max_rate_bytes_per_s`` caps the receive rate (replication should not
    starve the volume's own I/O); ``on_landed`` hears of every chunk once it
    is durable.
    """

    def __init__(
        self,
        channel_factory: Callable[[], grpc.Channel],
        *,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        connection_attempts: int = 5,
        chunk_attempts: int = 3,
        backoff_s: float = 0.5,
        max_rate_bytes_per_s: float | None = None,
        on_landed: Callable[[int, Progress], None] | None = None,
    ) -> None:
        self._channel_factory = channel_factory
        self._window = window_bytes
        self._connection_attempts = connection_attempts
        self._chunk_attempts = chunk_attempts
        self._backoff = backoff_s
        self._on_landed = on_landed
        self._max_rate = max_rate_bytes_per_s

    def manifest(self, transfer_id: str, channel: grpc.Channel | None = None) -> Manifest:
        """The manifest exported as ``transfer_id``, asked on ``channel`` (else on a
        channel of its own)."""
        with contextlib.ExitStack() as stack:
            if channel is None:
                channel = stack.enter_context(self._channel_factory())
            stub = transfer_pb2_grpc.ChunkSourceStub(channel)
            request = transfer_pb2.GetManifestRequest(transfer_id=transfer_id)
            try:
                reply = stub.GetManifest(request, timeout=30)
            except grpc.RpcError as exc:
                raise _domain_error(exc, f"cannot get transfer {transfer_id}'s manifest") from exc
        return decode(reply.manifest)

    def pull(self, transfer_id: str, store: GenerationStore) -> PullResult:
        """Bring ``store`` to the image exported as ``transfer_id``; return the new
        generation (or the current one, when it already holds that image)."""
        # One connection (and TLS handshake) for the manifest and the first stream.
        with self._channel_factory() as channel:
            return self._pull(transfer_id, store, channel)

    def _pull(self, transfer_id: str, store: GenerationStore, channel: grpc.Channel) -> PullResult:
        started = time.monotonic()
        target = self.manifest(transfer_id, channel)
        current = store.current()
        if current is not None and current.manifest == target:
            meter = ProgressMeter(transfer_id, 0)
            return PullResult(current, meter.finish(), 0, ())
        fetched = time.monotonic()
        staging = store.stage(target)
        staged = time.monotonic()
        landed_before = len(staging.landed & set(staging.delta.send))
        done = sum(target.chunk_length(i) for i in staging.landed if i in staging.delta.send)
        meter = ProgressMeter(transfer_id, staging.delta.send_bytes, done)
        attempts: list[Attempt] = []
        failures = collections.Counter[int]()
        log.info(
            "pull started",
            extra={
                "transfer": transfer_id,
                "chunks": len(staging.delta.send),
                "landed_before": landed_before,
                "bytes": staging.delta.send_bytes,
            },
        )
        streamed: list[float] = []
        try:
            generation = self._complete(
                transfer_id, staging, meter, attempts, failures, streamed, channel
            )
        finally:
            staging.close()
        progress = meter.finish()
        ended = time.monotonic()
        streamed_at = streamed[-1] if streamed else ended
        phases = (
            ("manifest", round(fetched - started, 3)),
            ("stage", round(staged - fetched, 3)),
            ("stream", round(streamed_at - staged, 3)),
            ("verify_commit", round(ended - streamed_at, 3)),
        )
        return PullResult(generation, progress, landed_before, tuple(attempts), phases)

    def _complete(
        self,
        transfer_id: str,
        staging: Staging,
        meter: ProgressMeter,
        attempts: list[Attempt],
        failures: collections.Counter[int],
        streamed: list[float],
        channel: grpc.Channel,
    ) -> Generation:
        """Stream until nothing is missing, reconnecting as needed (the first
        stream goes on ``channel``, a retry on a new one), then commit;
        ``streamed`` gets the time each round of streaming ended."""
        connection_failures = 0
        first: grpc.Channel | None = channel
        while True:
            while staging.missing():
                attempt = Attempt()
                attempts.append(attempt)
                try:
                    self._stream(transfer_id, staging, meter, attempt, failures, first)
                except grpc.RpcError as exc:
                    first = None
                    code = exc.code() if isinstance(exc, grpc.Call) else None
                    attempt.error = code.name if code else str(exc)
                    # A link that keeps delivering between drops is worth keeping at.
                    connection_failures = 1 if attempt.landed else connection_failures + 1
                    if code not in RETRYABLE or connection_failures >= self._connection_attempts:
                        raise _domain_error(exc, f"transfer {transfer_id} failed") from exc
                    log.warning(
                        "chunk stream lost; resuming",
                        extra={"transfer": transfer_id, "code": attempt.error},
                    )
                    time.sleep(self._backoff * connection_failures)
            streamed.append(time.monotonic())
            try:
                return staging.commit()
            except DataLoss as exc:
                # Bytes that passed on arrival no longer verify: they were dropped
                # from the landed set, so the next round fetches them again.
                for index in exc.chunks:
                    failures[index] += 1
                    if failures[index] >= self._chunk_attempts:
                        raise

    def _stream(
        self,
        transfer_id: str,
        staging: Staging,
        meter: ProgressMeter,
        attempt: Attempt,
        failures: collections.Counter[int],
        channel: grpc.Channel | None = None,
    ) -> None:
        stream = _Stream(transfer_id, staging, self._window, attempt)
        # What the last stream's final sync rejected is missing, so asked for
        # already: counted against its attempts here.
        self._retry_rejected(stream, attempt, failures, meter)
        asks: queue.Queue[Any] = queue.Queue()
        stop_syncing = threading.Event()

        def sync() -> None:
            durable = staging.sync()
            for index in durable:
                attempt.landed.append(index)
                if self._on_landed is not None:
                    self._on_landed(index, meter.value())
            # Read back what landed now, while the stream flows, not after it.
            staging.read_back(durable)

        def sync_periodically() -> None:
            # fdatasync and reading back off the receiving thread: disks are slow
            # to flush, and the stream keeps flowing meanwhile. The first at once:
            # a new staging becomes durable while the first replies are on their way.
            sync()
            while not stop_syncing.wait(SYNC_SECONDS):
                sync()

        def requests() -> Iterator[Any]:
            while (ask := asks.get()) is not None:
                yield ask

        asks.put(stream.grant(first=True))
        syncer = threading.Thread(target=sync_periodically, name="staging-sync", daemon=True)
        syncer.start()
        with contextlib.ExitStack() as stack:
            if channel is None:
                channel = stack.enter_context(self._channel_factory())
            responses = transfer_pb2_grpc.ChunkSourceStub(channel).PullChunks(requests())
            try:
                for message in responses:
                    for chunk in message.chunks:
                        # Each read of a bytes field copies it: read each once.
                        data: bytes = chunk.data
                        digests: bytes = chunk.block_digests
                        attempt.bytes_received += len(data) + len(digests)
                        TRANSFER_BYTES.labels("received").inc(len(data))
                        try:
                            done = stream.land(chunk, data, digests)
                        except DataLoss as exc:
                            self._reject(exc, stream, attempt, failures, meter)
                            continue
                        if done is not None:
                            TRANSFER_CHUNKS.labels("received", "landed").inc()
                            meter.add(staging.target.chunk_length(done))
                            self._throttle(meter)
                    self._retry_rejected(stream, attempt, failures, meter)
                    if stream.finished():
                        # Whole chunks are checked as they are read back from disk:
                        # the stream ends once the last of them passed.
                        sync()
                        self._retry_rejected(stream, attempt, failures, meter)
                        if stream.finished():
                            break
                    if (ask := stream.grant()) is not None:
                        asks.put(ask)
            finally:
                asks.put(None)
                responses.cancel()
                stop_syncing.set()
                syncer.join()
                sync()

    def _reject(
        self,
        exc: DataLoss,
        stream: _Stream,
        attempt: Attempt,
        failures: collections.Counter[int],
        meter: ProgressMeter,
    ) -> None:
        """A chunk that arrived bad: ask for it again, whole, or give up on it.
        A sender that sends what was never asked for is not retried."""
        if not exc.chunks:
            raise exc
        for index in exc.chunks:
            attempt.rejected.append(index)
            failures[index] += 1
            TRANSFER_CHUNKS.labels("received", "rejected").inc()
            log.warning(
                "chunk rejected: digest mismatch",
                extra={"transfer": meter.transfer_id, "chunk": index},
            )
            if failures[index] >= self._chunk_attempts:
                raise exc
            stream.again(index)

    def _retry_rejected(
        self,
        stream: _Stream,
        attempt: Attempt,
        failures: collections.Counter[int],
        meter: ProgressMeter,
    ) -> None:
        """Ask again for the whole chunks that read back unlike their digests."""
        rejected = stream.staging.take_rejected()
        if rejected:
            named = ", ".join(f"chunk {i}" for i in sorted(rejected)[:8])
            exc = DataLoss(
                f"{named}: read back unlike the manifest's digests; not committed, and "
                "asked for again up to the attempts allowed",
                tuple(rejected),
            )
            self._reject(exc, stream, attempt, failures, meter)

    def _throttle(self, meter: ProgressMeter) -> None:
        if self._max_rate is None:
            return
        progress = meter.value()
        ahead = progress.bytes_this_session / self._max_rate - progress.elapsed_s
        if ahead > 0:
            time.sleep(ahead)


#: What a stream asks for: ("whole", chunk), ("table", chunk) or ("run", chunk, first, count).
Ask = tuple[str, int, int, int]


class _Stream:
    """One connection's bookkeeping: what to ask for next, what is in flight (at
    most ``window`` bytes), and the chunks being written by blocks."""

    def __init__(self, transfer_id: str, staging: Staging, window: int, attempt: Attempt) -> None:
        self.transfer_id = transfer_id
        self.staging = staging
        self.window = window
        self.attempt = attempt
        self.pending = collections.deque[Ask](
            ("table" if staging.by_blocks(i) else "whole", i, 0, 0) for i in staging.missing()
        )
        self.in_flight: dict[tuple[str, int, int], int] = {}
        self.patches: dict[int, tuple[BlockPatch, set[int]]] = {}
        self._step = block_size(staging.target.chunk_size)

    def _cost(self, ask: Ask) -> int:
        kind, index, first, count = ask
        target = self.staging.target
        length = target.chunk_length(index)
        if kind == "whole":
            return length
        if kind == "table":
            return block_count(length, target.chunk_size) * DIGEST_SIZE
        return min(count * self._step, length - first * self._step)

    def grant(self, first: bool = False) -> Any:
        """The next request: as much as the window allows (one ask at least, when
        nothing is in flight); None when there is nothing to ask."""
        request = transfer_pb2.ChunkRequest(transfer_id=self.transfer_id if first else "")
        budget = self.window - sum(self.in_flight.values())
        asked = False
        while self.pending:
            cost = self._cost(self.pending[0])
            if cost > budget and (self.in_flight or asked):
                break
            kind, index, start, count = self.pending.popleft()
            self.in_flight[(kind, index, start)] = cost
            budget -= cost
            asked = True
            if kind == "whole":
                request.indexes.append(index)
                self.attempt.requested.append(index)
            elif kind == "table":
                request.block_tables.append(index)
                self.attempt.requested.append(index)
            else:
                request.runs.add(index=index, first=start, count=count)
        return request if asked or first else None

    def finished(self) -> bool:
        return not self.pending and not self.in_flight

    def land(self, chunk: Any, data: bytes, digests: bytes) -> int | None:
        """Check and write one arrived part of a reply (``chunk``, whose ``data`` and
        ``block_digests`` are given); return the chunk it completed."""
        index: int = chunk.index
        key: tuple[str, int, int]
        if digests:
            key = ("table", index, 0)
        elif chunk.HasField("run"):
            key = ("run", index, int(chunk.run.first))
        else:
            key = ("whole", index, 0)
        if self.in_flight.pop(key, None) is None:
            raise DataLoss(f"the sender sent chunk {index}, never asked for")
        kind, _, first = key
        if kind == "whole":
            self.staging.place(index, data)
            return index
        if kind == "table":
            patch = self.staging.plan_blocks(index, digests)
            if not patch.runs:
                self.staging.finish(patch)
                return index
            self.patches[index] = (patch, {start for start, _ in patch.runs})
            self.pending.extendleft(("run", index, s, n) for s, n in reversed(patch.runs))
            return None
        entry = self.patches.get(index)
        if entry is None:
            return None  # a run of a chunk rejected meanwhile, asked for again whole
        patch, waiting = entry
        self.staging.write_run(patch, first, data)
        waiting.discard(first)
        if waiting:
            return None
        del self.patches[index]
        self.staging.finish(patch)
        return index

    def again(self, index: int) -> None:
        """Ask for chunk ``index`` again, whole (its runs still in flight are dropped)."""
        self.patches.pop(index, None)
        self.staging.whole.add(index)
        ask: Ask = ("whole", index, 0, 0)
        if ask not in self.pending and ("whole", index, 0) not in self.in_flight:
            self.pending.appendleft(ask)
