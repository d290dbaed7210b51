"""One shared store watch per prefix (``WatchHub``), on a real etcd, the catalog service
and SQLite (whose watches are the store's own: it shares their source already).

The hub must keep the store's watch contract for every subscriber, from its
own revision: every event once, in order, whole revisions. What it decides
about compaction (docs/decisions/0004): a subscriber behind the shared
stream catches up on a watch of its own and gets ``Compacted`` exactly when
the store would; one at or ahead of the stream is served by it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from csi_driver.core.errors import Compacted, StoreUnavailable
from csi_driver.store.base import CatalogStore, Delete, Event, EventType, Put, Watch
from csi_driver.store.watch import WatchHub
from tests.store.backends import Backend
from tests.store.test_contract import EVENT_WAIT_S, _drain, _quiet

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "etcd", "ferry"], indirect=True)

PREFIX = "hub/"
T = TypeVar("T")


@pytest.fixture
def hub(store: CatalogStore) -> Iterator[WatchHub]:
    shared = WatchHub(store)
    yield shared
    assert shared.streams() == 0, "a shared stream outlived its subscribers"


def _seen(events: list[Event]) -> list[tuple[EventType, str, int]]:
    return [(e.type, e.key, e.revision) for e in events]


def test_subscribers_of_one_prefix_share_one_stream_and_each_sees_every_event_once(
    backend: Backend, store: CatalogStore, hub: WatchHub
) -> None:
    start = store.revision() + 1
    watches = [hub.watch(PREFIX, start) for _ in range(3)]
    other = hub.watch("elsewhere/", start)
    # A stream per prefix where watches are streams (etcd, the catalog service);
    # SQLite's own watches already read each commit once for the whole process.
    assert hub.sharing is (backend.name != "sqlite")
    assert hub.streams() == (2 if hub.sharing else 0)
    r1 = store.put(PREFIX + "a", b"1")
    store.put("elsewhere/x", b"-")
    r2 = store.txn([], [Put(PREFIX + "b", b"2"), Delete(PREFIX + "a"), Put(PREFIX + "c", b"3")])
    r3 = store.put(PREFIX + "b", b"4")
    expected = [
        Event(EventType.PUT, PREFIX + "a", b"1", r1),
        Event(EventType.PUT, PREFIX + "b", b"2", r2),
        Event(EventType.DELETE, PREFIX + "a", b"", r2),
        Event(EventType.PUT, PREFIX + "c", b"3", r2),
        Event(EventType.PUT, PREFIX + "b", b"4", r3),
    ]
    for watch in watches:
        assert _drain(watch, 5) == expected
        _quiet(watch)
        assert watch.next_revision == r3 + 1
    assert [e.key for e in _drain(other, 1)] == ["elsewhere/x"]
    for watch in [*watches, other]:
        watch.close()


def test_a_late_joiner_catches_up_then_shares_the_stream_missing_and_repeating_nothing(
    store: CatalogStore, hub: WatchHub
) -> None:
    start = store.revision() + 1
    early = hub.watch(PREFIX, start)
    written = [store.put(f"{PREFIX}k{i}", str(i).encode()) for i in range(5)]
    _drain(early, 5)  # the stream's position is now past every one of them
    late = hub.watch(PREFIX, written[1])
    assert hub.streams() == (1 if hub.sharing else 0)
    assert [e.revision for e in _drain(late, 4)] == written[1:]
    _quiet(late)  # nothing new: still on its own watch, waiting
    both = store.txn([], [Put(PREFIX + "k5", b"5"), Delete(PREFIX + "k0")])
    last = store.put(PREFIX + "k6", b"6")
    tail = [(EventType.PUT, PREFIX + "k5", both), (EventType.DELETE, PREFIX + "k0", both)]
    tail.append((EventType.PUT, PREFIX + "k6", last))
    for watch in (late, early):
        assert _seen(_drain(watch, 3)) == tail
        _quiet(watch)
        assert watch.next_revision == last + 1
    # A joiner that starts behind while writes go on sees each revision once too.
    racing = hub.watch(PREFIX, written[3])
    more = [store.put(f"{PREFIX}m{i}", b"m") for i in range(3)]
    revisions = [e.revision for e in _drain(racing, 8)]
    assert revisions == [written[3], written[4], both, both, last, *more]
    _quiet(racing)
    for watch in (early, late, racing):
        watch.close()


def _poll_until_error(watch: Watch) -> None:
    """Poll ``watch`` until it raises; fail the test if it never does."""
    events: list[Event] = []
    deadline = time.monotonic() + EVENT_WAIT_S
    while time.monotonic() < deadline:
        event = watch.poll(0.5)
        if event is not None:
            events.append(event)
    raise AssertionError(f"the watch never failed; it delivered {events}")


def test_a_joiner_ahead_of_the_stream_sees_nothing_before_its_revision(
    store: CatalogStore, hub: WatchHub
) -> None:
    """A joiner from just after a write the stream has not fanned out yet (an
    informer's list, then its watch): each round races the stream, and must see
    only the write after its revision."""
    keeper = hub.watch(PREFIX, store.revision() + 1)
    for i in range(30):
        listed = store.put(f"{PREFIX}listed{i}", b"v")
        with hub.watch(PREFIX, listed + 1) as joiner:
            wanted = store.put(f"{PREFIX}wanted{i}", b"v")
            assert [e.revision for e in _drain(joiner, 1)] == [wanted]
    assert len(_drain(keeper, 60)) == 60
    keeper.close()


def test_a_late_joiner_whose_revision_was_compacted_gets_compacted(
    store: CatalogStore, hub: WatchHub
) -> None:
    start = store.revision() + 1
    early = hub.watch(PREFIX, start)
    r1, r2, r3 = (store.put(PREFIX + k, b"v") for k in "abc")
    _drain(early, 3)
    store.compact(r2)
    with pytest.raises(Compacted) as gone:
        late = hub.watch(PREFIX, r1)  # SQLite says so at once, etcd on the stream
        try:
            _poll_until_error(late)
        finally:
            late.close()
    assert gone.value.compact_revision == r2
    # Behind the stream but not compacted: served, from its own revision.
    with hub.watch(PREFIX, r2) as behind:
        assert [e.revision for e in _drain(behind, 2)] == [r2, r3]
    early.close()


def test_a_joiner_at_the_streams_position_is_served_though_the_store_compacted_past_it(
    store: CatalogStore, hub: WatchHub
) -> None:
    """The decided difference: the stream followed the prefix without a break since
    before the joiner's revision, so no history the joiner needs is gone."""
    early = hub.watch(PREFIX, store.revision() + 1)
    if not hub.sharing:
        early.close()
        pytest.skip("SQLite's watches are its own: a compacted revision is Compacted there")
    r1 = store.put(PREFIX + "a", b"1")
    _drain(early, 1)
    position = r1 + 1
    store.put("elsewhere/x", b"-")
    compacted_to = store.put("elsewhere/y", b"-")
    store.compact(compacted_to)
    with pytest.raises(Compacted), store.watch(PREFIX, position) as direct:
        _poll_until_error(direct)
    joiner = hub.watch(PREFIX, position)
    r4 = store.put(PREFIX + "b", b"2")
    for watch in (joiner, early):
        assert _seen(_drain(watch, 1)) == [(EventType.PUT, PREFIX + "b", r4)]
        _quiet(watch)
        watch.close()


def test_a_first_joiner_from_compacted_history_gets_compacted_and_no_stream_stays(
    store: CatalogStore, hub: WatchHub
) -> None:
    r1 = store.put(PREFIX + "a", b"1")
    r2 = store.put(PREFIX + "a", b"2")
    store.compact(r2)
    with pytest.raises(Compacted):
        first = hub.watch(PREFIX, r1)
        try:
            _poll_until_error(first)
        finally:
            first.close()
    assert hub.streams() == 0
    with hub.watch(PREFIX, r2) as after:
        assert [e.revision for e in _drain(after, 1)] == [r2]


def test_a_lost_stream_resumes_every_subscriber_without_gap_or_repeat(
    backend: Backend,
) -> None:
    if backend.name == "sqlite":
        pytest.skip("an embedded store's watch is not a stream that can be lost")
    store = backend.open()
    hub = WatchHub(store)
    start = store.revision() + 1
    subscribers = [hub.watch(PREFIX, start) for _ in range(3)]
    before = [store.put(f"{PREFIX}b{i}", b"v") for i in range(2)]
    # Each consumer stands elsewhere when the stream breaks: all, one, none consumed.
    seen = [_drain(subscribers[0], 2), _drain(subscribers[1], 1), []]
    backend.restart()  # etcd or the catalog service stops and starts: the stream breaks
    resumed: list[Watch] = []
    for watch, events in zip(subscribers, seen, strict=True):
        with pytest.raises(StoreUnavailable):
            while True:
                event = watch.poll(EVENT_WAIT_S)
                assert event is not None, "the broken stream was never reported"
                events.append(event)
        resumed.append(_resume(hub, watch.next_revision))
        watch.close()
    both = _retrying(lambda: store.txn([], [Put(PREFIX + "a1", b"1"), Put(PREFIX + "a2", b"2")]))
    after = _retrying(lambda: store.put(PREFIX + "a3", b"3"))
    everything = [*before, both, both, after]
    for watch, events in zip(resumed, seen, strict=True):
        events += _drain(watch, len(everything) - len(events))
        _quiet(watch)
        assert [e.revision for e in events] == everything
        watch.close()
    assert hub.streams() == 0


def _resume(hub: WatchHub, revision: int) -> Watch:
    """Watch again, waiting out the restarting etcd (an informer's retry)."""
    return _retrying(lambda: hub.watch(PREFIX, revision))


def _retrying(attempt: Callable[[], T]) -> T:
    deadline = time.monotonic() + 4 * EVENT_WAIT_S
    while True:
        try:
            return attempt()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
