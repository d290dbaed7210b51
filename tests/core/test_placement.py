"""Placement decisions (pure functions), example- and property-based."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.core.errors import OutOfRange, ResourceExhausted
from csi_driver.core.model import NodeRecord, Topology, TopologyRequirement
from csi_driver.core.placement import (
    NODE_KEY,
    ZONE_KEY,
    NodeView,
    accessible_segment,
    choose_primary,
)


def view(node_id: str, capacity: int, used: int = 0, zone: str = "z1") -> NodeView:
    topo = Topology.of({ZONE_KEY: zone, NODE_KEY: node_id})
    return NodeView(NodeRecord(node_id, "unix:///x", topo, capacity, 0), used, 0)


def seg(**kv: str) -> Topology:
    keys = {"zone": ZONE_KEY, "node": NODE_KEY}
    return Topology.of({keys[k]: v for k, v in kv.items()})


def test_most_free_wins_without_requirements() -> None:
    nodes = [view("a", 100, 90), view("b", 100, 10), view("c", 100, 50)]
    assert choose_primary(nodes, 5, None).node_id == "b"


def test_ties_go_to_smallest_node_id() -> None:
    nodes = [view("b", 100), view("a", 100), view("c", 100)]
    assert choose_primary(nodes, 5, None).node_id == "a"


def test_preferred_selected_node_wins_when_it_has_room() -> None:
    nodes = [view("a", 100), view("b", 1000)]
    req = TopologyRequirement(requisite=(seg(zone="z1"),), preferred=(seg(node="a"),))
    assert choose_primary(nodes, 50, req).node_id == "a"


def test_preferred_node_without_room_falls_back() -> None:
    nodes = [view("a", 100, 80), view("b", 1000)]
    req = TopologyRequirement(requisite=(seg(zone="z1"),), preferred=(seg(node="a"),))
    assert choose_primary(nodes, 50, req).node_id == "b"


def test_requisite_limits_candidates() -> None:
    nodes = [view("a", 100, zone="z1"), view("b", 1000, zone="z2")]
    req = TopologyRequirement(requisite=(seg(zone="z1"),))
    assert choose_primary(nodes, 50, req).node_id == "a"


def test_no_matching_node_is_resource_exhausted() -> None:
    with pytest.raises(ResourceExhausted, match="topology"):
        choose_primary([view("a", 100)], 1, TopologyRequirement(requisite=(seg(zone="nope"),)))


def test_too_big_for_any_pool_is_out_of_range() -> None:
    with pytest.raises(OutOfRange):
        choose_primary([view("a", 100), view("b", 200)], 201, None)


def test_fits_a_pool_but_not_its_free_space_is_exhausted() -> None:
    with pytest.raises(ResourceExhausted):
        choose_primary([view("a", 100, 60), view("b", 200, 190)], 50, None)


def test_accessible_segment_is_the_zone_not_the_node() -> None:
    node = view("a", 1, zone="east").node
    assert accessible_segment(node) == Topology.of({ZONE_KEY: "east"})


@given(
    st.lists(
        st.tuples(st.integers(1, 10_000), st.integers(0, 10_000), st.sampled_from(["z1", "z2"])),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 12_000),
    st.sampled_from([None, "z1", "z2"]),
)
def test_choice_always_fits_and_respects_requisite(
    specs: list[tuple[int, int, str]], size: int, zone: str | None
) -> None:
    nodes = [view(f"n{i}", cap, min(used, cap), z) for i, (cap, used, z) in enumerate(specs)]
    req = TopologyRequirement(requisite=(seg(zone=zone),)) if zone else None
    try:
        chosen = choose_primary(nodes, size, req)
    except (OutOfRange, ResourceExhausted):
        allowed = [n for n in nodes if zone is None or n.node.topology.as_dict()[ZONE_KEY] == zone]
        assert all(n.free_bytes < size for n in allowed)
        return
    chosen_view = next(n for n in nodes if n.node == chosen)
    assert chosen_view.free_bytes >= size
    if zone:
        assert chosen.topology.as_dict()[ZONE_KEY] == zone
    fitting = [
        n
        for n in nodes
        if n.free_bytes >= size
        and n.node.topology.satisfies(seg(zone=zone) if zone else Topology())
    ]
    assert chosen_view.free_bytes == max(n.free_bytes for n in fitting)
