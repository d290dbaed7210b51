"""Serving until SIGTERM or SIGINT, then ending the process within a bounded time.

Invariants:

- A signal handler only records the signal. Python's C-level handler writes
  the signal's number to a wake-up pipe (``signal.set_wakeup_fd``); the
  Python-level handler does nothing at all. No lock is taken, no log line
  written and nothing torn down inside a handler, so a signal arriving during
  the teardown, or during another handler, cannot deadlock the process.
- The main thread reads the pipe. On the first signal it stops the services
  from a helper thread (new calls refused at once, calls in flight given
  ``grace_s``, then cancelled and their host commands killed) and exits 0.
- A second signal exits at once, and so does a teardown that overruns
  ``grace_s + FORCE_AFTER_S``: unix sockets removed, running host commands
  killed, logs flushed, status 128 + the signal's number (143 for SIGTERM,
  130 for SIGINT), or 1 for an overrun.
- Every exit is ``os._exit`` after the logs are flushed: once the servers
  are stopped and the catalog closed nothing is left to wait for, and a
  call's thread still running (a lock wait, an uninterruptible command that
  finishes on its own) must not hold the process open.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from types import FrameType
from typing import NoReturn

from csi_driver.runtime import Services

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: How long past its grace period a stop may run before the process just exits.
FORCE_AFTER_S = 3.0
#: Exit status when the teardown overran its bound.
OVERRUN_EXIT = 1


def _record(signum: int, frame: FrameType | None) -> None:
    """The whole Python-level handler: the C-level one already wrote ``signum``."""


class SignalPipe:
    """SIGTERM and SIGINT, delivered to the main thread as bytes on a pipe."""

    def __init__(self) -> None:
        self._read, write = os.pipe()
        for fd in (self._read, write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for signum in SIGNALS:
            signal.signal(signum, _record)

    def next(self, timeout_s: float | None) -> signal.Signals | None:
        """The next signal received, waiting up to ``timeout_s`` (None: forever)."""
        ends = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if ends is None else max(0.0, ends - time.monotonic())
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                for number in os.read(self._read, 1):
                    if number in SIGNALS:
                        return signal.Signals(number)
                continue  # another signal with a Python handler woke us
            if left is not None and left <= 0:
                return None


def _exit_now(services: Services, status: int) -> NoReturn:
    services.abandon()
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(status)


def serve_until_signalled(services: Services, signals: SignalPipe, grace_s: float) -> NoReturn:
    """Block until SIGTERM or SIGINT, stop ``services`` and end the process."""
    first = signals.next(None)
    assert first is not None
    log.info("stopping", extra={"signal": first.name, "grace_s": grace_s})
    stopper = threading.Thread(target=services.stop, args=(grace_s,), name="stop", daemon=True)
    stopper.start()
    ends = time.monotonic() + grace_s + FORCE_AFTER_S
    while stopper.is_alive():
        left = ends - time.monotonic()
        if left <= 0:
            log.error("stopping overran its grace period; exiting now")
            _exit_now(services, OVERRUN_EXIT)
        # Polled: the stopper has no way to wake the pipe without posing as a signal.
        second = signals.next(min(left, 0.05))
        if second is not None:
            log.warning("second signal: exiting now", extra={"signal": second.name})
            _exit_now(services, 128 + second)
    log.info("stopped")
    _exit_now(services, 0)
