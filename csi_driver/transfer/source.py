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
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi_driver.chunks.manifest import Manifest, encode
from csi_driver.chunks.scan import read_exactly
from csi_driver.core.errors import FerryError, InvalidArgument, NotFound
from csi_driver.gen.ferry.v1 import transfer_pb2, transfer_pb2_grpc
from csi_driver.metrics import TRANSFER_BYTES, TRANSFER_CHUNKS
from csi_driver.pki import Identity, Role
from csi_driver.rpc.errors import abort, rpc
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
    """An image served under a transfer id, with how often each chunk was sent."""

    transfer_id: str
    image: Path
    manifest: Manifest
    sent: collections.Counter[int] = field(default_factory=collections.Counter)


class Exports:
    """The images this node serves, by transfer id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}

    def add(self, transfer_id: str, image: Path, manifest: Manifest) -> Export:
        if not transfer_id:
            raise InvalidArgument("an export needs a transfer id")
        export = Export(transfer_id, image, manifest)
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
        fd: int | None = None
        try:
            export: Export | None = None
            buffer = bytearray()
            for request in request_iterator:
                if export is None:
                    if not request.transfer_id:
                        raise InvalidArgument("the first chunk request must name transfer_id")
                    export = self._exports.require(request.transfer_id)
                    fd = os.open(export.image, os.O_RDONLY | os.O_CLOEXEC)
                    buffer = bytearray(export.manifest.chunk_size)
                batch: list[Any] = []
                size = 0
                for index in request.indexes:
                    data = _read_chunk(export, fd, buffer, index)
                    export.sent[index] += 1
                    TRANSFER_BYTES.labels("sent").inc(len(data))
                    TRANSFER_CHUNKS.labels("sent", "sent").inc()
                    batch.append(transfer_pb2.Chunk(index=index, data=data))
                    size += len(data)
                    if size >= BATCH_BYTES:
                        yield transfer_pb2.Chunks(chunks=batch)
                        batch, size = [], 0
                if batch:
                    yield transfer_pb2.Chunks(chunks=batch)
        except FerryError as exc:
            log.info("chunk stream refused", extra={"error": exc.message})
            abort(context, exc)
        finally:
            if fd is not None:
                os.close(fd)


def _read_chunk(export: Export, fd: int | None, buffer: bytearray, index: int) -> bytes:
    manifest = export.manifest
    if not 0 <= index < len(manifest.chunks):
        raise InvalidArgument(
            f"chunk {index} is outside transfer {export.transfer_id}'s "
            f"{len(manifest.chunks)} chunks"
        )
    if manifest.chunks[index] is None:
        raise InvalidArgument(f"chunk {index} is a hole: holes are never sent, zero it instead")
    assert fd is not None
    offset, length = manifest.span(index)
    return bytes(read_exactly(fd, buffer, offset, length))


def serve_chunks(
    endpoint: str, exports: Exports, security: AgentSecurity, node_id: str
) -> tuple[grpc.Server, Endpoint]:
    """Serve ``exports`` on ``endpoint`` to the other nodes; return the running server."""
    servicer = ChunkSourceServicer(exports)
    return start_server(
        endpoint,
        [lambda server: transfer_pb2_grpc.add_ChunkSourceServicer_to_server(servicer, server)],
        agents=(security, admitted_peers(node_id)),
    )
