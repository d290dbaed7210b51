"""``python -m bench.mobility``: what a planned move costs the pod, with and without a warm replica.

Brings up the three-node sandbox (etcd, a controller, three node processes
in network namespaces, mutual TLS, loop devices) with the nodes' pools on
one xfs filesystem (``reflink=1``) on a loop device, what pools are meant to
be (``--pool-fs host``: the work directory's own filesystem, ext4 here, where
every capture hashes the whole image), and plays kubelet and the
external-attacher over the real CSI sockets, ``--repeat`` times per case and
per volume size (``--sizes-mib``; half of each volume is written):

1. a volume is created on node-1, attached, staged and published, and
   ``--data-mib`` of random data is written into it (fsynced);
2. with a warm replica (``replicas: 1``, ``rpoSeconds: 1``): the bench
   waits until the replica holds a capture, then writes ``--tail-mib``
   more, the changes a move's final sync has to ship; without one
   (``replicas: 0``) the move copies the whole image;
3. the pod leaves node-1 (unpublish, unstage, ControllerUnpublish), and
   the clock runs from ControllerPublishVolume on the new node (the
   replica's node, or node-2) to NodePublishVolume done there, publishes
   retried while they answer ABORTED as the external-attacher does.

The downtime is that interval (median and max). Bytes shipped by the
final sync are the move record's ``final_bytes``. The node services' peak
RSS during the move is each node process's (and its children's) VmHWM,
reset just before the publish by writing ``5`` to ``/proc/PID/clear_refs``
and read after the mount, so it is the move's high-water mark, not the
process's since start; the largest over the nodes is reported. "CPU s" is
the user + system time of the node services and the controller over the
downtime (``/proc/PID/stat``, exited children included): steadier than wall
time on a shared machine.

Prints a table and writes JSON (default ``bench/results/mobility-latest.json``).
Needs root (network namespaces, loop devices, mounts) and etcd.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from csi_driver.gen import csi_pb2
from csi_driver.sandbox.demo import Demo
from csi_driver.sandbox.harness import Sandbox
from csi_driver.sandbox.plan import SandboxPlan
from csi_driver.sandbox.scratch import scratch_filesystem

MiB = 1024 * 1024
NODES = ("node-1", "node-2", "node-3")


@dataclass(frozen=True)
class Move:
    warm: bool
    target: str
    downtime_s: float
    attach_s: float  # of which ControllerPublishVolume, retries included
    final_bytes: int
    peak_rss_bytes: int  # the largest node's VmHWM over the move
    cpu_s: float = 0.0  # the nodes' and the controller's CPU over the downtime


@dataclass(frozen=True)
class Case:
    warm: bool
    volume_bytes: int
    data_bytes: int
    tail_bytes: int
    moves: tuple[Move, ...]

    @property
    def median_s(self) -> float:
        return round(statistics.median(m.downtime_s for m in self.moves), 3)

    @property
    def max_s(self) -> float:
        return round(max(m.downtime_s for m in self.moves), 3)

    @property
    def median_attach_s(self) -> float:
        return round(statistics.median(m.attach_s for m in self.moves), 3)

    @property
    def median_final_bytes(self) -> int:
        return int(statistics.median(m.final_bytes for m in self.moves))

    @property
    def peak_rss_bytes(self) -> int:
        return max(m.peak_rss_bytes for m in self.moves)

    @property
    def median_cpu_s(self) -> float:
        return round(statistics.median(m.cpu_s for m in self.moves), 2)


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def _node_pids(sandbox: Sandbox) -> dict[str, list[int]]:
    return {s.name: _descendants(s.pid) for s in sandbox.status() if s.name in NODES and s.pid}


def _cpu_s(sandbox: Sandbox) -> float:
    """CPU seconds (user + system, exited children included) of the node services
    and the controller so far."""
    ticks = 0
    for member in sandbox.status():
        if member.name not in (*NODES, "controller") or not member.pid:
            continue
        try:
            fields = Path(f"/proc/{member.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _reset_peaks(pids: dict[str, list[int]]) -> None:
    for group in pids.values():
        for pid in group:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS
            except OSError:
                continue  # a child that ended


def _peak_rss(pids: dict[str, list[int]]) -> int:
    """The largest node's summed VmHWM (bytes) since the last reset."""
    peaks = []
    for group in pids.values():
        total = 0
        for pid in group:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        peaks.append(total)
    return max(peaks, default=0)


