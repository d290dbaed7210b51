"""Real certificates, a real chunk server on a loopback TCP port, real images."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.manifest import MiB
from csi_driver.chunks.scan import scan_image
from csi_driver.pki import Identity
from csi_driver.transfer.receiver import CHANNEL_OPTIONS, Receiver
from csi_driver.transfer.source import Exports, serve_chunks
from csi_driver.transport import AgentSecurity, Endpoint, open_channel
from tests.certs import Pki
from tests.chunks.images import write_image as write_images

CHUNK = MiB


def write_image(path: Path, chunks: dict[int, bytes], count: int) -> None:
    write_images(path, chunks, count, CHUNK)


def random_chunks(indexes: range | list[int], seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {i: rng.randbytes(CHUNK) for i in indexes}


@dataclass
class Sender:
    """Node ``sender``'s chunk server; ``restart`` brings it back on the same port."""

    exports: Exports
    security: AgentSecurity
    server: grpc.Server
    endpoint: Endpoint

    def export(self, transfer_id: str, image: Path, *, with_table: bool = False) -> None:
        """Serve ``image``; ``with_table`` keeps its block table, as a capture does
        (without one, the sender hashes a chunk's blocks when they are asked for)."""
        if not with_table:
            self.exports.add(transfer_id, image, scan_image(image, CHUNK).manifest)
            return
        size = image.stat().st_size
        table = BlockTable.create(image.with_name(f"{transfer_id}.blocks"), size, CHUNK)
        manifest = scan_image(image, CHUNK, table=table).manifest
        table.close()
        self.exports.add(transfer_id, image, manifest, table.path)

    def stop(self) -> None:
        self.server.stop(grace=0).wait()

    def restart(self) -> None:
        self.server, _ = serve_chunks(str(self.endpoint), self.exports, self.security, "sender")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
def sender(pki: Pki) -> Iterator[Sender]:
    security = AgentSecurity(tls=pki.bundle("node/sender"))
    exports = Exports()
    server, endpoint = serve_chunks("tcp://127.0.0.1:0", exports, security, "sender")
    running = Sender(exports, security, server, endpoint)
    try:
        yield running
    finally:
        running.stop()


ReceiverFactory = Callable[..., Receiver]


@pytest.fixture
def receiver_for(pki: Pki, sender: Sender) -> ReceiverFactory:
    """A receiver pulling from ``sender`` as ``identity`` (default node/receiver)."""

    def make(identity: str = "node/receiver", **options: object) -> Receiver:
        security = AgentSecurity(tls=pki.bundle(identity))
        target = str(sender.endpoint)

        def channel() -> grpc.Channel:
            return open_channel(target, security, Identity.node("sender"), CHANNEL_OPTIONS)

        return Receiver(channel, backoff_s=0.1, **options)  # type: ignore[arg-type]

    return make


def file_digest(path: Path) -> bytes:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(MiB):
            digest.update(block)
    return digest.digest()


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
