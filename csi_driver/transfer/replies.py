"""PullChunks replies (``ferry.v1.Chunks``) encoded straight into protobuf's wire format.

Built through the generated classes, a 4 MiB chunk was copied three times on
the sender before gRPC saw it (into a bytes object, into the message's arena,
out of it when serialized), each copy into fresh memory; here a chunk's bytes
are copied once, from the buffer they were read into to the reply.

Invariant: :meth:`Reply.encode` gives exactly the bytes that
``transfer_pb2.Chunks(chunks=[...]).SerializeToString()`` gives for the same
parts (fields in number order, proto3 defaults left out, a set ``run``
always present), so the receiver parses them with the generated class and
proto/ferry/v1/transfer.proto stays the contract;
tests/transfer/test_replies.py compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Wire types (protobuf encoding): a varint, or a length-delimited field.
_VARINT, _LENGTH = 0, 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _uint(number: int, value: int) -> bytes:
    """A uint32 field, left out when 0 (proto3)."""
    return _key(number, _VARINT) + _varint(value) if value else b""


def _length(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field of ``length`` bytes."""
    return _key(number, _LENGTH) + _varint(length)


@dataclass(frozen=True)
class Run:
    """A ``BlockRun``: ``count`` blocks of chunk ``index`` from block ``first``."""

    index: int
    first: int
    count: int

    def encode(self) -> bytes:
        return _uint(1, self.index) + _uint(2, self.first) + _uint(3, self.count)


@dataclass(frozen=True)
class Part:
    """One ``Chunk`` of a reply: a whole chunk (``data``), a block table
    (``digests``) or a block run (``data`` and ``run``). ``data`` may be a view
    of a buffer that is reused: :class:`Reply` copies it before the next read."""

    index: int
    data: bytes | memoryview = b""
    digests: bytes = b""
    run: Run | None = None

    @property
    def size(self) -> int:
        return len(self.data) + len(self.digests)

    def pieces(self) -> list[bytes | memoryview]:
        """This ``Chunk``'s encoding as a ``Chunks.chunks`` entry, in pieces (the data
        not copied)."""
        head = _uint(1, self.index)
        if self.data:
            head += _length(2, len(self.data))
        tail = b""
        if self.run is not None:
            run = self.run.encode()
            tail += _length(3, len(run)) + run
        if self.digests:
            tail += _length(4, len(self.digests)) + self.digests
        body = len(head) + len(self.data) + len(tail)
        return [_length(1, body) + head, self.data, tail]


class Reply:
    """A ``Chunks`` message being gathered, part by part."""

    def __init__(self) -> None:
        self._pieces: list[bytes | memoryview] = []
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def add(self, part: Part, *, last: bool = False) -> None:
        """Add ``part``; its data is copied now unless ``last`` (then :meth:`encode`
        must run before its buffer is read into again)."""
        pieces = part.pieces()
        if not last and isinstance(part.data, memoryview):
            pieces[1] = bytes(part.data)
        self._pieces.extend(pieces)
        self.size += part.size

    def encode(self) -> bytes:
        return b"".join(self._pieces)