def _write(path: Path, size: int) -> None:
    block = os.urandom(4 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for offset in range(0, size, len(block)):
            os.write(fd, block[: min(len(block), size - offset)])
            block = os.urandom(len(block))
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(demo: Demo, size: int, replicas: int) -> str:
    parameters = {"replicas": str(replicas)}
    if replicas:
        parameters["rpoSeconds"] = "1"
    ends = time.monotonic() + 120
    while True:
        try:
            return demo.create(size, parameters)
        except grpc.RpcError as exc:
            # The last volume's replicas are released by the collector's sweep, after
            # DeleteVolume answered: wait for their space rather than size pools for both.
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > ends:
                raise
            time.sleep(1.0)


def _delete(demo: Demo, volume_id: str) -> None:
    with demo.client("controller") as csi:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=120)


def _warm_replica(demo: Demo, volume_id: str, written_at: float) -> str:
    """The replica's node once it holds a capture taken after ``written_at``."""

    def warm() -> dict[str, Any] | None:
        replicas = demo.volume(volume_id)["replicas"]
        # lag_s is the age of the replica's capture when `ferry volumes` read it
        since = time.time() - written_at - 0.5
        return next((r for r in replicas if r["synced"] and r["lag_s"] < since), None)

    replica: dict[str, Any] = demo.wait("a warm replica", warm, timeout_s=120)
    return str(replica["node_id"])


def _attach(demo: Demo, volume_id: str, node: str) -> dict[str, str]:
    """The demo's attach, also retried when its reply missed the attacher's deadline
    (a busy machine), as the external-attacher retries it."""
    ends = time.monotonic() + 300
    while True:
        try:
            return demo.attach(volume_id, node)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() > ends:
                raise
            demo.say("  attacher retries: ControllerPublishVolume missed its deadline")


def one_move(demo: Demo, warm: bool, size: int, data: int, tail: int) -> Move:
    volume_id = _create(demo, size, 1 if warm else 0)
    mounted = demo.mount(volume_id, "node-1", _attach(demo, volume_id, "node-1"))
    _write(mounted / "data", data)
    target = _warm_replica(demo, volume_id, time.time()) if warm else "node-2"
    if tail:
        _write(mounted / "tail", tail)
    demo.unmount(volume_id, "node-1")
    demo.detach(volume_id, "node-1")
    pids = _node_pids(demo.sandbox)
    _reset_peaks(pids)
    cpu = _cpu_s(demo.sandbox)
    started = time.monotonic()
    context = _attach(demo, volume_id, target)
    attached = time.monotonic() - started
    demo.mount(volume_id, target, context)
    downtime = time.monotonic() - started
    cpu = _cpu_s(demo.sandbox) - cpu
    peak = _peak_rss(pids)
    move = demo.volume(volume_id)["move"]
    if not move or move["step"] not in ("switched", "done"):
        raise RuntimeError(f"the volume's last move did not finish: {move}")
    demo.unmount(volume_id, target)
    demo.detach(volume_id, target)
    _delete(demo, volume_id)
    return Move(
        warm,
        target,
        round(downtime, 3),
        round(attached, 3),
        int(move["final_bytes"]),
        peak,
        round(cpu, 2),
    )


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    data: int  # 0: half of each volume
    tail: int
    repeat: int
    cases: tuple[bool, ...] = (True, False)  # warm, cold
    pool_fs: str = "xfs"
    keep_logs: Path | None = None  # copy the sandbox's logs here at the end

    def data_for(self, size: int) -> int:
        return self.data or size // 2


#: The node pools' filesystem: xfs with reflink, what operations.md asks pools to be.
XFS_REFLINK = ("mkfs.xfs", "-q", "-m", "reflink=1")


