"""``python -m bench``: Ferry's benchmark on this machine.

Starts Ferry all-in-one in a scratch directory and measures, over the real
CSI socket:

* CreateVolume and DeleteVolume latency (p50/p99), one caller and 32
  concurrent callers;
* NodeStageVolume + NodePublishVolume latency for a new volume (mkfs) and
  for one whose filesystem already exists;
* fio throughput through a published volume, as a ratio to the same fio job
  on the pool's own filesystem, run back to back in the same process;
* fio throughput through an encrypted volume (``encrypted: "true"``), as a
  ratio to an unencrypted one (``--skip-encryption`` leaves it out).

The fio comparison is kept fair: the same job file (O_DIRECT, libaio, same
size, iodepth and block size) runs on both sides, each side's file is fully
written once before any job is timed (so no side reads unwritten extents
or pays first-write allocation inside a job), and the sides alternate
(volume, pool, pool, volume, ...) so drift in a shared host's disk hits both;
medians are reported. ``--jobs`` runs a subset, ``--quick`` a smoke run.

The encryption comparison runs buffered jobs (:data:`CRYPT_JOBS`) on both
volumes: ext4 serves O_DIRECT on an encrypted file through the page cache
unless the disk encrypts inline, so direct I/O would compare cache with
disk. Each job moves its bytes once (fio's random map: no block twice, the
file's cache dropped first), writes end with an fsync, and a run's time is
the whole fio process, fsync included.

``--control-plane`` instead measures CreateVolume alone on SQLite and on a
real single-member etcd, with the catalog's size as a column (see
``bench/control_plane.py``).

Prints a table and writes JSON (default ``bench/results/latest.json``) with
every sample. Needs root (loop devices, mounts) and fio.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench import control_plane
from csi_driver import __version__
from csi_driver.core.encryption import ENCRYPTED_CONTEXT_KEY, KEY_BYTES, SECRET_KEY
from csi_driver.core.model import GiB, MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.runner import CommandRunner
from csi_driver.node.teardown import release_under
from csi_driver.runtime import start_all_in_one


@dataclass
class Latency:
    name: str
    samples_ms: list[float] = field(repr=False)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.samples_ms)
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
        return ordered[index]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": len(self.samples_ms),
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
            "mean_ms": round(statistics.fmean(self.samples_ms), 2),
        }


@dataclass(frozen=True)
class FioSample:
    mib_s: float
    iops: float


@dataclass(frozen=True)
class FioSide:
    """The runs of one job on one side; the median stands for them."""

    samples: tuple[FioSample, ...]

    @property
    def mib_s(self) -> float:
        return statistics.median(s.mib_s for s in self.samples)

    @property
    def iops(self) -> float:
        return statistics.median(s.iops for s in self.samples)


@dataclass(frozen=True)
class FioResult:
    job: str
    volume: FioSide
    pool: FioSide

    @property
    def ratio(self) -> float:
        return self.volume.mib_s / self.pool.mib_s if self.pool.mib_s else 0.0

    def summary(self, names: tuple[str, str] = ("volume", "pool")) -> dict[str, Any]:
        """As JSON; ``names`` say what the two sides are (measured, baseline)."""
        measured, baseline = names
        return {
            "job": self.job,
            f"{measured}_mib_s": round(self.volume.mib_s, 1),
            f"{baseline}_mib_s": round(self.pool.mib_s, 1),
            f"{measured}_iops": round(self.volume.iops),
            f"{baseline}_iops": round(self.pool.iops),
            "ratio": round(self.ratio, 3),
            f"{measured}_samples": [asdict(x) for x in self.volume.samples],
            f"{baseline}_samples": [asdict(x) for x in self.pool.samples],
        }


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, client: CsiClient, kubelet: Path) -> None:
        self.csi = client
        self.kubelet = kubelet

    def create(
        self, name: str, size: int, fs: str = "ext4", parameters: dict[str, str] | None = None
    ) -> Any:
        return self.csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[mount_capability(fs)],
                parameters=parameters or {},
            )
        ).volume

    def delete(self, volume_id: str) -> None:
        self.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))

    def create_delete(self, rounds: int, callers: int) -> tuple[Latency, Latency]:
        def one(i: int) -> tuple[float, float]:
            holder: list[str] = []
            create_ms = timed(
                lambda: holder.append(self.create(f"b-{uuid.uuid4().hex}", 64 * MiB).volume_id)
            )
            delete_ms = timed(lambda: self.delete(holder[0]))
            return create_ms, delete_ms

        with ThreadPoolExecutor(max_workers=callers) as pool:
            results = list(pool.map(one, range(rounds)))
        label = "alone" if callers == 1 else f"{callers} concurrent"
        return (
            Latency(f"CreateVolume ({label})", [c for c, _ in results]),
            Latency(f"DeleteVolume ({label})", [d for _, d in results]),
        )

    def paths(self, volume_id: str) -> tuple[str, str]:
        staging = self.kubelet / "plugins" / volume_id / "globalmount"
        target = self.kubelet / "pods" / volume_id / "mount"
        return str(staging), str(target)

    def stage_publish(self, volume_id: str, fs: str, volume: Any = None) -> None:
        """Stage and publish; ``volume`` (CreateVolume's) passes its context, and for an
        encrypted one the bench's key, as kubelet would."""
        staging, target = self.paths(volume_id)
        cap = mount_capability(fs)
        context = dict(volume.volume_context) if volume is not None else {}
        secrets = {SECRET_KEY: BENCH_KEY} if ENCRYPTED_CONTEXT_KEY in context else {}
        self.csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                volume_capability=cap,
                volume_context=context,
                secrets=secrets,
            )
        )
        self.csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                target_path=target,
                volume_capability=cap,
            )
        )

    def unpublish_unstage(self, volume_id: str) -> None:
        staging, target = self.paths(volume_id)
        self.csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)
        )
        self.csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging)
        )

    def mount_latency(self, rounds: int, fs: str, size: int) -> tuple[Latency, Latency]:
        new, existing = [], []
        for i in range(rounds):
            vid = self.create(f"m-{fs}-{i}-{uuid.uuid4().hex[:6]}", size, fs).volume_id
            new.append(timed(partial(self.stage_publish, vid, fs)))
            self.unpublish_unstage(vid)
            existing.append(timed(partial(self.stage_publish, vid, fs)))
            self.unpublish_unstage(vid)
            self.delete(vid)
        return (
            Latency(f"NodeStage+NodePublish {fs}, new filesystem", new),
            Latency(f"NodeStage+NodePublish {fs}, existing filesystem", existing),
        )


