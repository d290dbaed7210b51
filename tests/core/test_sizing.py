"""How a CSI capacity range becomes an image size."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.controller.volumes import ALLOCATION_UNIT, DEFAULT_CAPACITY, resolve_size
from csi_driver.core.errors import InvalidArgument, OutOfRange
from csi_driver.core.model import CapacityRange, MiB


def test_default_when_unset() -> None:
    assert resolve_size(CapacityRange(), MiB) == DEFAULT_CAPACITY


def test_limit_only_caps_the_default() -> None:
    assert resolve_size(CapacityRange(limit_bytes=100 * MiB), MiB) == 100 * MiB


def test_rounds_up_to_whole_mib() -> None:
    assert resolve_size(CapacityRange(required_bytes=MiB + 1), MiB) == 2 * MiB


def test_minimum_applies() -> None:
    assert resolve_size(CapacityRange(required_bytes=1), 300 * MiB) == 300 * MiB


def test_limit_below_minimum_is_out_of_range() -> None:
    with pytest.raises(OutOfRange):
        resolve_size(CapacityRange(required_bytes=1, limit_bytes=10 * MiB), 300 * MiB)


def test_required_above_limit_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        resolve_size(CapacityRange(required_bytes=10, limit_bytes=5), 1)


def test_negative_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        resolve_size(CapacityRange(required_bytes=-1), 1)


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.sampled_from([MiB, 8 * MiB]))
def test_result_is_within_bounds(required: int, limit: int, minimum: int) -> None:
    try:
        size = resolve_size(CapacityRange(required, limit), minimum)
    except (OutOfRange, InvalidArgument):
        return
    assert size % ALLOCATION_UNIT == 0
    assert size >= max(required, minimum)
    if limit:
        assert size <= limit
