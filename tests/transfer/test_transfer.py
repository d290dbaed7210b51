"""Chunk streams between two nodes over real mutual TLS on loopback TCP."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from csi_driver.chunks.generations import GenerationStore
from csi_driver.chunks.manifest import BLOCK_SIZE, DIGEST_SIZE
from csi_driver.core.errors import (
    DataLoss,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from csi_driver.gen.ferry.v1 import transfer_pb2, transfer_pb2_grpc
from csi_driver.pki import Identity
from csi_driver.transfer import receiver as receiver_module
from csi_driver.transfer.progress import Progress
from csi_driver.transfer.receiver import CHANNEL_OPTIONS
from csi_driver.transport import AgentSecurity, open_channel
from tests.certs import Pki
from tests.chunks.images import write_at
from tests.transfer.conftest import (
    CHUNK,
    ReceiverFactory,
    Sender,
    file_digest,
    random_chunks,
    write_image,
)

DATA = [0, 1, 2, 5, 8, 9, 10, 11, 20, 31]


def received_bytes() -> float:
    value = REGISTRY.get_sample_value("ferry_transfer_bytes_total", {"direction": "received"})
    return value or 0.0


def test_a_full_pull_then_a_delta_land_byte_identical(
    tmp_path: Path, sender: Sender, receiver_for: ReceiverFactory
) -> None:
    source = tmp_path / "source.img"
    write_image(source, random_chunks(DATA, 1), 32)
    sender.export("t1", source)
    store = GenerationStore(tmp_path / "replica")
    before = received_bytes()

    result = receiver_for().pull("t1", store)
    assert result.generation.number == 1
    assert file_digest(result.generation.image) == file_digest(source)
    assert sorted(result.attempts[0].landed) == DATA
    assert sender.exports.require("t1").sent == dict.fromkeys(DATA, 1)  # holes never sent
    assert result.progress.bytes_done == result.progress.bytes_total == len(DATA) * CHUNK
    assert result.progress.eta_s == 0.0
    assert received_bytes() - before == len(DATA) * CHUNK

    write_image(source, {**random_chunks(DATA, 1), **random_chunks([9, 30], 2)}, 32)
    sender.export("t2", source)
    again = receiver_for().pull("t2", store)
    assert again.generation.number == 2 and again.chunks_received == 2
    assert sender.exports.require("t2").sent == {9: 1, 30: 1}
    assert file_digest(again.generation.image) == file_digest(source)
    # Pulling what the replica holds already sends nothing.
    assert receiver_for().pull("t2", store).chunks_received == 0


def test_a_chunk_the_last_sync_of_a_broken_stream_rejects_is_asked_for_once_more(
    tmp_path: Path,
    sender: Sender,
    receiver_for: ReceiverFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunk 3 arrives rotten, then the link drops before any sync read it back: the
    broken stream's last sync rejects it. The next stream asks for it once (it is
    missing) and counts it against its attempts, and the replica commits."""
    # Only the syncs a stream makes when it ends: none reads chunk 3 back mid-stream.
    monkeypatch.setattr(receiver_module, "SYNC_SECONDS", 3600.0)
    source = tmp_path / "source.img"
    chunks = random_chunks(range(10), 6)
    write_image(source, chunks, 10)
    sender.export("t", source)  # the manifest says what chunk 3 must be
    write_at(source, 3 * CHUNK + 1000, b"\0\1\2")  # then its bytes rot
    export = sender.exports.require("t")

    def drop_once_chunk_3_is_written() -> None:
        # With one chunk in flight, chunk 4 is asked for once chunk 3 was written.
        ends = time.monotonic() + 30
        while not export.sent[4] and time.monotonic() < ends:
            time.sleep(0.001)
        sender.stop()
        write_image(source, chunks, 10)  # repaired for the next stream
        sender.restart()

    breaker = threading.Thread(target=drop_once_chunk_3_is_written)
    breaker.start()
    try:
        # Four chunks a second: the drop comes over a second before the stream's end.
        receiver = receiver_for(
            window_bytes=CHUNK, max_rate_bytes_per_s=4 * CHUNK, chunk_attempts=2
        )
        result = receiver.pull("t", GenerationStore(tmp_path / "replica"))
    finally:
        breaker.join()
    broken, *later = result.attempts
    assert broken.error and 3 not in broken.landed and broken.rejected == []
    assert [i for a in later for i in a.rejected] == [3]  # counted once, after the drop
    assert export.sent[3] == 2  # rotten once, then asked for once more, not twice
    assert file_digest(result.generation.image) == file_digest(source)


@pytest.mark.root
def test_a_pull_between_images_on_a_filesystem_refusing_direct_io(
    no_direct_io: Path, sender: Sender, receiver_for: ReceiverFactory
) -> None:
    """Source and replica on ramfs (no O_DIRECT): the sender reads, the receiver
    writes and reads back through the page cache, a full pull and a delta alike."""
    source = no_direct_io / "source.img"
    write_image(source, random_chunks(DATA, 1), 32)
    sender.export("t1", source, with_table=True)
    store = GenerationStore(no_direct_io / "replica")
    first = receiver_for().pull("t1", store)
    assert file_digest(first.generation.image) == file_digest(source)
    write_image(source, {**random_chunks(DATA, 1), 9: random_chunks([9], 2)[9]}, 32)
    sender.export("t2", source, with_table=True)
    again = receiver_for().pull("t2", store)
    assert (again.generation.number, again.chunks_received) == (2, 1)
    assert file_digest(again.generation.image) == file_digest(source)


