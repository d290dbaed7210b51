"""The sending side: a node serves the point-in-time images it exports, chunk by chunk.

Invariants:

- Only other Ferry nodes may pull (mutual TLS, :func:`admitted_peers`); the
  controller and the node itself are refused with PERMISSION_DENIED.
- An export is immutable while served (a capture's snapshot, or an image the
  caller keeps quiescent): the sender does not hash what it sends, the
  receiver checks every chunk against the manifest it was given.
- A chunk is read only when asked for, and a reply never waits for more
  requests, so a stream holds at most what the receiver allowed in flight
  (batched within one request), never the image.
- Block digests come from the export's block table when it has one (a
  capture's), else from reading the chunk; either way the receiver checks
  them against the manifest's chunk digest.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.direct import ImageIO
from csi_driver.chunks.manifest import Manifest, block_count, block_digests, block_size, encode
from csi_driver.core.errors import FerryError, InternalError, InvalidArgument, NotFound
from csi_driver.gen.ferry.v1 import transfer_pb2, transfer_pb2_grpc
from csi_driver.metrics import TRANSFER_BYTES, TRANSFER_CHUNKS
from csi_driver.pki import Identity, Role
from csi_driver.rpc.errors import abort, rpc
from csi_driver.transfer.replies import Part, Reply, Run
from csi_driver.transport import Admission, AgentSecurity, Endpoint, start_server

log = logging.getLogger(__name__)

#: Small chunks travel several to a message, up to about this many bytes: a
#: gRPC message costs far more than hashing or writing a 64 KiB chunk.
BATCH_BYTES = 4 * 1024 * 1024


def admitted_peers(node_id: str) -> Admission:
    """Who may pull chunks from node ``node_id``: every other node of the cluster."""

    def admit(peer: Identity) -> bool:
        return peer.role is Role.NODE and peer != Identity(Role.NODE, node_id)

    return admit


@dataclass
class Export:
    """An image served under a transfer id, with how often each chunk was sent
    (whole, or its block table as the start of a block delta)."""

    transfer_id: str
    image: Path
    manifest: Manifest
    sent: collections.Counter[int] = field(default_factory=collections.Counter)
    #: The manifest's block table, if the capture kept one (else computed per chunk).
    blocks: Path | None = None
    #: ``blocks``, open while anything serves this export: the next capture of the
    #: volume may replace or remove the file while a stream still reads it.
    table: BlockTable | None = None
    #: Bytes of chunk data sent (whole chunks and block runs).
    sent_bytes: int = 0


class Exports:
    """The images this node serves, by transfer id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}

    def add(
        self, transfer_id: str, image: Path, manifest: Manifest, blocks: Path | None = None
    ) -> Export:
        """Serve ``image`` (which must hold ``manifest``'s bytes while served) as
        ``transfer_id``; ``blocks`` is its block table, when the capture kept one."""
        if not transfer_id:
            raise InvalidArgument("an export needs a transfer id")
        table = None
        if blocks is not None:
            table = BlockTable(blocks, manifest.size, manifest.chunk_size).open()
        export = Export(transfer_id, image, manifest, blocks=blocks, table=table)
        if table is not None:
            # Closed once no stream holds the export any more, not when it is retired.
            weakref.finalize(export, table.close)
        with self._lock:
            self._exports[transfer_id] = export
        log.info(
            "image exported",
            extra={"transfer": transfer_id, "image": str(image), "bytes": manifest.data_bytes},
        )
        return export

    def remove(self, transfer_id: str) -> None:
        with self._lock:
            self._exports.pop(transfer_id, None)

    def require(self, transfer_id: str) -> Export:
        with self._lock:
            export = self._exports.get(transfer_id)
        if export is None:
            raise NotFound(
                f"this node exports no transfer {transfer_id!r}; it finished or was never "
                "started: ask the sending node to export it again"
            )
        return export


