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

Two topologies (``--topologies``), each its own rows, never mixed:

* ``all-in-one``: controller and node in one process (this one), the image
  created in the RPC's own thread (``LocalImages``), as ``ferry all-in-one``
  runs;
* ``all-in-one+leader``: the same all-in-one, and beside it a ``ferry
  controller`` process on the same SQLite file, started first so that it
  wins the election: the leader's reconcilers (garbage collector,
  replication, failover, moves) run in that process, reading the file
  directly, while the all-in-one serves every RPC (CSI RPCs are served by
  every controller replica);
* ``split``: a controller process serving the SQLite catalog to a separate
  node process over ``ferry.v1.Catalog`` on loopback TCP with mutual TLS
  under a cluster CA made for the run, exactly as ``ferry sandbox up
  --catalog sqlite`` and a multi-node install run them (the node never opens
  the catalog's file; it watches its specs and writes its statuses over the
  catalog service). Both processes run ``runtime.start_controller`` and
  ``runtime.start_node``, the functions ``ferry controller`` and ``ferry
  node`` call; their CPU is reported per process and per thread.

Volumes are thin 1 MiB block volumes so the pool's disk is not the subject;
every create is still acknowledged only after the node's image and the
catalog's records are fsync'd.

The catalog is filled honestly and quickly: the same records a create
writes (volume, name claim, image spec and the node's charged accounting)
are written in batched transactions, and the node's own image reconciler
then creates each image and reports its status, as it would after a
restart. Measurement starts once every image is reported READY, the
process is idle (under 5% of a core for a second) and a file create in the
pool costs what it usually does (see :func:`settled_file_create_us`).
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests
from prometheus_client import REGISTRY

from csi_driver.core.model import AccessType, GiB, MiB, Volume, VolumeState
from csi_driver.core.records import IMAGE_STATUSES, ImageSpec, NodeAccounting
from csi_driver.csi.client import CsiClient, block_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.teardown import release_under
from csi_driver.pki import CertificateAuthority, Identity, TlsBundle
from csi_driver.runtime import NodeConfig, start_all_in_one, start_controller, start_node
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import put
from csi_driver.store.url import open_store
from csi_driver.transport import AgentSecurity

NODE_ID = "bench-node"
SIZE = 1 * MiB
THIN = {"provisioning": "thin"}
#: Volumes per filling txn: 3 ops each plus the accounting stay under etcd's 128.
_FILL_BATCH = 25
_ETCD_START_S = 20.0
CALLERS = 32
#: Controller and node in this process, the image created in the RPC's thread.
ALL_IN_ONE = "all-in-one"
#: A controller process and a node process, the node over the catalog service (mTLS).
SPLIT = "split"
#: The all-in-one in this process, and a controller process on the same SQLite file
#: that leads: the leader's reconcilers run there, on the other core.
LEADER_APART = "all-in-one+leader"
TOPOLOGIES = (ALL_IN_ONE, SPLIT, LEADER_APART)
#: The thread kind under which a process's CPU in the kernel is reported.
KERNEL = "(kernel)"
#: How long a served process may take to start (and its first list of the catalog).
_SERVE_START_S = 60.0


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
    topology: str = ALL_IN_ONE
    #: Ferry's CPU ms per create with 32 callers, by process (split: controller, node)
    processes_ms: dict[str, float] = field(default_factory=dict)
    #: of which in the kernel (fsync, file and socket calls: off the GIL), by process
    kernel_ms: dict[str, float] = field(default_factory=dict)
    #: what creating one empty file in the pool's image directory cost just before
    #: the measurement, median µs (see file_create_us): a create makes two
    file_create_us: float = 0.0

    def p(self, q: float) -> float:
        ordered = sorted(self.serial_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "topology": self.topology,
            "catalog_size": self.catalog_size,
            "serial_count": len(self.serial_ms),
            "serial_p50_ms": round(self.p(50), 2),
            "serial_p99_ms": round(self.p(99), 2),
            "callers": self.callers,
            "concurrent_creates_per_s": round(self.concurrent_per_s, 1),
            "cpu_ms_per_serial_create": round(self.cpu_ms_per_create, 2),
            "cpu_ms_per_concurrent_create": round(self.concurrent_cpu_ms_per_create, 2),
            "client_cpu_ms_per_concurrent_create": round(self.client_cpu_ms_per_create, 2),
            "cpu_ms_per_concurrent_create_by_process": {
                name: round(ms, 3) for name, ms in self.processes_ms.items()
            },
            "kernel_cpu_ms_per_concurrent_create_by_process": {
                name: round(ms, 3) for name, ms in self.kernel_ms.items()
            },
            "cpu_ms_per_concurrent_create_by_thread": {
                name: round(ms, 3) for name, ms in self.threads_ms.items()
            },
            "pool_file_create_us": round(self.file_create_us, 1),
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


#: Empty files file_create_us makes (left for the row's cleanup: unlinking them
#: at once would make the next creates dearer, see below).
_PROBE_FILES = 64
#: A file create cheaper than this (µs) is the filesystem's usual cost (~15-20
#: µs here), not one inflated by recent deletions (~1,000 µs).
SETTLED_FILE_CREATE_US = 100.0
#: Longest wait for recent deletions to stop inflating file creates.
SETTLE_WAIT_S = 420.0


def file_create_us(directory: Path, tag: str = "") -> float:
    """Median µs to create one empty file in ``directory``, as a create makes an
    image's two files there.

    Said with every row because on some filesystems it is neither small nor
    stable: ext4 without a journal (this VM's root filesystem) skips, file by
    file, every inode freed in the last seconds to minutes while allocating a
    new one (``recently_deleted`` in the kernel), so after many deletions on the
    filesystem (a test suite, a previous row's cleanup) one create costs up to
    ~1 ms of kernel CPU instead of ~20 µs, and a row's latency moves with it.
    """
    costs = []
    for number in range(_PROBE_FILES):
        started = time.perf_counter()
        # New names each probe (``tag``): creating an existing file allocates nothing.
        path = directory / f".bench-probe{tag}-{number}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        costs.append(time.perf_counter() - started)
    return sorted(costs)[len(costs) // 2] * 1e6


def settled_file_create_us(
    directory: Path, wait_s: float = SETTLE_WAIT_S, every_s: float = 10.0
) -> float:
    """:func:`file_create_us` once it is below SETTLED_FILE_CREATE_US, or as it is
    after ``wait_s``: a row then measures Ferry, not the inodes a run before it
    deleted (ext4 without a journal skips those for 60 s, or 360 s while their
    inode table block is dirty). The cost the wait ended at is the row's column.
    """
    deadline = time.monotonic() + wait_s
    probe = 0
    while True:
        cost = file_create_us(directory, f"-{probe}")
        if cost < SETTLED_FILE_CREATE_US or time.monotonic() >= deadline:
            return cost
        if probe == 0:
            print(
                f"  .. a file create in the pool costs {cost:.0f} µs (inodes freed on this "
                f"filesystem in the last minutes); waiting up to {wait_s:.0f}s for that to pass",
                flush=True,
            )
        probe += 1
        time.sleep(every_s)


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


def wait_quiet(cpu_s: Callable[[], float] = time.process_time, timeout_s: float = 300.0) -> None:
    """Wait until Ferry is idle (``cpu_s``: its CPU so far, default this process's):
    the node's second pass over each filled image (woken by its own status write)
    must not be billed to the first creates measured."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        used = cpu_s()
        time.sleep(1.0)
        if cpu_s() - used < 0.05:
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
    backend: str,
    catalog_url: str,
    workdir: Path,
    size: int,
    serial: int,
    concurrent: int,
    leader_apart: bool = False,
) -> Row:
    """One row of the all-in-one: Ferry runs in this process (``leader_apart``: and
    a leading controller process beside it, on the same SQLite file)."""
    config = node_config(workdir, 256 * GiB)
    endpoint = f"unix://{workdir}/csi.sock"
    filler = open_store(catalog_url)
    leader: list[Served] = []
    try:
        started = time.monotonic()
        fill(Catalog(filler), size)
        if leader_apart:
            spec = {"csi": f"unix://{workdir}/leader.sock", "catalog": catalog_url}
            leader.append(Served("leader", spec, workdir / "leader.log"))
        services = start_all_in_one(endpoint, config, catalog_url)
        try:
            CsiClient(endpoint).wait_ready()
            wait_settled(Catalog(filler), size)
            wait_quiet(lambda: time.process_time() + sum(_cpu_of(leader)[0].values()))
            print(
                f"  .. {backend}: {size} volumes in {time.monotonic() - started:.0f}s",
                flush=True,
            )
            probe_us = settled_file_create_us(config.pool_root / "images")
            cpu_started, leader_before = time.process_time(), _cpu_of(leader)[0]
            samples = _callers(endpoint, "serial", serial, 1).samples
            # The callers' warm-up creates (10) are billed too: a slight overestimate.
            cpu_ms = (time.process_time() - cpu_started) * 1000 / serial
            leader_after, leader_threads_before = _cpu_of(leader)
            cpu_ms += sum(_per_create(leader_after, leader_before, serial).values())
            cpu_started, threads_before = time.process_time(), thread_cpu_s()
            kernel_started = os.times().system
            batch = _callers(endpoint, "conc", concurrent, CALLERS)
            processes_ms = {"all-in-one": (time.process_time() - cpu_started) * 1000 / concurrent}
            kernel_ms = {"all-in-one": (os.times().system - kernel_started) * 1000 / concurrent}
            threads_ms = _per_create(thread_cpu_s(), threads_before, concurrent)
            leader_done, leader_threads = _cpu_of(leader)
            processes_ms.update(_per_create(leader_done, leader_after, concurrent))
            threads_ms.update(_per_create(leader_threads, leader_threads_before, concurrent))
            kernel_ms.update(_kernel_of(threads_ms))
            rate = concurrent / batch.wall_s
        finally:
            services.stop(grace_s=1)
            release_under(workdir)
    finally:
        for one in leader:
            one.stop()
        filler.close()
    return Row(
        backend,
        size,
        samples,
        rate,
        CALLERS,
        cpu_ms,
        sum(processes_ms.values()),
        batch.cpu_s * 1000 / concurrent,
        threads_ms,
        LEADER_APART if leader_apart else ALL_IN_ONE,
        processes_ms,
        kernel_ms,
        probe_us,
    )


def _kernel_of(threads_ms: dict[str, float]) -> dict[str, float]:
    """The served processes' kernel CPU out of their per-thread figures (``role:(kernel)``)."""
    return {
        name.removesuffix(f":{KERNEL}"): ms
        for name, ms in threads_ms.items()
        if name.endswith(f":{KERNEL}")
    }


def _cluster_tls(workdir: Path) -> Path:
    """A cluster CA made for this run and a certificate each for the controller and
    the node, naming loopback (``ferry ca init`` and ``ferry ca issue``)."""
    authority = CertificateAuthority.create("Ferry bench CA")
    for identity in (Identity.controller(), Identity.node(NODE_ID)):
        authority.issue(identity, ips=("127.0.0.1",)).write(workdir / "tls" / identity.dir_name)
    return workdir / "tls"


class Served:
    """A Ferry process this bench started (``--serve``): it answers ``cpu`` on its
    stdin with its CPU so far (in all, and by thread kind) and stops at EOF."""

    def __init__(self, role: str, spec: dict[str, str], log: Path) -> None:
        self.role = role
        argv = [sys.executable, "-m", "bench.control_plane", "--serve", role, json.dumps(spec)]
        with open(log, "ab") as sink:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink, text=True
            )
        self._log = log
        ready = self._answer()
        if ready != "ready":
            self.stop()
            raise SystemExit(f"the bench's {role} did not start; see {log}")

    def _answer(self) -> str:
        assert self._process.stdout is not None
        return self._process.stdout.readline().strip()

    def cpu(self) -> tuple[float, dict[str, float]]:
        """The process's CPU seconds so far, and by thread kind (named ``role:kind``,
        and ``role:(kernel)`` for its CPU in the kernel, all threads)."""
        assert self._process.stdin is not None
        self._process.stdin.write("cpu\n")
        self._process.stdin.flush()
        answer = self._answer()
        if not answer:
            raise SystemExit(f"the bench's {self.role} died; see {self._log}")
        measured = json.loads(answer)
        threads = {f"{self.role}:{kind}": used for kind, used in measured["threads"].items()}
        threads[f"{self.role}:{KERNEL}"] = measured["system_s"]
        return measured["cpu_s"], threads

    def stop(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def serve_main(role: str, spec: dict[str, str]) -> int:
    """A bench's ``controller`` or ``node`` process, as ``ferry controller --catalog
    FILE --catalog-listen tcp://...`` and ``ferry node --catalog ferry://...`` run."""
    security = AgentSecurity(TlsBundle.load(Path(spec["tls"]))) if spec.get("tls") else None
    workdir: Path | None = None
    if role == "leader":
        services = start_controller(spec["csi"], spec["catalog"])
        deadline = time.monotonic() + _SERVE_START_S
        while REGISTRY.get_sample_value("ferry_controller_leader") != 1.0:
            if time.monotonic() > deadline:
                raise SystemExit("the bench's leader process did not win the election")
            time.sleep(0.05)
    elif role == "controller":
        services = start_controller(
            spec["csi"], spec["catalog"], security, catalog_listen=spec["listen"]
        )
    else:
        workdir = Path(spec["workdir"])
        config = replace(
            node_config(workdir, 256 * GiB),
            agent_endpoint="tcp://127.0.0.1:0",
            security=security or AgentSecurity(),
        )
        services = start_node(spec["csi"], config, spec["catalog"])
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() != "cpu":
                break
            used = {
                "cpu_s": time.process_time(),
                "system_s": os.times().system,
                "threads": thread_cpu_s(),
            }
            print(json.dumps(used), flush=True)
    finally:
        services.stop(grace_s=1)
        if workdir is not None:
            release_under(workdir)
    return 0


def _cpu_of(served: list[Served]) -> tuple[dict[str, float], dict[str, float]]:
    """Each served process's CPU seconds so far, and their threads' by kind."""
    processes: dict[str, float] = {}
    threads: dict[str, float] = {}
    for one in served:
        processes[one.role], by_thread = one.cpu()
        threads.update(by_thread)
    return processes, threads


def _per_create(after: dict[str, float], before: dict[str, float], count: int) -> dict[str, float]:
    return {name: (used - before.get(name, 0.0)) * 1000 / count for name, used in after.items()}


def measure_split(workdir: Path, size: int, serial: int, concurrent: int) -> Row:
    """One row of the split topology (SQLite): a controller process serving the
    catalog over loopback mTLS, a node process reaching it there, the callers a third."""
    tls = _cluster_tls(workdir)
    catalog_file = str(workdir / "catalog.db")
    endpoint = f"unix://{workdir}/csi.sock"
    catalog_address = f"127.0.0.1:{_free_port()}"
    filler = open_store(catalog_file)
    served: list[Served] = []
    try:
        started = time.monotonic()
        fill(Catalog(filler), size)
        served.append(
            Served(
                "controller",
                {
                    "tls": str(tls / Identity.controller().dir_name),
                    "csi": endpoint,
                    "catalog": catalog_file,
                    "listen": f"tcp://{catalog_address}",
                },
                workdir / "controller.log",
            )
        )
        (workdir / "node").mkdir()
        served.append(
            Served(
                "node",
                {
                    "tls": str(tls / Identity.node(NODE_ID).dir_name),
                    "csi": f"unix://{workdir}/node/csi.sock",
                    "catalog": f"ferry://{catalog_address}",
                    "workdir": str(workdir / "node"),
                },
                workdir / "node.log",
            )
        )
        CsiClient(endpoint).wait_ready()
        wait_settled(Catalog(filler), size)
        wait_quiet(lambda: sum(_cpu_of(served)[0].values()))
        print(f"  .. sqlite split: {size} volumes in {time.monotonic() - started:.0f}s", flush=True)
        probe_us = settled_file_create_us(workdir / "node" / "pool" / "images")
        before, _ = _cpu_of(served)
        samples = _callers(endpoint, "serial", serial, 1).samples
        after, threads_before = _cpu_of(served)
        serial_ms = _per_create(after, before, serial)
        batch = _callers(endpoint, "conc", concurrent, CALLERS)
        done, threads_after = _cpu_of(served)
    finally:
        for one in reversed(served):
            one.stop()
        release_under(workdir)
        filler.close()
    processes_ms = _per_create(done, after, concurrent)
    threads_ms = _per_create(threads_after, threads_before, concurrent)
    return Row(
        "sqlite",
        size,
        samples,
        concurrent / batch.wall_s,
        CALLERS,
        sum(serial_ms.values()),
        sum(processes_ms.values()),
        batch.cpu_s * 1000 / concurrent,
        threads_ms,
        SPLIT,
        processes_ms,
        _kernel_of(threads_ms),
        probe_us,
    )


def _measure_one(
    backend: str, topology: str, workdir: Path, size: int, serial: int, concurrent: int
) -> Row:
    if topology == SPLIT:
        return measure_split(workdir, size, serial, concurrent)
    if backend == "sqlite":
        url = str(workdir / "catalog.db")
        return measure(backend, url, workdir, size, serial, concurrent, topology == LEADER_APART)
    with single_etcd(workdir) as url:
        return measure(backend, url, workdir, size, serial, concurrent)


def run(
    workroot: Path,
    backends: list[str],
    sizes: list[int],
    serial: int,
    concurrent: int,
    topologies: tuple[str, ...] = (ALL_IN_ONE,),
) -> list[Row]:
    """Every (backend, topology, size) row; the other topologies on SQLite only (an
    etcd's nodes reach etcd itself, not the controller, and its leader is elected
    by a lease the bench does not split)."""
    unknown = set(topologies) - set(TOPOLOGIES)
    if unknown:
        raise SystemExit(f"unknown topologies {sorted(unknown)}: choose from {TOPOLOGIES}")
    rows = []
    done: list[Path] = []
    try:
        for backend in backends:
            for topology in topologies:
                if topology != ALL_IN_ONE and backend != "sqlite":
                    continue
                for size in sizes:
                    workdir = workroot / f"{backend}-{topology}-{size}"
                    workdir.mkdir(parents=True)
                    done.append(workdir)
                    rows.append(_measure_one(backend, topology, workdir, size, serial, concurrent))
                    _print_row(rows[-1])
    finally:
        # Removed only once every row is measured: on a filesystem without a journal
        # (this VM's root ext4) the 20,000 files of a 10,000-volume row, deleted,
        # make every file the next row creates cost up to ~1 ms of kernel CPU for
        # minutes (see file_create_us).
        for workdir in done:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _print_row(row: Row) -> None:
    summary = row.summary()
    del summary["cpu_ms_per_concurrent_create_by_thread"]  # the line below says it
    print("  .. " + str(summary), flush=True)
    print("  .. Ferry CPU ms per create by thread: " + row.threads_line(), flush=True)


def render(rows: list[Row]) -> str:
    lines = [
        "| backend | topology | catalog size | serial p50 ms | serial p99 ms "
        "| 32-caller creates/s | p50 ratio vs smallest | Ferry CPU ms per serial create "
        "| Ferry CPU ms per create, 32 callers (by process; of it in the kernel) "
        "| callers' CPU ms per create | pool file create µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    base: dict[tuple[str, str], float] = {}
    for row in rows:
        ratio = row.p(50) / base.setdefault((row.backend, row.topology), row.p(50))
        parts = ", ".join(
            f"{name} {ms:.2f}, kernel {row.kernel_ms.get(name, 0.0):.2f}"
            for name, ms in row.processes_ms.items()
        )
        by_process = f" ({parts})"
        lines.append(
            f"| {row.backend} | {row.topology} | {row.catalog_size} | {row.p(50):.2f} "
            f"| {row.p(99):.2f} | {row.concurrent_per_s:.0f} | {ratio:.2f} "
            f"| {row.cpu_ms_per_create:.2f} | {row.concurrent_cpu_ms_per_create:.2f}{by_process} "
            f"| {row.client_cpu_ms_per_create:.2f} | {row.file_create_us:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve_main(sys.argv[2], json.loads(sys.argv[3])))
    sys.exit(callers_main(sys.argv[1:]))