#: The jobs of the comparison; ``--jobs`` picks some by name. The fsync job
#: is reported, not targeted: every fsync in a volume crosses two
#: filesystems' journals (see docs/benchmarks.md).
FIO_JOBS = {
    "seq-write 1M": ["--rw=write", "--bs=1M", "--iodepth=8"],
    "seq-read 1M": ["--rw=read", "--bs=1M", "--iodepth=8"],
    "rand-write 4k": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "rand-read 4k": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "rand-write 4k fsync": ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"],
}
FIO_FILE = "ferry.fio"


def fio_argv(directory: Path, size_mib: int) -> list[str]:
    """What both sides share: one file of the same name and size, O_DIRECT, libaio."""
    return [
        "fio", "--name=ferry", f"--filename={directory / FIO_FILE}", f"--size={size_mib}M",
        "--ioengine=libaio", "--direct=1", "--output-format=json",
    ]  # fmt: skip


def fio(
    runner: CommandRunner, directory: Path, job: str, size_mib: int, runtime_s: int
) -> FioSample:
    """Run one timed fio job in ``directory``."""
    argv = [
        *fio_argv(directory, size_mib), "--time_based", f"--runtime={runtime_s}",
        "--ramp_time=1", *FIO_JOBS[job],
    ]  # fmt: skip
    result = runner.run(argv, timeout_s=runtime_s * 4 + 120)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    side = report["jobs"][0]["write" if "write" in job else "read"]
    return FioSample(side["bw_bytes"] / MiB, side["iops"])