def run(work: Path, settings: Settings) -> list[Case]:
    with contextlib.ExitStack() as stack:
        largest = max(settings.sizes)
        # Room on each pool for a volume, its replica and the last volume's, released late.
        capacity = max(2 * 1024**3, 3 * largest)
        if settings.pool_fs == "xfs":
            # A sparse backing file: only what the nodes write takes space.
            work = stack.enter_context(
                scratch_filesystem(work, 3 * capacity + 1024**3, XFS_REFLINK, "pools")
            )
        sandbox = Sandbox(work)
        plan = SandboxPlan(work, f"bm{secrets.token_hex(3)}", 3, pool_capacity_bytes=capacity)
        demo = Demo(sandbox)
        cases = []
        try:
            sandbox.up(plan)
            for size in settings.sizes:
                data = settings.data_for(size)
                for warm in settings.cases:
                    moves = []
                    for n in range(settings.repeat):
                        moves.append(one_move(demo, warm, size, data, settings.tail))
                        m = moves[-1]
                        demo.say(
                            f"{size // MiB} MiB, {'warm' if warm else 'cold'} move {n + 1}: "
                            f"{m.downtime_s:.2f} s (attach {m.attach_s:.2f} s), "
                            f"final sync {m.final_bytes / MiB:.1f} MiB, peak RSS "
                            f"{m.peak_rss_bytes / MiB:.0f} MiB, CPU {m.cpu_s:.2f} s"
                        )
                    tail = settings.tail if warm else 0
                    cases.append(Case(warm, size, data, tail, tuple(moves)))
        finally:
            sandbox.down(plan.prefix)
            if settings.keep_logs is not None:
                shutil.copytree(plan.logs, settings.keep_logs, dirs_exist_ok=True)
        return cases


def render(cases: list[Case]) -> str:
    lines = [
        "| replica | volume | data | written after the last capture | downtime median "
        "| max | of which attach (median) | final sync (median) | node peak RSS "
        "| CPU s (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {'warm' if c.warm else 'none'} | {c.volume_bytes // MiB} MiB "
            f"| {c.data_bytes // MiB} MiB | {f'{c.tail_bytes // MiB} MiB' if c.warm else '-'} "
            f"| {c.median_s} s | {c.max_s} s | {c.median_attach_s} s "
            f"| {c.median_final_bytes / MiB:.1f} MiB "
            f"| {c.peak_rss_bytes / MiB:.0f} MiB | {c.median_cpu_s} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mobility", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sizes-mib", type=int, nargs="+", default=[512, 2048], help="the volumes' sizes"
    )
    parser.add_argument(
        "--data-mib", type=int, default=0, help="written before the move (default: half)"
    )
    parser.add_argument("--tail-mib", type=int, default=8, help="written after the capture")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--cases", choices=("both", "warm", "cold"), default="both", help="which moves to run"
    )
    parser.add_argument(
        "--pool-fs",
        choices=("xfs", "host"),
        default="xfs",
        help="the node pools' filesystem: xfs on a loop device (reflinks), or the "
        "workdir's own (ext4 here: no reflinks, every capture hashes the whole image)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default /tmp)")
    parser.add_argument(
        "--keep-logs", type=Path, default=None, help="copy the sandbox's logs here at the end"
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results/mobility-latest.json"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the mobility benchmark needs root: network namespaces, loop devices, mounts")
        return 2
    work = Path(tempfile.mkdtemp(prefix="fybm-", dir=args.workdir or "/tmp"))
    wanted = {"both": (True, False), "warm": (True,), "cold": (False,)}[args.cases]
    settings = Settings(
        tuple(s * MiB for s in args.sizes_mib),
        args.data_mib * MiB,
        args.tail_mib * MiB,
        args.repeat,
        wanted,
        args.pool_fs,
        args.keep_logs,
    )
    try:
        cases = run(work, settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(cases))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "settings": asdict(settings),
        "cases": [
            asdict(c) | {"median_s": c.median_s, "max_s": c.max_s, "peak_rss": c.peak_rss_bytes}
            for c in cases
        ],
    }
    args.output.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