class ChunkSourceServicer(transfer_pb2_grpc.ChunkSourceServicer):
    def __init__(self, exports: Exports) -> None:
        self._exports = exports

    @rpc(required=("transfer_id",))
    def GetManifest(self, request: Any, context: grpc.ServicerContext) -> Any:
        export = self._exports.require(request.transfer_id)
        return transfer_pb2.ManifestReply(manifest=encode(export.manifest))

    def PullChunks(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        # A stream cannot use @rpc (it wraps one request and one reply): errors
        # met while streaming are mapped here, through the same abort.
        reader: _Reader | None = None
        try:
            for request in request_iterator:
                if reader is None:
                    if not request.transfer_id:
                        raise InvalidArgument("the first chunk request must name transfer_id")
                    reader = _Reader(self._exports.require(request.transfer_id))
                yield from _batched(reader.answer(request))
        except FerryError as exc:
            log.info("chunk stream refused", extra={"error": exc.message})
            abort(context, exc)
        finally:
            if reader is not None:
                reader.close()


def _batched(parts: Iterator[Part]) -> Iterator[bytes]:
    """Parts gathered into encoded ``Chunks`` messages of about :data:`BATCH_BYTES`
    (the part that fills one is encoded before the reader reads again, so its
    bytes are copied once: into the message)."""
    reply = Reply()
    for part in parts:
        if reply.size + part.size >= BATCH_BYTES:
            reply.add(part, last=True)
            yield reply.encode()
            reply = Reply()
        else:
            reply.add(part)
    if reply:
        yield reply.encode()


class _Reader:
    """One stream's reads of one export: whole chunks, block tables and block runs."""

    def __init__(self, export: Export) -> None:
        self.export = export
        # Around the page cache where it can: the capture read these bytes
        # already, and caching them again for one send only costs (.direct).
        self._io = ImageIO(export.image, buffer_size=export.manifest.chunk_size)
        self._table = export.table

    def close(self) -> None:
        self._io.close()

    def answer(self, request: Any) -> Iterator[Part]:
        """The parts of the replies to ``request`` (data in this reader's buffer:
        each part is consumed before the next is read)."""
        for index in request.block_tables:
            self._check(index)
            yield Part(index, digests=self._block_digests(index))
        for index in request.indexes:
            self._check(index)
            if self.export.manifest.chunks[index] is None:
                raise InvalidArgument(
                    f"chunk {index} is a hole: holes are never sent, zero it instead"
                )
            data = self._read(*self.export.manifest.span(index))
            self.export.sent[index] += 1
            TRANSFER_CHUNKS.labels("sent", "sent").inc()
            yield Part(index, data=data)
        for run in request.runs:
            offset, length = self._run_span(run)
            # A delta's blocks were just read by the capture, through the cache.
            data = self._read(offset, length, cached=True)
            yield Part(run.index, data=data, run=Run(run.index, run.first, run.count))

    def _check(self, index: int) -> None:
        count = len(self.export.manifest.chunks)
        if not 0 <= index < count:
            raise InvalidArgument(
                f"chunk {index} is outside transfer {self.export.transfer_id}'s {count} chunks"
            )

    def _block_digests(self, index: int) -> bytes:
        self.export.sent[index] += 1
        TRANSFER_CHUNKS.labels("sent", "sent").inc()
        if self._table is not None:
            return self._table.read(index)
        manifest = self.export.manifest
        if manifest.chunks[index] is None:
            return block_digests(bytes(manifest.chunk_length(index)), manifest.chunk_size)
        return block_digests(self._read(*manifest.span(index), count=False), manifest.chunk_size)

    def _run_span(self, run: Any) -> tuple[int, int]:
        self._check(run.index)
        manifest = self.export.manifest
        offset, length = manifest.span(run.index)
        step = block_size(manifest.chunk_size)
        blocks = block_count(length, manifest.chunk_size)
        if run.count == 0 or run.first + run.count > blocks:
            raise InvalidArgument(
                f"blocks {run.first}..{run.first + run.count - 1} are not within chunk "
                f"{run.index}'s {blocks} blocks"
            )
        start = offset + run.first * step
        return start, min(run.count * step, offset + length - start)

    def _read(
        self, offset: int, length: int, *, count: bool = True, cached: bool = False
    ) -> memoryview:
        try:
            data = self._io.read(offset, length, cached=cached)
        except InternalError as exc:
            raise InternalError(
                f"export {self.export.transfer_id} changed while served ({exc.message}); "
                "export it again"
            ) from exc
        if count:
            self.export.sent_bytes += length
            TRANSFER_BYTES.labels("sent").inc(length)
        return data


def serve_chunks(
    endpoint: str, exports: Exports, security: AgentSecurity, node_id: str
) -> tuple[grpc.Server, Endpoint]:
    """Serve ``exports`` on ``endpoint`` to the other nodes; return the running server."""
    servicer = ChunkSourceServicer(exports)
    return start_server(
        endpoint,
        [lambda server: _register(servicer, server)],
        agents=(security, admitted_peers(node_id)),
    )


def _register(servicer: ChunkSourceServicer, server: grpc.Server) -> None:
    """The generated registration, but for PullChunks' replies: they come encoded
    (:mod:`.replies`), so they are sent as they are."""
    handlers = {
        "GetManifest": grpc.unary_unary_rpc_method_handler(
            servicer.GetManifest,
            request_deserializer=transfer_pb2.GetManifestRequest.FromString,
            response_serializer=transfer_pb2.ManifestReply.SerializeToString,
        ),
        "PullChunks": grpc.stream_stream_rpc_method_handler(
            servicer.PullChunks,
            request_deserializer=transfer_pb2.ChunkRequest.FromString,
            response_serializer=_as_sent,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("ferry.v1.ChunkSource", handlers),)
    )


def _as_sent(reply: bytes) -> bytes:
    return reply