def lay_out(runner: CommandRunner, directory: Path, size_mib: int) -> None:
    """Write ``directory``'s fio file once, whole, and fsync it.

    fio would otherwise create it with fallocate: reads of its unwritten
    extents return zeros without touching the disk, and first writes pay
    the extent conversion, on the pool's side only or on both in different
    amounts. Timed jobs must compare written blocks with written blocks.
    """
    argv = [*fio_argv(directory, size_mib), "--rw=write", "--bs=1M", "--iodepth=8", "--end_fsync=1"]
    runner.run(argv, timeout_s=size_mib + 120)


def selected_jobs(names: str, known: Mapping[str, list[str]] = FIO_JOBS) -> list[str]:
    """Jobs of ``known`` whose name starts with one of the comma-separated ``names``."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    jobs = [job for job in known if any(job.startswith(w) for w in wanted)]
    if not jobs:
        raise SystemExit(f"--jobs {names!r} matches none of: {', '.join(known)}")
    return jobs


def alternating(
    run: Callable[[Path, str], FioSample], first: Path, second: Path, jobs: list[str], repeats: int
) -> list[FioResult]:
    """Each job ``repeats`` times on ``first`` and on ``second``, alternating which goes
    first, so drift in the host's disk hits both; medians are kept."""
    results = []
    for job in jobs:
        progress(f"fio {job}: {repeats}x on each side, alternating")
        runs: dict[Path, list[FioSample]] = {first: [], second: []}
        for i in range(repeats):
            for where in [first, second] if i % 2 == 0 else [second, first]:
                runs[where].append(run(where, job))
        results.append(FioResult(job, FioSide(tuple(runs[first])), FioSide(tuple(runs[second]))))
    return results


#: The encryption comparison's jobs: buffered, each block once, writes fsync'd (see the
#: module's docstring). Random jobs move a part of the file so each run stays short.
CRYPT_JOBS = {
    "seq-write 1M": ["--rw=write", "--bs=1M", "--end_fsync=1"],
    "seq-read 1M": ["--rw=read", "--bs=1M"],
    "rand-write 4k": ["--rw=randwrite", "--bs=4k", "--io_size=64M", "--end_fsync=1"],
    "rand-read 4k": ["--rw=randread", "--bs=4k", "--io_size=32M"],
    "rand-write 4k fsync": ["--rw=randwrite", "--bs=4k", "--io_size=4M", "--fsync=1"],
}
#: The key of the bench's encrypted volume (made for this run, never kept).
BENCH_KEY = base64.b64encode(os.urandom(KEY_BYTES)).decode()


def crypt_fio(runner: CommandRunner, directory: Path, job: str, size_mib: int) -> FioSample:
    """One buffered job in ``directory``, timed from fio's start to its exit."""
    argv = [
        "fio", "--name=ferry", f"--filename={directory / FIO_FILE}", f"--size={size_mib}M",
        "--ioengine=psync", "--direct=0", "--invalidate=1", "--output-format=json",
        *CRYPT_JOBS[job],
    ]  # fmt: skip
    result = runner.run(argv, timeout_s=size_mib * 2 + 300)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    side = report["jobs"][0]["write" if "write" in job else "read"]
    return FioSample(
        side["io_bytes"] / MiB / result.duration_s, side["total_ios"] / result.duration_s
    )


def encryption_cost(bench: Bench, jobs: list[str], size_mib: int, repeats: int) -> list[FioResult]:
    """Each job on an encrypted volume (\"volume\" side) and an unencrypted one (\"pool\")."""
    runner = CommandRunner()
    size = (size_mib + 256) * MiB
    volumes = {
        name: bench.create(f"{name}-{uuid.uuid4().hex[:6]}", size, "ext4", parameters)
        for name, parameters in (("encrypted", {"encrypted": "true"}), ("plain", {}))
    }
    published = []
    try:
        for volume in volumes.values():
            bench.stage_publish(volume.volume_id, "ext4", volume)
            published.append(volume.volume_id)
        encrypted, plain = (Path(bench.paths(v.volume_id)[1]) for v in volumes.values())
        progress(f"laying out a {size_mib} MiB fio file on an encrypted and a plain volume")
        for where in (encrypted, plain):
            lay_out(runner, where, size_mib)
        return alternating(
            lambda where, job: crypt_fio(runner, where, job, size_mib),
            encrypted,
            plain,
            jobs,
            repeats,
        )
    finally:
        for volume_id in published:
            bench.unpublish_unstage(volume_id)
        for volume in volumes.values():
            bench.delete(volume.volume_id)


