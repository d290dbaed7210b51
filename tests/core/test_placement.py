"""Placement decisions (pure functions), example- and property-based."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.core.errors import OutOfRange, ResourceExhausted
from csi_driver.core.model import NodeRecord, Topology, TopologyRequirement
from csi_driver.core.placement import (
    NODE_KEY,
    ZONE_KEY,
    NodeReadiness,
    NodeView,
    ReplicaPlan,
    accessible_segment,
    choose_primary,
    choose_replicas,
    place_volume,
    plan_replicas,
)

RACK_KEY = "topology.kubernetes.io/rack"
READY, NOT_READY, LEAVING = NodeReadiness.READY, NodeReadiness.NOT_READY, NodeReadiness.LEAVING


def view(
    node_id: str,
    capacity: int,
    used: int = 0,
    zone: str = "z1",
    readiness: NodeReadiness = READY,
    rack: str | None = None,
) -> NodeView:
    labels = {ZONE_KEY: zone, NODE_KEY: node_id} | ({RACK_KEY: rack} if rack else {})
    topo = Topology.of(labels)
    return NodeView(NodeRecord(node_id, "unix:///x", topo, capacity, 0), used, 0, readiness)


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


# -- readiness and replicas ----------------------------------------------------------


def test_primary_is_never_a_node_that_is_not_ready() -> None:
    nodes = [
        view("a", 1000, readiness=NOT_READY),
        view("b", 100),
        view("c", 9000, readiness=LEAVING),
    ]
    assert choose_primary(nodes, 50, None).node_id == "b"
    with pytest.raises(ResourceExhausted, match="ready"):
        choose_primary(nodes[:1], 50, None)


def test_no_ready_requisite_node_names_each_node_and_why() -> None:
    nodes = [
        replace(view("a", 1000, readiness=LEAVING), why="drained (ferry drain)"),
        replace(view("b", 1000, readiness=NOT_READY), why="Ferry agent silent for 25s"),
        view("c", 1000),
    ]
    req = TopologyRequirement(requisite=(seg(node="a"), seg(node="b")))
    with pytest.raises(ResourceExhausted) as caught:
        choose_primary(nodes, 50, req)
    message = caught.value.message
    assert "a (drained (ferry drain)), b (Ferry agent silent for 25s)" in message
    assert "c (" not in message and "ferry drain NODE --undo" in message
    many = [view(f"n{i:02}", 1000, readiness=NOT_READY) for i in range(10)]
    with pytest.raises(ResourceExhausted, match=r"n07 \(not-ready\), 2 more\."):
        choose_primary(many, 50, None)


def test_replicas_never_beside_a_copy_and_only_where_they_fit() -> None:
    nodes = [view("a", 100), view("b", 100, 90), view("c", 100, 20), view("d", 100)]
    # a holds the primary; b lacks room; d and c have room, d the most.
    assert choose_replicas(nodes, 50, ["a"], 2) == ("d", "c")
    assert choose_replicas(nodes, 50, ["a"], 5) == ("d", "c")
    assert choose_replicas(nodes, 50, ["a", "d"], 1) == ("c",)
    assert choose_replicas(nodes, 50, ["a"], 0) == ()


def test_replicas_spread_across_failure_domains_before_free_space() -> None:
    nodes = [
        view("a", 100, rack="r1"),
        view("b", 900, rack="r1"),
        view("c", 200, rack="r2"),
        view("d", 300, rack="r3"),
    ]
    # b has the most room but shares a's rack: the other racks come first.
    assert choose_replicas(nodes, 50, ["a"], 3) == ("d", "c", "b")


def test_replicas_stay_within_the_volumes_topology() -> None:
    nodes = [view("a", 100, zone="z1"), view("b", 100, zone="z1"), view("c", 900, zone="z2")]
    placed = place_volume(nodes, 50, None, 2)
    # A volume is reported accessible from its primary's zone: a replica in
    # another zone could never serve its pod.
    assert placed.primary == "c"
    assert placed.replicas == ()
    assert placed.missing == 2
    placed = place_volume(nodes, 50, TopologyRequirement(preferred=(seg(node="a"),)), 2)
    assert (placed.primary, placed.replicas, placed.missing) == ("a", ("b",), 1)


def test_replicas_skip_nodes_that_are_not_ready() -> None:
    nodes = [view("a", 100), view("b", 900, readiness=NOT_READY), view("c", 900, readiness=LEAVING)]
    assert choose_replicas(nodes, 10, ["a"], 2) == ()


def test_plan_is_settled_when_the_replicas_match_the_policy() -> None:
    nodes = [view("a", 100), view("b", 100), view("c", 100)]
    assert plan_replicas(nodes, 10, "a", ["b", "c"], 2) == ReplicaPlan(("b", "c"), (), (), 0)
    assert plan_replicas(nodes, 10, "a", ["b", "c"], 2).settled


def test_plan_replaces_a_replica_on_a_leaving_or_vanished_node() -> None:
    nodes = [view("a", 100), view("b", 100, readiness=LEAVING), view("c", 100), view("d", 50)]
    plan = plan_replicas(nodes, 10, "a", ["b", "gone"], 2)
    assert plan == ReplicaPlan((), ("b", "gone"), ("c", "d"), 0)


def test_plan_keeps_a_replica_on_a_node_that_is_only_not_ready() -> None:
    nodes = [view("a", 100), view("b", 100, readiness=NOT_READY), view("c", 100)]
    assert plan_replicas(nodes, 10, "a", ["b"], 1) == ReplicaPlan(("b",), (), (), 0)


def test_plan_retires_a_replica_whose_node_cannot_hold_the_growth() -> None:
    nodes = [view("a", 100), view("b", 100, 95), view("c", 100, 30)]
    plan = plan_replicas(nodes, 10, "a", ["b"], 1, growth_bytes=20)
    # b has 5 bytes free, the growth needs 20; c takes the grown copy (30 bytes).
    assert plan == ReplicaPlan((), ("b",), ("c",), 0)


def test_plan_retires_a_replica_on_the_primary_node_after_a_move() -> None:
    nodes = [view("a", 100), view("b", 100), view("c", 100)]
    plan = plan_replicas(nodes, 10, "b", ["a", "b"], 2)
    assert plan == ReplicaPlan(("a",), ("b",), ("c",), 0)


def test_fewer_wanted_retires_the_least_useful_first() -> None:
    nodes = [
        view("p", 100, rack="r1"),
        view("b", 100, rack="r1"),
        view("c", 100, rack="r2"),
        view("d", 100, rack="r3", readiness=NOT_READY),
    ]
    assert plan_replicas(nodes, 10, "p", ["b", "c", "d"], 2).retire == ("d",)
    assert plan_replicas(nodes, 10, "p", ["b", "c", "d"], 1) == ReplicaPlan(
        ("c",), ("b", "d"), (), 0
    )
    assert plan_replicas(nodes, 10, "p", ["b", "c", "d"], 0).retire == ("b", "c", "d")


def test_plan_re_places_a_replica_whose_node_reported_no_room() -> None:
    nodes = [view("a", 100), view("b", 100), view("c", 100)]
    plan = plan_replicas(nodes, 10, "a", ["b"], 1, no_room=["b"])
    assert plan == ReplicaPlan((), ("b",), ("c",), 0)


def test_more_wanted_than_nodes_reports_what_is_missing() -> None:
    nodes = [view("a", 100), view("b", 100)]
    assert plan_replicas(nodes, 10, "a", [], 3) == ReplicaPlan((), (), ("b",), 2)


# -- properties ----------------------------------------------------------------------

_node_specs = st.lists(
    st.tuples(
        st.integers(1, 1_000),  # capacity
        st.integers(0, 1_000),  # used
        st.sampled_from(["z1", "z2"]),
        st.sampled_from(["r1", "r2", "r3"]),
        st.sampled_from(list(NodeReadiness)),
    ),
    min_size=1,
    max_size=7,
)


def _views(specs: list[tuple[int, int, str, str, NodeReadiness]]) -> list[NodeView]:
    return [
        view(f"n{i}", cap, min(used, cap), zone, ready, rack)
        for i, (cap, used, zone, rack, ready) in enumerate(specs)
    ]


@given(_node_specs, st.integers(1, 600), st.integers(0, 4), st.randoms(use_true_random=False))
def test_placement_never_doubles_up_never_overfills_and_is_deterministic(
    specs: list[tuple[int, int, str, str, NodeReadiness]],
    size: int,
    replicas: int,
    rng: random.Random,
) -> None:
    nodes = _views(specs)
    try:
        placed = place_volume(nodes, size, None, replicas)
    except (OutOfRange, ResourceExhausted):
        assert all(n.free_bytes < size or n.readiness is not READY for n in nodes)
        return
    copies = [placed.primary, *placed.replicas]
    assert len(set(copies)) == len(copies)
    by_id = {n.node.node_id: n for n in nodes}
    for node_id in copies:
        assert by_id[node_id].free_bytes >= size
        assert by_id[node_id].readiness is READY
    assert len(placed.replicas) + placed.missing == replicas
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    assert place_volume(shuffled, size, None, replicas) == placed


@given(
    _node_specs,
    st.integers(1, 600),
    st.integers(0, 200),
    st.integers(0, 4),
    st.data(),
    st.randoms(use_true_random=False),
)
def test_replanning_never_doubles_up_never_overfills_and_is_deterministic(
    specs: list[tuple[int, int, str, str, NodeReadiness]],
    size: int,
    growth: int,
    wanted: int,
    data: st.DataObject,
    rng: random.Random,
) -> None:
    nodes = _views(specs)
    ids = [n.node.node_id for n in nodes] + ["gone"]
    primary = data.draw(st.sampled_from(ids))
    current = data.draw(st.lists(st.sampled_from(ids), max_size=5))
    full = data.draw(st.lists(st.sampled_from(ids), max_size=2))
    plan = plan_replicas(nodes, size, primary, current, wanted, growth_bytes=growth, no_room=full)
    # A node that reported no room for this copy keeps none and gets none.
    assert not set(full) & (set(plan.keep) | set(plan.add))
    after = [primary, *plan.keep, *plan.add]
    # Never two copies on one node, not even while retiring copies still exist.
    assert len(set(after)) == len(after)
    assert not set(plan.add) & set(plan.retire)
    assert set(plan.keep) | set(plan.retire) == set(current)
    assert not set(plan.keep) & set(plan.retire)
    by_id = {n.node.node_id: n for n in nodes}
    for node_id in plan.add:
        assert by_id[node_id].free_bytes >= size + growth
        assert by_id[node_id].readiness is READY
    for node_id in plan.keep:
        assert by_id[node_id].free_bytes >= growth
        assert by_id[node_id].readiness is not LEAVING
    assert len(plan.keep) + len(plan.add) + plan.missing == wanted
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    assert (
        plan_replicas(shuffled, size, primary, current, wanted, growth_bytes=growth, no_room=full)
        == plan
    )
    # Carrying a plan out (the new copies and the growth charged) settles it.
    charged = {**{k: growth for k in plan.keep}, **{a: size + growth for a in plan.add}}
    after_views = [
        replace(n, provisioned_bytes=n.provisioned_bytes + charged.get(n.node.node_id, 0))
        for n in nodes
    ]
    again = plan_replicas(
        after_views, size + growth, primary, [*plan.keep, *plan.add], wanted, no_room=full
    )
    assert (again.add, again.retire) == ((), ())
