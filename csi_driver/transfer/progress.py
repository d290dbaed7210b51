"""Progress of a transfer: bytes done, rate and ETA, as a value, metrics and logs.

The rate is measured over the current session only (since the receiver
started or resumed), so bytes that landed before a restart neither inflate
it nor hide a slow link; they do count as done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from csi_driver.metrics import TRANSFER_ETA, TRANSFER_RATE, TRANSFER_REMAINING

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass(frozen=True)
class Progress:
    transfer_id: str
    bytes_total: int
    bytes_done: int
    bytes_this_session: int
    elapsed_s: float

    @property
    def rate_bytes_per_s(self) -> float:
        return self.bytes_this_session / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def remaining_bytes(self) -> int:
        return max(0, self.bytes_total - self.bytes_done)

    @property
    def eta_s(self) -> float | None:
        """Seconds to completion at the current rate; None before anything arrived."""
        if not self.remaining_bytes:
            return 0.0
        rate = self.rate_bytes_per_s
        return self.remaining_bytes / rate if rate > 0 else None

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


class ProgressMeter:
    """Counts landed bytes of one transfer; publishes gauges and logs every few seconds."""

    def __init__(
        self,
        transfer_id: str,
        bytes_total: int,
        bytes_done: int = 0,
        *,
        log_every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transfer_id = transfer_id
        self._total = bytes_total
        self._done = bytes_done
        self._session = 0
        self._clock = clock
        self._started = clock()
        self._log_every = log_every_s
        self._logged = self._started

    def add(self, length: int) -> None:
        self._done += length
        self._session += length
        now = self._clock()
        if now - self._logged >= self._log_every:
            self._logged = now
            self.publish("transfer progress")

    def value(self) -> Progress:
        elapsed = self._clock() - self._started
        return Progress(self.transfer_id, self._total, self._done, self._session, elapsed)

    def publish(self, message: str) -> Progress:
        progress = self.value()
        TRANSFER_REMAINING.labels(self.transfer_id).set(progress.remaining_bytes)
        TRANSFER_RATE.labels(self.transfer_id).set(progress.rate_bytes_per_s)
        TRANSFER_ETA.labels(self.transfer_id).set(progress.eta_s or 0.0)
        eta = progress.eta_s
        log.info(
            message,
            extra={
                "transfer": self.transfer_id,
                "done_mib": round(progress.bytes_done / MiB, 1),
                "total_mib": round(progress.bytes_total / MiB, 1),
                "rate_mib_s": round(progress.rate_bytes_per_s / MiB, 1),
                "eta_s": None if eta is None else round(eta, 1),
            },
        )
        return progress

    def finish(self) -> Progress:
        progress = self.publish("transfer finished")
        for gauge in (TRANSFER_REMAINING, TRANSFER_RATE, TRANSFER_ETA):
            gauge.remove(self.transfer_id)
        return progress