def throughput(
    bench: Bench,
    pool_dir: Path,
    jobs: list[str],
    size_mib: int,
    runtime_s: int,
    repeats: int,
    parameters: dict[str, str],
) -> list[FioResult]:
    """Each job ``repeats`` times on the volume and on the pool, alternating which
    goes first, so drift in the host's disk hits both sides; medians are kept."""
    runner = CommandRunner()
    vid = bench.create(
        f"fio-{uuid.uuid4().hex[:6]}", (size_mib + 256) * MiB, "ext4", parameters
    ).volume_id
    bench.stage_publish(vid, "ext4")
    volume = Path(bench.paths(vid)[1])
    baseline = pool_dir / "fio-baseline"
    baseline.mkdir(exist_ok=True)
    try:
        progress(f"laying out a {size_mib} MiB fio file on the volume and on the pool")
        for where in (volume, baseline):
            lay_out(runner, where, size_mib)
        return alternating(
            lambda where, job: fio(runner, where, job, size_mib, runtime_s),
            volume,
            baseline,
            jobs,
            repeats,
        )
    finally:
        shutil.rmtree(baseline, ignore_errors=True)
        bench.unpublish_unstage(vid)
        bench.delete(vid)


@contextmanager
def running_ferry(workdir: Path) -> Iterator[Bench]:
    config = control_plane.node_config(workdir, 64 * GiB)
    kubelet = config.kubelet_dirs[0]
    services = start_all_in_one(f"unix://{workdir}/csi.sock", config, workdir / "catalog.db")
    client = CsiClient(f"unix://{workdir}/csi.sock")
    try:
        client.wait_ready()
        yield Bench(client, kubelet)
    finally:
        client.close()
        services.stop(grace_s=1)
        release_under(workdir)


def fio_table(title: str, sides: tuple[str, str], results: list[FioResult]) -> list[str]:
    """A markdown table of ``results``; ``sides`` name the measured side and the baseline."""
    if not results:
        return []
    measured, baseline = sides
    lines = [
        "",
        f"| {title}, medians | {measured} MiB/s | {baseline} MiB/s | {measured} IOPS "
        f"| {baseline} IOPS | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.job} | {r.volume.mib_s:.0f} | {r.pool.mib_s:.0f} | {r.volume.iops:.0f} "
            f"| {r.pool.iops:.0f} | {r.ratio:.2f} |"
        )
    return lines


