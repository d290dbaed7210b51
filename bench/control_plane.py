"""``python -m bench --control-plane``: CreateVolume cost as the catalog grows.

For each backend (SQLite all-in-one; a real single-member etcd that this
module starts from Debian's ``etcd`` binary, with its default fsync'd WAL)
and each catalog size, a fresh Ferry all-in-one is started, the catalog is
filled with that many existing volumes, and then over the real CSI socket,
from another process (as the external-provisioner calls Ferry):

* serial CreateVolume latency (p50/p99), one caller;
* CreateVolume throughput with 32 concurrent callers (creates/s, wall clock);
* Ferry's CPU time per create (controller and node threads of the
  all-in-one process; etcd's own CPU is not counted), serial and with 32
  callers: on this shared machine it says what an idle core's wall clock
  would approach, and (the machine has 2 cores, one GIL per process) what
  rate one Ferry process can reach at best;
* the callers' own CPU per create (their gRPC client), which shares the
  machine's cores with Ferry;
* where Ferry's CPU goes with 32 callers: each of its threads' CPU per
  create, threads of one kind (a runner's workers, the gRPC server's pool)
  summed under one name.

The 32 callers' rate is timed inside the callers' process, from the first
measured create to the last: its interpreter start-up and channel warm-up
are not the server's work.

Volumes are thin 1 MiB block volumes so the pool's disk is not the subject;
every create is still acknowledged only after the node's image and the
catalog's records are fsync'd.

The catalog is filled honestly and quickly: the same records a create
writes (volume, name claim, image spec and the node's charged accounting)
are written in batched transactions, and the node's own image reconciler
then creates each image and reports its status, as it would after a
restart. Measurement starts once every image is reported READY and the
process is idle (under 5% of a core for a second).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from csi_driver.core.model import AccessType, GiB, MiB, Volume, VolumeState
from csi_driver.core.records import IMAGE_STATUSES, ImageSpec, NodeAccounting
from csi_driver.csi.client import CsiClient, block_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.teardown import release_under
from csi_driver.runtime import NodeConfig, start_all_in_one
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import put
from csi_driver.store.url import open_store

NODE_ID = "bench-node"
SIZE = 1 * MiB
THIN = {"provisioning": "thin"}
#: Volumes per filling txn: 3 ops each plus the accounting stay under etcd's 128.
_FILL_BATCH = 25
_ETCD_START_S = 20.0
CALLERS = 32


@dataclass(frozen=True)
class Row:
    backend: str
    catalog_size: int
    serial_ms: list[float]
    concurrent_per_s: float
    callers: int
    #: CPU of this process (controller and node threads) per serial create: the
    #: cost a quiet machine's wall clock would approach
    cpu_ms_per_create: float
    #: the same per create while 32 callers create at once
    concurrent_cpu_ms_per_create: float = 0.0
    #: CPU of the callers' process (their gRPC client) per create, with 32 callers
    client_cpu_ms_per_create: float = 0.0
    #: Ferry's CPU ms per create with 32 callers, by thread kind (see thread_cpu_s)
    threads_ms: dict[str, float] = field(default_factory=dict)

    def p(self, q: float) -> float:
        ordered = sorted(self.serial_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "catalog_size": self.catalog_size,
            "serial_count": len(self.serial_ms),
            "serial_p50_ms": round(self.p(50), 2),
            "serial_p99_ms": round(self.p(99), 2),
            "callers": self.callers,
            "concurrent_creates_per_s": round(self.concurrent_per_s, 1),
            "cpu_ms_per_serial_create": round(self.cpu_ms_per_create, 2),
            "cpu_ms_per_concurrent_create": round(self.concurrent_cpu_ms_per_create, 2),
            "client_cpu_ms_per_concurrent_create": round(self.client_cpu_ms_per_create, 2),
            "cpu_ms_per_concurrent_create_by_thread": {
                name: round(ms, 3) for name, ms in self.threads_ms.items()
            },
        }

    def threads_line(self) -> str:
        """The threads that cost at least 0.01 ms per create, costliest first."""
        costly = [(ms, name) for name, ms in self.threads_ms.items() if ms >= 0.01]
        return ", ".join(f"{name} {ms:.2f}" for ms, name in sorted(costly, reverse=True))


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds of this process's threads so far, by kind: the thread's name
    without its trailing number (``grpc_3`` and ``grpc_12`` are both ``grpc``)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        used = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        kind = names.get(int(task.name), "(not a Python thread)").rstrip("0123456789_-")
        found[kind] = found.get(kind, 0.0) + used
    return found


def node_config(workdir: Path, capacity: int) -> NodeConfig:
    """The benchmark's one node, its pool and kubelet directory under ``workdir``."""
    kubelet = workdir / "kubelet"
    kubelet.mkdir(parents=True)
    return NodeConfig(
        node_id=NODE_ID,
        pool_root=workdir / "pool",
        kubelet_dirs=(kubelet,),
        agent_endpoint=f"unix://{workdir}/agent.sock",
        pool_capacity_bytes=capacity,
    )


