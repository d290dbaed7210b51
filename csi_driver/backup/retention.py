"""Retention: which backups of one volume a policy keeps. Pure: no target here.

A backup is kept when any rule keeps it (as restic and borg count):

- ``keep_last``: the newest N backups;
- ``keep_daily``: the newest backup of each of the newest N UTC days that have one;
- ``keep_weekly``: the same per ISO week.

A policy that keeps nothing is refused: pruning with it would delete every backup.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from csi_driver.core.errors import InvalidArgument


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0

    def __post_init__(self) -> None:
        counts = (self.keep_last, self.keep_daily, self.keep_weekly)
        if any(count < 0 for count in counts):
            raise InvalidArgument("retention counts must not be negative")
        if not any(counts):
            raise InvalidArgument(
                "a retention policy must keep something: give --keep-last, --keep-daily "
                "or --keep-weekly"
            )


@dataclass(frozen=True)
class Dated:
    backup_id: str
    created_at: float  # seconds since the epoch


def _day(at: float) -> Hashable:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).date()


def _week(at: float) -> Hashable:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isocalendar()[:2]


def kept(policy: RetentionPolicy, backups: Sequence[Dated]) -> frozenset[str]:
    """The ids of ``backups`` (all of one volume) that ``policy`` keeps."""
    newest_first = sorted(backups, key=lambda b: (b.created_at, b.backup_id), reverse=True)
    keep = {b.backup_id for b in newest_first[: policy.keep_last]}
    rules: tuple[tuple[int, Callable[[float], Hashable]], ...] = (
        (policy.keep_daily, _day),
        (policy.keep_weekly, _week),
    )
    for count, period in rules:
        seen: set[Hashable] = set()
        for backup in newest_first:
            if len(seen) >= count:
                break
            bucket = period(backup.created_at)
            if bucket not in seen:
                seen.add(bucket)
                keep.add(backup.backup_id)
    return frozenset(keep)