def render(
    latencies: list[Latency], fio_results: list[FioResult], crypt_results: list[FioResult]
) -> str:
    lines = []
    if latencies:
        lines += ["| Operation | n | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for lat in latencies:
        s = lat.summary()
        lines.append(f"| {s['name']} | {s['count']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")
    lines += fio_table("fio job (O_DIRECT)", ("volume", "pool fs"), fio_results)
    lines += fio_table("fio job (buffered, fsync'd)", ("encrypted", "plain"), crypt_results)
    return "\n".join(lines)


def parameter(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def control_plane_main(args: argparse.Namespace) -> int:
    serial, concurrent = (50, 320) if args.quick else (300, 1280)
    workroot = Path(tempfile.mkdtemp(prefix="ferry-bench-cp-", dir=args.workdir or "/var/tmp"))
    load_before = os.getloadavg()
    try:
        rows = control_plane.run(
            workroot,
            args.backends.split(","),
            [int(n) for n in args.catalog_sizes.split(",")],
            serial,
            concurrent,
            tuple(args.topologies.split(",")),
        )
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    print(control_plane.render(rows))
    output = args.output.with_name("control-plane.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "ferry_version": __version__,
                "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": control_plane.host(load_before),
                "rows": [row.summary() for row in rows],
                "serial_samples_ms": {
                    f"{row.backend}-{row.topology}-{row.catalog_size}": row.serial_ms
                    for row in rows
                },
            },
            indent=2,
        )
    )
    print(f"\nloadavg before {load_before}, after {os.getloadavg()}; JSON written to {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="create/delete pairs per mode")
    parser.add_argument("--mount-rounds", type=int, default=10, help="volumes per filesystem")
    parser.add_argument("--fio-size", type=int, default=512, help="fio file size in MiB")
    parser.add_argument("--fio-runtime", type=int, default=3, help="seconds per fio job")
    parser.add_argument("--fio-repeats", type=int, default=5, help="runs per job and side")
    parser.add_argument(
        "--jobs",
        default=",".join(FIO_JOBS),
        help="comma-separated fio jobs (name prefixes: 'rand', 'seq-read 1M', ...)",
    )
    parser.add_argument("--fio-only", action="store_true", help="skip the RPC latency measurements")
    parser.add_argument(
        "--skip-encryption", action="store_true", help="skip the encrypted/plain comparison"
    )
    parser.add_argument(
        "--skip-pool", action="store_true", help="skip the volume/pool fio comparison"
    )
    parser.add_argument(
        "--parameter",
        type=parameter,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="StorageClass parameter for the fio volume (repeatable)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch dir (default: /var/tmp)"
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results/latest.json"))
    parser.add_argument("--quick", action="store_true", help="few rounds, short fio (smoke run)")
    parser.add_argument(
        "--control-plane",
        action="store_true",
        help="CreateVolume latency and throughput per backend and catalog size, nothing else",
    )
    parser.add_argument("--backends", default="sqlite,etcd", help="for --control-plane")
    parser.add_argument(
        "--topologies",
        default=",".join(control_plane.TOPOLOGIES),
        help="for --control-plane: all-in-one (one process) and/or split (a controller "
        "and a node process, the node over the catalog service; SQLite only)",
    )
    parser.add_argument(
        "--catalog-sizes", default="100,10000", help="existing volumes, for --control-plane"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root: it attaches loop devices and mounts filesystems")
        return 2
    if args.control_plane:
        return control_plane_main(args)
    if args.quick:
        args.rounds, args.mount_rounds, args.fio_size, args.fio_runtime = 20, 2, 64, 1
        args.fio_repeats = 1
    jobs = selected_jobs(args.jobs)
    crypt_jobs = [] if args.skip_encryption else selected_jobs(args.jobs, CRYPT_JOBS)
    workdir = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=args.workdir or "/var/tmp"))
    latencies: list[Latency] = []
    fio_results: list[FioResult] = []
    crypt_results: list[FioResult] = []
    load_before = os.getloadavg()
    try:
        with running_ferry(workdir) as bench:
            if not args.fio_only:
                progress(f"CreateVolume/DeleteVolume x{args.rounds}, one caller")
                latencies += bench.create_delete(args.rounds, 1)
                progress(f"CreateVolume/DeleteVolume x{args.rounds * 4}, 32 concurrent callers")
                latencies += bench.create_delete(args.rounds * 4, 32)
                for fs, size in (("ext4", 1 * GiB), ("xfs", 1 * GiB)):
                    progress(f"NodeStage+NodePublish x{args.mount_rounds} on {fs}")
                    latencies += bench.mount_latency(args.mount_rounds, fs, size)
            if not args.skip_pool:
                fio_results = throughput(
                    bench,
                    workdir / "pool",
                    jobs,
                    args.fio_size,
                    args.fio_runtime,
                    args.fio_repeats,
                    dict(args.parameter),
                )
            if crypt_jobs:
                crypt_results = encryption_cost(bench, crypt_jobs, args.fio_size, args.fio_repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = render(latencies, fio_results, crypt_results)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "ferry_version": __version__,
                "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": control_plane.host(load_before),
                "parameters": vars(args) | {"workdir": str(workdir), "output": str(args.output)},
                "latency": [lat.summary() for lat in latencies],
                "fio": [r.summary() for r in fio_results],
                "encryption": [r.summary(("encrypted", "plain")) for r in crypt_results],
            },
            indent=2,
        )
    )
    print(f"\nJSON written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
