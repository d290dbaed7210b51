"""GroupLead: concurrent callers' items served in batches, one batch at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from csi_driver.core.batching import GroupLead

WAIT_S = 10.0


class _Server:
    """Serves batches, recording them; the first batch waits for ``release``."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.serving = threading.Event()
        self.release = threading.Event()
        self.concurrent = 0
        self.most_concurrent = 0
        self._fail_on = fail_on
        self._lock = threading.Lock()

    def __call__(self, batch: Sequence[int]) -> None:
        with self._lock:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            self.serving.set()
            assert self.release.wait(WAIT_S)
            self.batches.append(list(batch))
            if self._fail_on is not None and self._fail_on in batch:
                raise OSError(f"serving {self._fail_on} failed")
        finally:
            with self._lock:
                self.concurrent -= 1


def _submit_all(
    lead: GroupLead[int], server: _Server, items: list[int]
) -> tuple[list[threading.Thread], dict[int, BaseException | None]]:
    """Submit ``items[0]``, wait until it is being served, then the rest in order, each
    queued before the next is submitted."""
    outcome: dict[int, BaseException | None] = {}

    def one(item: int) -> None:
        try:
            lead.submit(item, server)
            outcome[item] = None
        except BaseException as exc:
            outcome[item] = exc

    threads = [threading.Thread(target=one, args=(item,)) for item in items]
    threads[0].start()
    assert server.serving.wait(WAIT_S)
    for queued, thread in enumerate(threads[1:], start=1):
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while lead.waiting < queued:
            assert time.monotonic() < deadline, "an item was not queued"
            time.sleep(0.005)
    return threads, outcome


def _finish(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a caller still waits"


def test_items_queued_behind_a_batch_are_served_together_in_order_and_once() -> None:
    lead: GroupLead[int] = GroupLead(limit=4)
    server = _Server()
    threads, outcome = _submit_all(lead, server, list(range(7)))
    server.release.set()
    _finish(threads)
    assert outcome == dict.fromkeys(range(7))
    # The first alone (nothing was queued when it came), then the queue by the limit.
    assert server.batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert server.most_concurrent == 1
    assert lead.waiting == 0


def test_a_batch_that_fails_fails_each_of_its_items_and_the_next_batch_is_served() -> None:
    lead: GroupLead[int] = GroupLead(limit=2)
    server = _Server(fail_on=2)
    threads, outcome = _submit_all(lead, server, [0, 1, 2, 3])
    server.release.set()
    _finish(threads)
    assert server.batches == [[0], [1, 2], [3]]
    assert outcome[0] is None and outcome[3] is None
    for item in (1, 2):
        failed = outcome[item]
        assert isinstance(failed, OSError) and "serving 2 failed" in str(failed)


def test_a_lone_item_is_served_by_its_own_caller_at_once() -> None:
    lead: GroupLead[str] = GroupLead(limit=8)
    served: list[tuple[str, str]] = []
    lead.submit(
        "only", lambda batch: served.extend((b, threading.current_thread().name) for b in batch)
    )
    assert served == [("only", threading.current_thread().name)]


def test_a_batch_holds_at_least_one_item() -> None:
    with pytest.raises(ValueError, match="at least one item"):
        GroupLead(limit=0)
