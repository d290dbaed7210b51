"""The deadline of the call that a piece of work is done for.

The CSI layer binds each RPC's deadline for the duration of the call
(``csi_driver.rpc.errors.rpc``); whatever runs for that call on its thread —
host commands above all, and waits for a volume's lock — reads it with
:func:`remaining` and gives up in time, instead of working on for a caller
that has already gone. Work outside any RPC (startup recovery, the
heartbeat) sees no deadline and keeps its own limits.

Invariants: a bound deadline never outlives its call (it is reset when the
call returns, so a pooled server thread never inherits another call's
deadline), and a nested binding can only shorten it, never extend it.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

_AT: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
#: Longer than any real deadline: gRPC reports "no deadline" as about 2**63 ns.
NONE_BEYOND_S = 365 * 24 * 3600.0


@contextmanager
def bound(seconds: float | None) -> Iterator[None]:
    """Run a block with at most ``seconds`` left (None, or beyond a year: no deadline)."""
    at = _AT.get()
    if seconds is not None and math.isfinite(seconds) and seconds < NONE_BEYOND_S:
        mine = time.monotonic() + max(0.0, seconds)
        at = mine if at is None else min(at, mine)
    token = _AT.set(at)
    try:
        yield
    finally:
        _AT.reset(token)


def remaining() -> float | None:
    """Seconds left before the current call's deadline (negative once spent), or None."""
    at = _AT.get()
    return None if at is None else at - time.monotonic()


def clamp(seconds: float) -> float:
    """``seconds``, shortened to what is left of the current call's deadline (never < 0)."""
    left = remaining()
    return seconds if left is None else max(0.0, min(seconds, left))