@pytest.mark.parametrize("with_table", [False, True], ids=["hashed-on-demand", "table"])
def test_a_chunk_the_replica_holds_is_sent_by_its_changed_blocks(
    tmp_path: Path, sender: Sender, receiver_for: ReceiverFactory, with_table: bool
) -> None:
    source = tmp_path / "source.img"
    chunks = random_chunks(range(8), 11)
    write_image(source, chunks, 8)
    store = GenerationStore(tmp_path / "replica")
    sender.export("t1", source, with_table=with_table)
    receiver_for().pull("t1", store)

    write_at(source, 2 * CHUNK + 100 * 1024, b"\1" * 4096)  # in block 1 of chunk 2
    write_at(source, 5 * CHUNK + 3 * BLOCK_SIZE, b"\2" * 2 * BLOCK_SIZE)  # blocks 3-4 of 5
    write_at(source, 6 * CHUNK, bytes(BLOCK_SIZE))  # block 0 of 6 zeroed: a hole, never sent
    sender.export("t2", source, with_table=with_table)
    before = received_bytes()
    result = receiver_for().pull("t2", store)
    assert result.chunks_received == 3
    tables = 3 * (CHUNK // BLOCK_SIZE) * DIGEST_SIZE
    assert result.bytes_received == 3 * BLOCK_SIZE + tables
    assert received_bytes() - before == 3 * BLOCK_SIZE
    assert sender.exports.require("t2").sent_bytes == 3 * BLOCK_SIZE
    assert file_digest(result.generation.image) == file_digest(source)


def test_a_block_corrupt_at_the_source_is_asked_for_whole_and_never_committed(
    tmp_path: Path, sender: Sender, receiver_for: ReceiverFactory
) -> None:
    source = tmp_path / "source.img"
    write_image(source, random_chunks(range(4), 12), 4)
    store = GenerationStore(tmp_path / "replica")
    sender.export("t1", source, with_table=True)
    first = receiver_for().pull("t1", store)
    write_at(source, CHUNK + 2 * BLOCK_SIZE, b"\3" * BLOCK_SIZE)
    sender.export("t2", source, with_table=True)  # the table says what block 2 must be
    write_at(source, CHUNK + 2 * BLOCK_SIZE + 7, b"\4")  # then it rots on the sender's disk
    with pytest.raises(DataLoss, match="chunk 1"):
        receiver_for(chunk_attempts=3).pull("t2", store)
    # Asked by blocks once, then whole twice; the replica kept its generation.
    assert sender.exports.require("t2").sent[1] == 3
    assert store.current() == first.generation

    write_at(source, CHUNK + 2 * BLOCK_SIZE + 7, b"\3")
    result = receiver_for().pull("t2", store)
    assert result.chunks_received == 1
    assert file_digest(result.generation.image) == file_digest(source)


def test_flow_control_keeps_at_most_the_window_in_flight(
    tmp_path: Path, sender: Sender, receiver_for: ReceiverFactory
) -> None:
    source = tmp_path / "source.img"
    write_image(source, random_chunks(range(24), 3), 24)
    sender.export("t", source)
    export = sender.exports.require("t")
    worst: list[int] = []

    def landed(index: int, progress: Progress) -> None:
        # Sent but not yet written never exceeds the window: 2 chunks.
        worst.append(export.sent.total() - progress.bytes_done // CHUNK)

    receiver = receiver_for(window_bytes=2 * CHUNK, on_landed=landed)
    receiver.pull("t", GenerationStore(tmp_path / "replica"))
    assert len(worst) == 24 and max(worst) <= 2


def test_a_dropped_connection_resumes_without_resending_what_landed(
    tmp_path: Path, sender: Sender, receiver_for: ReceiverFactory
) -> None:
    source = tmp_path / "source.img"
    write_image(source, random_chunks(range(40), 4), 40)
    sender.export("t", source)
    dropped = threading.Event()
    restart = threading.Timer(0.3, sender.restart)

    def landed(index: int, progress: Progress) -> None:
        if progress.bytes_done >= 8 * CHUNK and not dropped.is_set():
            dropped.set()
            sender.stop()  # the link goes away mid-stream
            restart.start()

    receiver = receiver_for(
        window_bytes=2 * CHUNK, on_landed=landed, max_rate_bytes_per_s=40 * CHUNK
    )
    try:
        result = receiver.pull("t", GenerationStore(tmp_path / "replica"))
    finally:
        if restart.is_alive():  # done before the fixture stops the sender
            restart.join()
    assert dropped.is_set() and len(result.attempts) >= 2
    first = set(result.attempts[0].landed)
    later = {i for a in result.attempts[1:] for i in a.requested}
    assert len(first) >= 8 and not first & later  # nothing that landed was asked for again
    assert sorted(i for a in result.attempts for i in a.landed) == list(range(40))
    sent = sender.exports.require("t").sent
    assert all(sent[i] == 1 for i in first)
    assert file_digest(result.generation.image) == file_digest(source)


def test_a_chunk_corrupt_at_the_source_is_rejected_and_never_committed(
    tmp_path: Path, sender: Sender, receiver_for: ReceiverFactory
) -> None:
    source = tmp_path / "source.img"
    chunks = random_chunks(range(8), 5)
    write_image(source, chunks, 8)
    sender.export("t", source)  # the manifest says what chunk 3 must be
    with open(source, "r+b") as handle:  # then its bytes rot on the sender's disk
        handle.seek(3 * CHUNK + 1000)
        handle.write(b"\0\1\2")
    store = GenerationStore(tmp_path / "replica")
    labels = {"direction": "received", "outcome": "rejected"}
    rejected_before = REGISTRY.get_sample_value("ferry_transfer_chunks_total", labels) or 0
    with pytest.raises(DataLoss, match="chunk 3"):
        receiver_for(chunk_attempts=3).pull("t", store)
    assert sender.exports.require("t").sent[3] == 3  # asked for again, then given up
    rejected = REGISTRY.get_sample_value("ferry_transfer_chunks_total", labels)
    assert rejected == rejected_before + 3
    assert store.current() is None  # nothing committed

    write_image(source, chunks, 8)  # repaired: a retry fetches only chunk 3
    result = receiver_for().pull("t", store)
    assert result.chunks_received == 1 and result.landed_before == 7
    assert file_digest(result.generation.image) == file_digest(source)


def test_only_other_nodes_may_pull(pki: Pki, sender: Sender, receiver_for: ReceiverFactory) -> None:
    with pytest.raises(PermissionDenied, match="controller may not call"):
        receiver_for("controller").manifest("t")
    with pytest.raises(PermissionDenied, match="node/sender may not call"):
        receiver_for("node/sender").manifest("t")
    with pytest.raises(NotFound, match="exports no transfer 'nope'"):
        receiver_for().manifest("nope")


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            transfer_pb2.ChunkRequest(indexes=[0]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "name transfer_id",
        ),
        (
            transfer_pb2.ChunkRequest(transfer_id="x", indexes=[0]),
            grpc.StatusCode.NOT_FOUND,
            "exports no",
        ),
        (
            transfer_pb2.ChunkRequest(transfer_id="t", indexes=[1]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "is a hole",
        ),
        (
            transfer_pb2.ChunkRequest(transfer_id="t", indexes=[9]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside",
        ),
    ],
)
def test_bad_chunk_requests_get_clear_codes(
    tmp_path: Path,
    pki: Pki,
    sender: Sender,
    request_: transfer_pb2.ChunkRequest,
    code: grpc.StatusCode,
    message: str,
) -> None:
    source = tmp_path / "source.img"
    write_image(source, random_chunks([0], 6), 2)
    sender.export("t", source)
    security = AgentSecurity(tls=pki.bundle("node/receiver"))
    with open_channel(
        str(sender.endpoint), security, Identity.node("sender"), CHANNEL_OPTIONS
    ) as channel:
        stub = transfer_pb2_grpc.ChunkSourceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            list(stub.PullChunks(iter([request_]), timeout=10))
    assert failure.value.code() is code and message in (failure.value.details() or "")


def test_an_export_needs_an_id(tmp_path: Path, sender: Sender) -> None:
    with pytest.raises(InvalidArgument):
        sender.exports.add("", tmp_path / "x", None)  # type: ignore[arg-type]


def test_get_manifest_requires_a_transfer_id_and_a_reachable_sender(
    pki: Pki, sender: Sender, receiver_for: ReceiverFactory
) -> None:
    with pytest.raises(InvalidArgument, match="transfer_id"):
        receiver_for().manifest("")
    sender.stop()
    with pytest.raises(Unavailable):
        receiver_for().manifest("t")


def test_an_export_keeps_reading_its_own_block_table_after_the_next_capture_replaces_it(
    tmp_path: Path, sender: Sender, receiver_for: ReceiverFactory
) -> None:
    """A volume's next capture (a move's final one) rewrites or removes the table
    file while the replica may still pull the previous export by blocks."""
    source = tmp_path / "source.img"
    write_image(source, random_chunks(range(4), 5), 4)
    store = GenerationStore(tmp_path / "replica")
    sender.export("t1", source, with_table=True)
    receiver_for().pull("t1", store)
    write_at(source, CHUNK + 2 * BLOCK_SIZE, b"\7" * 4096)
    sender.export("t2", source, with_table=True)

    table = tmp_path / "t2.blocks"
    table.unlink()
    table.write_bytes(b"\xee" * (4 * (CHUNK // BLOCK_SIZE) * DIGEST_SIZE))  # another capture's
    result = receiver_for().pull("t2", store)

    assert result.chunks_rejected == 0
    assert sender.exports.require("t2").sent_bytes == BLOCK_SIZE  # by blocks, as planned
    assert file_digest(result.generation.image) == file_digest(source)
