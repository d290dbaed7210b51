"""The reconcile work queue: dedup, one holder per key, backoff, delays, shutdown."""

from __future__ import annotations

import threading

import pytest

from csi_driver.reconcile.queue import WorkQueue


class ManualClock:
    """Time that moves only when the test says (the queue's injected clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def queue(clock: ManualClock) -> WorkQueue:
    return WorkQueue(base_delay_s=1.0, max_delay_s=8.0, clock=clock)


def test_a_key_added_many_times_is_queued_once(queue: WorkQueue) -> None:
    for key in ["a", "b", "a", "a", "c", "b"]:
        queue.add(key)
    assert len(queue) == 3
    assert [queue.get(0), queue.get(0), queue.get(0), queue.get(0)] == ["a", "b", "c", None]


def test_a_key_added_while_held_runs_again_after_done(queue: WorkQueue) -> None:
    queue.add("a")
    assert queue.get(0) == "a"
    queue.add("a")  # the record changed while a worker reconciled it
    assert queue.get(0) is None  # never handed to a second worker meanwhile
    queue.done("a")
    assert queue.get(0) == "a"
    queue.done("a")
    assert queue.get(0) is None


def test_retry_delays_double_up_to_the_cap_and_forget_resets(
    queue: WorkQueue, clock: ManualClock
) -> None:
    delays = []
    for _ in range(6):
        delays.append(queue.retry("a"))
        assert queue.get(0) is None  # not due yet
        clock.now += delays[-1]
        assert queue.get(0) == "a"
        queue.done("a")
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert queue.failures("a") == 6
    queue.forget("a")
    assert queue.failures("a") == 0
    assert queue.retry("a") == 1.0


def test_add_after_keeps_the_earliest_due_time_and_add_runs_at_once(
    queue: WorkQueue, clock: ManualClock
) -> None:
    queue.add_after("a", 5.0)
    queue.add_after("a", 2.0)
    queue.add_after("a", 9.0)
    clock.now += 2.0
    assert queue.get(0) == "a"
    queue.done("a")
    clock.now += 10.0
    assert queue.get(0) is None  # the superseded timers do not fire again
    queue.add_after("b", 30.0)
    queue.add("b")
    assert queue.get(0) == "b"
    queue.done("b")
    clock.now += 30.0
    assert queue.get(0) is None


def test_get_blocks_until_a_key_arrives_from_another_thread() -> None:
    queue = WorkQueue()
    got: list[str | None] = []
    taker = threading.Thread(target=lambda: got.append(queue.get(30.0)))
    taker.start()
    queue.add("x")
    taker.join(30.0)
    assert got == ["x"]


def test_shutdown_wakes_a_blocked_get_and_ignores_later_adds() -> None:
    queue = WorkQueue()
    got: list[str | None] = ["unset"]
    taker = threading.Thread(target=lambda: got.__setitem__(0, queue.get(None)))
    taker.start()
    queue.shutdown()
    taker.join(30.0)
    assert not taker.is_alive() and got == [None]
    queue.add("late")
    assert queue.get(None) is None


def test_each_key_has_one_holder_under_concurrent_workers() -> None:
    queue = WorkQueue()
    holders: dict[str, int] = {}
    overlaps: list[str] = []
    done_count = [0]
    guard = threading.Lock()

    def worker() -> None:
        while (key := queue.get(5.0)) is not None:
            with guard:
                holders[key] = holders.get(key, 0) + 1
                if holders[key] > 1:
                    overlaps.append(key)
            for _ in range(200):
                queue.add(key)  # storms of events for the key being worked on
            with guard:
                holders[key] -= 1
                done_count[0] += 1
            queue.done(key)
            if done_count[0] > 200:
                queue.shutdown()

    for i in range(20):
        queue.add(f"k{i % 4}")
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    assert not overlaps
    assert done_count[0] > 200
