"""Progress bars with rates for ``ferry backup`` and ``ferry restore``, on stderr.

On a terminal the bar is redrawn in place at most ten times a second;
elsewhere (logs, CI) a line is printed every few seconds and at the end, so
a long backup shows it is alive without flooding its log.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from csi_driver.backup.repository import Progress

MiB = 1024 * 1024
_WIDTH = 28


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar(Progress):
    def __init__(self, stream: TextIO | None = None, *, every_s: float | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._every = every_s if every_s is not None else (0.1 if self._tty else 5.0)
        self._what = ""
        self._total = self._done = 0
        self._started = self._drawn = 0.0

    def start(self, what: str, total_bytes: int) -> None:
        self._what, self._total, self._done = what, total_bytes, 0
        self._started = self._drawn = time.monotonic()

    def advance(self, done_bytes: int) -> None:
        self._done += done_bytes
        now = time.monotonic()
        if now - self._drawn >= self._every:
            self._drawn = now
            self._draw(final=False)

    def finish(self) -> None:
        self._draw(final=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        fraction = self._done / self._total if self._total else 1.0
        filled = round(_WIDTH * min(fraction, 1.0))
        rate = self._done / elapsed
        left = (self._total - self._done) / rate if rate > 0 else None
        eta = _duration(left) if left is not None else "-:--:--"
        return (
            f"{self._what:<8} [{'#' * filled}{'.' * (_WIDTH - filled)}] {fraction:6.1%} "
            f"{self._done / MiB:9.1f}/{self._total / MiB:.1f} MiB  {rate / MiB:7.1f} MiB/s  "
            f"{'in ' + _duration(elapsed) if self._done >= self._total else 'ETA ' + eta}"
        )

    def _draw(self, *, final: bool) -> None:
        text = self.line()
        if self._tty:
            self._stream.write("\r" + text + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
