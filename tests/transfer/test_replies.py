"""Replies encoded by hand are, byte for byte, what the generated classes encode,
so the receiver parses them with those classes (proto/ferry/v1/transfer.proto
stays the contract)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from csi_driver.gen.ferry.v1 import transfer_pb2
from csi_driver.transfer.replies import Part, Reply, Run

indexes = st.integers(min_value=0, max_value=2**32 - 1)
runs = st.builds(Run, indexes, indexes, indexes)
parts = st.builds(
    Part,
    indexes,
    data=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(memoryview)),
    digests=st.binary(max_size=100),
    run=st.one_of(st.none(), runs),
)


def generated(part: Part) -> transfer_pb2.Chunk:
    chunk = transfer_pb2.Chunk(index=part.index, data=bytes(part.data), block_digests=part.digests)
    if part.run is not None:
        chunk.run.SetInParent()
        chunk.run.index, chunk.run.first, chunk.run.count = (
            part.run.index,
            part.run.first,
            part.run.count,
        )
    return chunk


@given(st.lists(parts, max_size=5), st.booleans())
def test_a_reply_is_what_protobuf_encodes(gathered: list[Part], last: bool) -> None:
    reply = Reply()
    for n, part in enumerate(gathered):
        reply.add(part, last=last and n == len(gathered) - 1)
    encoded = reply.encode()
    expected = transfer_pb2.Chunks(chunks=[generated(p) for p in gathered])
    assert encoded == expected.SerializeToString(deterministic=True)
    assert transfer_pb2.Chunks.FromString(encoded) == expected
    assert reply.size == sum(len(p.data) + len(p.digests) for p in gathered)
    assert bool(reply) == bool(gathered)


def test_a_part_s_view_is_copied_unless_it_is_the_last() -> None:
    buffer = bytearray(b"abcd")
    reply = Reply()
    reply.add(Part(1, data=memoryview(buffer)[:2]))
    buffer[:2] = b"xy"  # the reader reads its next chunk into the same buffer
    reply.add(Part(2, data=memoryview(buffer)[2:]), last=True)
    parsed = transfer_pb2.Chunks.FromString(reply.encode())
    assert [c.data for c in parsed.chunks] == [b"ab", b"cd"]
