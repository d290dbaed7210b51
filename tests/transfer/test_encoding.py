"""The sender's hand-encoded replies are the ``Chunks`` messages protobuf would
have made: the receiver decodes them with the generated code (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from csi_driver.gen.ferry.v1 import transfer_pb2
from csi_driver.transfer.source import Part, encode_chunks

indexes = st.integers(0, 2**32 - 1)
runs = st.builds(transfer_pb2.BlockRun, index=indexes, first=indexes, count=indexes)


@st.composite
def parts(draw: st.DrawFn) -> Part:
    index = draw(indexes)
    kind = draw(st.sampled_from(["whole", "run", "table"]))
    data = draw(st.binary(max_size=300))
    if kind == "whole":
        return transfer_pb2.Chunk(index=index), data
    if kind == "run":
        return transfer_pb2.Chunk(index=index, run=draw(runs)), data
    digests = draw(st.binary(min_size=1, max_size=96))
    return transfer_pb2.Chunk(index=index, block_digests=digests), b""


@settings(max_examples=200)
@given(st.lists(parts(), max_size=6))
def test_encoded_replies_decode_as_the_messages_protobuf_would_send(batch: list[Part]) -> None:
    expected = transfer_pb2.Chunks()
    for meta, data in batch:
        chunk = expected.chunks.add()
        chunk.CopyFrom(meta)
        chunk.data = data
    assert transfer_pb2.Chunks.FromString(encode_chunks(batch)) == expected


def test_a_large_chunk_keeps_its_length_and_bytes() -> None:
    data = bytes(range(256)) * (4 * 1024 * 16)  # 4 MiB: a length of four varint bytes
    decoded = transfer_pb2.Chunks.FromString(encode_chunks([(transfer_pb2.Chunk(index=7), data)]))
    assert [(c.index, c.data == data) for c in decoded.chunks] == [(7, True)]
