"""Retention policies, table-driven and as properties."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.backup.retention import Dated, RetentionPolicy, kept
from csi_driver.core.errors import InvalidArgument

DAY = 86400.0
#: Noon UTC on a Monday, so day and week boundaries are easy to see.
MONDAY = datetime.datetime(2026, 11, 23, 12, tzinfo=datetime.UTC).timestamp()


def backups(*offsets_h: float) -> list[Dated]:
    return [Dated(f"b{i}", MONDAY + h * 3600) for i, h in enumerate(offsets_h)]


@pytest.mark.parametrize(
    ("policy", "offsets_h", "expected"),
    [
        (RetentionPolicy(keep_last=2), (0, 1, 2, 3), {"b2", "b3"}),
        (RetentionPolicy(keep_last=9), (0, 1), {"b0", "b1"}),
        # Newest of each of the two newest days: Tuesday's last, Monday's last.
        (RetentionPolicy(keep_daily=2), (-30, 0, 1, 24, 25), {"b2", "b4"}),
        (RetentionPolicy(keep_daily=7), (0, 1, 24), {"b1", "b2"}),
        # Weeks: the previous Sunday is another ISO week.
        (RetentionPolicy(keep_weekly=2), (-26, -20, 0, 30), {"b1", "b3"}),
        (RetentionPolicy(keep_last=1, keep_daily=2), (0, 1, 24, 25), {"b1", "b3"}),
    ],
)
def test_policies(
    policy: RetentionPolicy, offsets_h: tuple[float, ...], expected: set[str]
) -> None:
    assert kept(policy, backups(*offsets_h)) == expected


def test_a_policy_that_keeps_nothing_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="must keep something"):
        RetentionPolicy()
    with pytest.raises(InvalidArgument):
        RetentionPolicy(keep_last=-1, keep_daily=3)


@given(
    st.lists(st.floats(min_value=0, max_value=60 * DAY), min_size=1, max_size=40),
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(1, 5),
)
def test_properties(times: list[float], last: int, daily: int, weekly: int) -> None:
    dated = [Dated(f"b{i:03d}", MONDAY + t) for i, t in enumerate(times)]
    chosen = kept(RetentionPolicy(last, daily, weekly), dated)
    assert chosen <= {d.backup_id for d in dated}
    assert max(dated, key=lambda d: (d.created_at, d.backup_id)).backup_id in chosen
    assert len(chosen) <= last + daily + weekly