def host(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The machine a run took on; it is shared, so its load says how far to trust the run."""
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextmanager
def single_etcd(workdir: Path) -> Iterator[str]:
    """A single-member etcd on loopback (default durability); yields its catalog URL."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("the etcd benchmark needs Debian's etcd-server (the etcd binary)")
    client, peer = _free_port(), _free_port()
    argv = [
        etcd,
        "--name=bench",
        f"--data-dir={workdir / 'etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{client}",
        f"--advertise-client-urls=http://127.0.0.1:{client}",
        f"--listen-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-cluster=bench=http://127.0.0.1:{peer}",
        "--log-level=warn",
        "--logger=zap",
    ]
    with open(workdir / "etcd.log", "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + _ETCD_START_S
        while True:
            try:
                reply = requests.get(f"http://127.0.0.1:{client}/health", timeout=0.5)
                if reply.status_code == 200 and reply.json().get("health") == "true":
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"etcd did not start; see {workdir / 'etcd.log'}")
            time.sleep(0.1)
        yield f"etcd://127.0.0.1:{client}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fill(catalog: Catalog, count: int) -> None:
    """Write ``count`` existing volumes' records in batched txns (as creates write them)."""
    store = catalog.store
    account_key = NodeAccounting(NODE_ID).key
    for start in range(0, count, _FILL_BATCH):
        stored = store.get(account_key)
        account = (
            catalog.accounts()[NODE_ID].value if stored is not None else NodeAccounting(NODE_ID)
        )
        ops = []
        for i in range(start, min(count, start + _FILL_BATCH)):
            volume_id = f"vol-{uuid.uuid4().hex}"
            volume = Volume(
                volume_id=volume_id,
                name=f"fill-{i}",
                capacity_bytes=SIZE,
                access_type=AccessType.BLOCK,
                fs_type=None,
                primary_node=NODE_ID,
                epoch=1,
                state=VolumeState.READY,
                parameters=tuple(THIN.items()),
                created_at=time.time(),
            )
            ops += [
                catalog.volume_op(volume),
                catalog.name_op(volume.name, volume_id),
                put(ImageSpec(volume_id, NODE_ID, SIZE, 1, thin=True)),
            ]
            account = account.charge(SIZE)
        ops.append(put(account))
        store.txn([], ops)


def wait_settled(catalog: Catalog, count: int, timeout_s: float = 900.0) -> None:
    """Wait until the node has reported a status for ``count`` images."""
    deadline = time.monotonic() + timeout_s
    while len(catalog.store.list(IMAGE_STATUSES)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the node did not create {count} images in {timeout_s:.0f}s")
        time.sleep(0.5)


def wait_quiet(timeout_s: float = 300.0) -> None:
    """Wait until this process is idle: the node's second pass over each filled image
    (woken by its own status write) must not be billed to the first creates measured."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        used = time.process_time()
        time.sleep(1.0)
        if time.process_time() - used < 0.05:
            return


def _create(csi: CsiClient, name: str) -> None:
    csi.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
            volume_capabilities=[block_capability()],
            parameters=THIN,
        )
    )


@dataclass(frozen=True)
class Batch:
    """What the callers' process measured: each create's milliseconds, the batch's
    wall clock (first measured create to last) and the process's CPU over it."""

    samples: list[float]
    wall_s: float
    cpu_s: float


def _callers(endpoint: str, prefix: str, count: int, callers: int) -> Batch:
    """Run ``count`` creates from ``callers`` threads of another process, as a CO would.

    A separate process, so the callers' gRPC client neither shares Ferry's
    GIL nor counts in Ferry's CPU time.
    """
    argv = [sys.executable, "-m", "bench.control_plane", endpoint, prefix, str(count), str(callers)]
    done = subprocess.run(argv, capture_output=True, check=False, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"the benchmark's callers failed: {done.stderr.decode()[-2000:]}")
    measured = json.loads(done.stdout)
    return Batch(measured["samples"], measured["wall_s"], measured["cpu_s"])


def callers_main(argv: list[str]) -> int:
    """The callers' process: warm up, then time ``count`` creates from ``callers`` threads."""
    endpoint, prefix, count, callers = argv[0], argv[1], int(argv[2]), int(argv[3])
    client = CsiClient(endpoint)
    try:
        client.wait_ready()
        for i in range(10):  # the channel and the server's threads, not the catalog
            _create(client, f"{prefix}-warm-{i}")

        def one(i: int) -> float:
            started = time.perf_counter()
            _create(client, f"{prefix}-{i}")
            return (time.perf_counter() - started) * 1000

        with ThreadPoolExecutor(max_workers=callers) as pool:
            # The threads start before the clock does (a CO's callers exist already).
            list(pool.map(lambda _: None, range(callers)))
            cpu, started = time.process_time(), time.perf_counter()
            samples = list(pool.map(one, range(count)))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        client.close()
    print(json.dumps({"samples": samples, "wall_s": wall, "cpu_s": cpu}))
    return 0


def measure(
    backend: str, catalog_url: str, workdir: Path, size: int, serial: int, concurrent: int
) -> Row:
    config = node_config(workdir, 256 * GiB)
    endpoint = f"unix://{workdir}/csi.sock"
    filler = open_store(catalog_url)
    try:
        started = time.monotonic()
        fill(Catalog(filler), size)
        services = start_all_in_one(endpoint, config, catalog_url)
        try:
            CsiClient(endpoint).wait_ready()
            wait_settled(Catalog(filler), size)
            wait_quiet()
            print(
                f"  .. {backend}: {size} volumes in {time.monotonic() - started:.0f}s",
                flush=True,
            )
            cpu_started = time.process_time()
            samples = _callers(endpoint, "serial", serial, 1).samples
            # The callers' warm-up creates (10) are billed too: a slight overestimate.
            cpu_ms = (time.process_time() - cpu_started) * 1000 / serial
            cpu_started, threads_before = time.process_time(), thread_cpu_s()
            batch = _callers(endpoint, "conc", concurrent, CALLERS)
            concurrent_cpu_ms = (time.process_time() - cpu_started) * 1000 / concurrent
            threads_ms = {
                kind: (used - threads_before.get(kind, 0.0)) * 1000 / concurrent
                for kind, used in thread_cpu_s().items()
            }
            rate = concurrent / batch.wall_s
        finally:
            services.stop(grace_s=1)
            release_under(workdir)
    finally:
        filler.close()
    return Row(
        backend,
        size,
        samples,
        rate,
        CALLERS,
        cpu_ms,
        concurrent_cpu_ms,
        batch.cpu_s * 1000 / concurrent,
        threads_ms,
    )


def run(
    workroot: Path, backends: list[str], sizes: list[int], serial: int, concurrent: int
) -> list[Row]:
    rows = []
    for backend in backends:
        for size in sizes:
            workdir = workroot / f"{backend}-{size}"
            workdir.mkdir(parents=True)
            try:
                if backend == "sqlite":
                    url = str(workdir / "catalog.db")
                    rows.append(measure(backend, url, workdir, size, serial, concurrent))
                else:
                    with single_etcd(workdir) as url:
                        rows.append(measure(backend, url, workdir, size, serial, concurrent))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            summary = rows[-1].summary()
            del summary["cpu_ms_per_concurrent_create_by_thread"]  # the line below says it
            print("  .. " + str(summary), flush=True)
            print("  .. Ferry CPU ms per create by thread: " + rows[-1].threads_line(), flush=True)
    return rows


def render(rows: list[Row]) -> str:
    lines = [
        "| backend | catalog size | serial p50 ms | serial p99 ms | 32-caller creates/s "
        "| p50 ratio vs smallest | Ferry CPU ms per serial create "
        "| Ferry CPU ms per create, 32 callers | callers' CPU ms per create |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base: dict[str, float] = {}
    for row in rows:
        base.setdefault(row.backend, row.p(50))
        lines.append(
            f"| {row.backend} | {row.catalog_size} | {row.p(50):.2f} | {row.p(99):.2f} "
            f"| {row.concurrent_per_s:.0f} | {row.p(50) / base[row.backend]:.2f} "
            f"| {row.cpu_ms_per_create:.2f} | {row.concurrent_cpu_ms_per_create:.2f} "
            f"| {row.client_cpu_ms_per_create:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(callers_main(sys.argv[1:]))
