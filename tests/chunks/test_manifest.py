"""Manifests, deltas and their codec: pure properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.chunks.manifest import (
    MIN_CHUNK_SIZE,
    Manifest,
    chunk_digest,
    decode,
    delta,
    encode,
)
from csi_driver.core.errors import InvalidArgument

CHUNK = MIN_CHUNK_SIZE
# Few distinct contents, so that images share chunks as real ones do.
contents = st.sampled_from([bytes(CHUNK), b"\1" * CHUNK, b"\2" * CHUNK, b"\3" * CHUNK])
images = st.lists(contents, max_size=12)


def manifest_of(chunks: list[bytes]) -> Manifest:
    """The reference: a digest per chunk, None where it is all zeros."""
    digests = tuple(None if not any(c) else chunk_digest(c) for c in chunks)
    return Manifest(sum(len(c) for c in chunks), CHUNK, digests)


@given(images)
def test_the_codec_round_trips(chunks: list[bytes]) -> None:
    manifest = manifest_of(chunks)
    assert decode(encode(manifest)) == manifest


@given(st.binary(max_size=200))
def test_decoding_any_bytes_gives_a_manifest_or_invalid_argument(data: bytes) -> None:
    try:
        manifest = decode(data)
    except InvalidArgument:
        return
    assert encode(manifest) == data  # accepted only when it is exactly a manifest


@given(images, st.data())
def test_decoding_a_damaged_manifest_never_passes_silently(
    chunks: list[bytes], data: st.DataObject
) -> None:
    encoded = encode(manifest_of(chunks))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(InvalidArgument):
        decode(encoded[:cut])


@given(images, images)
def test_applying_a_delta_turns_the_base_into_the_target(
    base: list[bytes], target: list[bytes]
) -> None:
    plan = delta(manifest_of(target), manifest_of(base))
    # Apply it the way a replica does: start from the base, resized (zeros).
    image = (base + [bytes(CHUNK)] * len(target))[: len(target)]
    for index in plan.punch:
        image[index] = bytes(CHUNK)
    for index in plan.send:
        image[index] = target[index]
    assert manifest_of(image) == manifest_of(target)
    # Only what differs is sent: never a hole, never a chunk the base holds there.
    for index in plan.send:
        assert any(target[index])
        assert index >= len(base) or base[index] != target[index]


@given(images)
def test_a_delta_to_itself_is_empty_and_from_nothing_is_the_data(chunks: list[bytes]) -> None:
    manifest = manifest_of(chunks)
    assert delta(manifest, manifest).send == () and delta(manifest, manifest).punch == ()
    full = delta(manifest, None)
    assert full.send == manifest.data_chunks
    assert full.send_bytes == manifest.data_bytes == CHUNK * sum(1 for c in chunks if any(c))


def test_a_short_last_chunk_is_its_own_length() -> None:
    manifest = Manifest(CHUNK + 100, CHUNK, (None, chunk_digest(b"\1" * 100)))
    assert manifest.span(1) == (CHUNK, 100)
    grown = Manifest(2 * CHUNK, CHUNK, (None, chunk_digest(b"\1" * 100 + bytes(CHUNK - 100))))
    assert delta(grown, manifest).send == (1,)
    assert delta(manifest, grown).send == (1,)  # shrunk: same digest would still differ
    same_bytes = Manifest(CHUNK + 100, CHUNK, (chunk_digest(b"\2" * CHUNK), manifest.chunks[1]))
    assert delta(same_bytes, manifest).send == (0,)


@pytest.mark.parametrize(
    ("size", "chunk_size", "chunks", "problem"),
    [
        (CHUNK, 1000, (None,), "multiple of"),
        (CHUNK * 2, CHUNK, (None,), "chunks"),
        (CHUNK, CHUNK, (b"short",), "digest"),
        (-1, CHUNK, (), "negative"),
    ],
)
def test_impossible_manifests_are_refused(
    size: int, chunk_size: int, chunks: tuple[bytes | None, ...], problem: str
) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        Manifest(size, chunk_size, chunks)
