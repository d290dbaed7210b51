"""The extent comparison, as a pure function (hypothesis): it reports exactly the
positions where two files' mappings differ, never fewer."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from csi_driver.chunks.extents import (
    EXTENT_DELALLOC,
    EXTENT_SHARED,
    EXTENT_UNWRITTEN,
    Extent,
    changed_ranges,
)

SIZE = 64


@st.composite
def extent_maps(draw: st.DrawFn) -> list[Extent]:
    """Non-overlapping extents in [0, SIZE) with small physical addresses (so that
    two maps often agree), some flagged."""
    cuts = sorted(draw(st.sets(st.integers(0, SIZE), max_size=10)))
    extents = []
    for start, end in itertools.pairwise(cuts):
        if draw(st.booleans()):
            physical = draw(st.integers(0, 3)) * 16 + start
            flags = draw(st.sampled_from([0, 0, EXTENT_SHARED, EXTENT_UNWRITTEN, EXTENT_DELALLOC]))
            extents.append(Extent(start, physical, end - start, flags))
    return extents


def mapping(extents: list[Extent], position: int) -> object:
    for extent in extents:
        if extent.logical <= position < extent.end:
            if extent.flags & EXTENT_DELALLOC:
                return ("unstable", position)
            if extent.flags & EXTENT_UNWRITTEN:
                return None  # reads as zeros, like a hole
            return extent.physical + position - extent.logical
    return None


@given(extent_maps(), extent_maps())
def test_changed_ranges_are_exactly_where_the_mappings_differ(
    older: list[Extent], newer: list[Extent]
) -> None:
    ranges = changed_ranges(older, newer, SIZE)
    covered = {p for offset, length in ranges for p in range(offset, offset + length)}
    for position in range(SIZE):
        a, b = mapping(older, position), mapping(newer, position)
        unstable = (isinstance(a, tuple) and a[0] == "unstable") or (
            isinstance(b, tuple) and b[0] == "unstable"
        )
        assert (position in covered) == (unstable or a != b), position
    # Sorted, merged, inside the file.
    for (o1, l1), (o2, _) in itertools.pairwise(ranges):
        assert o1 + l1 < o2
    assert all(o >= 0 and o + length <= SIZE for o, length in ranges)


def test_identical_maps_have_no_changes() -> None:
    extents = [Extent(0, 100, 32, EXTENT_SHARED), Extent(40, 500, 8, 0)]
    assert changed_ranges(extents, list(extents), SIZE) == []
