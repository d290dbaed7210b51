"""A node cut off from its catalog beats again within seconds of the heal.

A real sandbox on SQLite (the controller serves its catalog to the nodes over
the bridge, mutual TLS): node-1's link goes down and its TCP connections end,
as a long partition ends them, so its channel to the catalog reconnects
under its backoff for the whole cut. gRPC's default backoff grows 1.6x per
failed attempt (up to two minutes), so after a cut of ``CUT_S`` the next
attempt is typically many seconds past the heal, and the controller counts
the node not ready meanwhile (CreateVolume: RESOURCE_EXHAUSTED naming it).
Ferry's channels bound it (``transport.LINK_OPTIONS``): the heartbeat lands
within ``HEAL_BOUND_S`` of the heal, a liveness bound far below what the
default backoff leaves at this point (not a speed claim: ``bench.reconnect``
measures that). The heartbeat is read from the catalog's file itself.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox.conftest import Place, requires_host

pytestmark = [requires_host, pytest.mark.root, pytest.mark.slow]

NODE = "node-1"
#: Long enough for the default backoff to have grown past the bound several times.
CUT_S = 35.0
#: The node beats every second in a sandbox; a reconnect is at most a second away.
HEAL_BOUND_S = 5.0


def _heartbeat_at(catalog: Path, node: str) -> float:
    """The node's last heartbeat as the catalog holds it (read-only, beside the
    controller that writes it: SQLite's WAL admits readers in other processes)."""
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=5) as conn:
        row = conn.execute("SELECT value FROM kv WHERE key = ?", (f"nodes/{node}",)).fetchone()
    assert row is not None, f"{node} is not registered"
    return float(json.loads(row[0])["heartbeat_at"])


def test_a_cut_nodes_heartbeat_lands_within_seconds_of_the_heal(place: Place) -> None:
    place.sandbox("up", "--nodes", "1", "--prefix", place.prefix, "--catalog", "sqlite")
    catalog = place.directory / "controller" / "catalog.db"
    assert time.time() - _heartbeat_at(catalog, NODE) < HEAL_BOUND_S

    assert place.fault("cut", NODE)["STATE"] == "cut"
    place.end_connections(NODE)
    time.sleep(CUT_S)
    silent_since = _heartbeat_at(catalog, NODE)
    assert time.time() - silent_since > CUT_S - HEAL_BOUND_S, "a heartbeat landed while cut"

    assert place.fault("heal", NODE)["STATE"] == "alive"
    healed = time.time()
    while _heartbeat_at(catalog, NODE) < healed:
        waited = time.time() - healed
        assert waited < HEAL_BOUND_S, f"no heartbeat landed within {waited:.1f} s of the heal"
        time.sleep(0.05)
    # The node's log says how long it was silent (for whoever reads why it was not ready).
    # (It logs that just after the write lands.)
    while not (back := _logged(place, NODE, "heartbeat landed again")):
        assert time.time() - healed < 2 * HEAL_BOUND_S, "the node never logged its return"
        time.sleep(0.05)
    assert float(back[-1]["silent_s"]) > CUT_S - HEAL_BOUND_S, back


def _logged(place: Place, node: str, message: str) -> list[dict[str, Any]]:
    entries = []
    text = (place.directory / "logs" / f"{node}.log").read_text()
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if entry.get("msg") == message:
            entries.append(entry)
    return entries
