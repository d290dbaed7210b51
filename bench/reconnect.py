"""``python -m bench.reconnect``: how soon a node's heartbeat lands after its link heals.

Brings up a two-node sandbox (etcd by default, ``--catalog sqlite`` for the
controller-served catalog), then ``--repeat`` times for each cut length in
``--cuts-s``: takes node-1's link down (``ferry sandbox cut``), waits that
long, brings it back (``heal``) and waits until the node's heartbeat lands
in the catalog again. A watcher process inside the control namespace reads
node-1's record every ``POLL_S`` and logs each change with the time it saw
it; two intervals are reported per heal, from the heal:

- ``landed``: the first change of the record (a write of the node's reached
  the catalog: it may carry a heartbeat time taken before the heal);
- ``fresh``: the first record whose heartbeat time is after the heal, the
  one that makes the controller count the node ready again.

Times are wall-clock on one machine (the heal, the watcher and the node
share its clock); the poll adds up to ``POLL_S``. Prints the distribution
per cut length and writes JSON (default ``bench/results/reconnect-latest.json``).
Needs root (network namespaces, loop devices) and etcd. With ``FERRY_BENCH_KEEP_LOGS=1``
the sandbox's logs stay (the node's ``heartbeat landed again`` lines say how long it
was silent).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from csi_driver.sandbox.harness import Sandbox
from csi_driver.sandbox.network import in_namespace
from csi_driver.sandbox.plan import CatalogKind, SandboxPlan

POLL_S = 0.02
NODE = "node-1"
#: Past this a heal counts as not recovered (the bench moves on).
GIVE_UP_S = 120.0
ROOT = Path(__file__).resolve().parents[1]

#: Run inside the control namespace: print each change of the node's record.
WATCHER = """
import json, sys, time
from pathlib import Path
from csi_driver.pki import TlsBundle
from csi_driver.sandbox.plan import CONTROLLER
from csi_driver.sandbox.state import StateFile
from csi_driver.store.url import open_store
from csi_driver.store.catalog import NODES
from csi_driver.transport import AgentSecurity

plan = StateFile(Path(sys.argv[1])).require().plan
store = open_store(plan.catalog_url, security=AgentSecurity(TlsBundle.load(plan.tls / CONTROLLER)))
key, poll, seen = NODES + sys.argv[2], float(sys.argv[3]), None
while True:
    try:
        record = store.get(key)
    except Exception:
        time.sleep(poll)
        continue
    if record is not None and record.revision != seen:
        seen = record.revision
        at = json.loads(record.value)["heartbeat_at"]
        print(json.dumps({"seen": time.time(), "heartbeat_at": at}), flush=True)
    time.sleep(poll)
"""


@dataclass(frozen=True)
class Heal:
    cut_s: float
    landed_s: float
    fresh_s: float


def _changes(log: Path) -> list[tuple[float, float]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the line being written
        out.append((float(entry["seen"]), float(entry["heartbeat_at"])))
    return out


def _after_heal(log: Path, healed: float) -> Heal | None:
    landed = fresh = None
    for seen, beat in _changes(log):
        if seen >= healed and landed is None:
            landed = seen - healed
        if beat >= healed and fresh is None:
            fresh = seen - healed
    if landed is None or fresh is None:
        return None
    return Heal(0.0, round(landed, 3), round(fresh, 3))


def _break_connections(sandbox: Sandbox) -> None:
    """End the node's TCP connections, as a long partition ends them (keepalives,
    a peer's reset): its channels then reconnect, under their backoff."""
    namespace = next(s.namespace for s in sandbox.status() if s.name == NODE)
    subprocess.run(
        ["ip", "netns", "exec", namespace, "ss", "-K", "state", "established"],
        check=True,
        capture_output=True,
    )


def _one(sandbox: Sandbox, log: Path, cut_s: float, broken: bool) -> Heal:
    sandbox.cut(NODE)
    if broken:
        _break_connections(sandbox)
    time.sleep(cut_s)
    sandbox.heal(NODE)
    healed = time.time()
    while (found := _after_heal(log, healed)) is None:
        if time.time() - healed > GIVE_UP_S:
            return Heal(cut_s, GIVE_UP_S, GIVE_UP_S)
        time.sleep(0.05)
    # A few quiet beats before the next cut, as between tests.
    time.sleep(3.0)
    return Heal(cut_s, found.landed_s, found.fresh_s)


def _summary(heals: list[Heal]) -> dict[str, float]:
    fresh = sorted(h.fresh_s for h in heals)
    return {
        "n": len(heals),
        "landed_median_s": round(statistics.median(h.landed_s for h in heals), 2),
        "fresh_median_s": round(statistics.median(fresh), 2),
        "fresh_max_s": fresh[-1],
        "fresh_min_s": fresh[0],
    }


def run(catalog: CatalogKind, cuts_s: list[float], repeat: int, broken: bool) -> list[Heal]:
    directory = Path(tempfile.mkdtemp(prefix="fyrc-", dir="/tmp"))
    sandbox = Sandbox(directory)
    plan = SandboxPlan(
        directory=sandbox.directory,
        prefix=f"rc{secrets.token_hex(3)}",
        node_count=2,
        catalog=catalog,
        pool_capacity_bytes=256 * 1024**2,
    )
    heals: list[Heal] = []
    watcher = None
    try:
        sandbox.up(plan)
        log = directory / "logs" / "watcher.jsonl"
        argv = (sys.executable, "-c", WATCHER, str(directory), NODE, str(POLL_S))
        with open(log, "w") as out:
            watcher = subprocess.Popen(
                in_namespace(plan.control.name, argv),
                stdout=out,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        time.sleep(3.0)
        for _ in range(repeat):
            for cut_s in cuts_s:
                heal = _one(sandbox, log, cut_s, broken)
                print(f"cut {cut_s:5.1f} s: landed {heal.landed_s:6.2f} s, "
                      f"fresh {heal.fresh_s:6.2f} s after the heal", flush=True)  # fmt: skip
                heals.append(heal)
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.wait()
        sandbox.down(plan.prefix)
        if os.environ.get("FERRY_BENCH_KEEP_LOGS"):
            print(f"logs kept in {directory / 'logs'}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return heals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconnect", description=__doc__)
    parser.add_argument("--catalog", choices=[k.value for k in CatalogKind], default="etcd")
    parser.add_argument("--cuts-s", type=float, nargs="+", default=[2.0, 7.0, 15.0, 30.0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--break-connections",
        action="store_true",
        help="also end the node's TCP connections when its link is cut",
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results/reconnect-latest.json"))
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    heals = run(CatalogKind(args.catalog), args.cuts_s, args.repeat, args.break_connections)
    by_cut = {str(cut): _summary([h for h in heals if h.cut_s == cut]) for cut in args.cuts_s}
    for cut, summary in by_cut.items():
        print(f"cut {cut} s: {summary}")
    print(f"load average at start: {load:.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "catalog": args.catalog,
                "broken": args.break_connections,
                "load_average": load,
                "summary": by_cut,
                "heals": [asdict(h) for h in heals],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
