"""``python -m bench.transfer``: node-to-node transfer against the raw limit and rsync.

Two hosts are two network namespaces on a bridge; each gets a pool on its
own small xfs filesystem (reflinks) on a loop device. The sending pool holds
a thick image of ``--image-gib`` with ``--data-gib`` of random data (three
of every four 4 MiB blocks). In one run, back to back:

1. raw limit: ``dd`` reads the whole image and a plain TCP socket carries
   the bytes from one namespace to the other, which writes them to its pool
   and fsyncs; then the same around the page cache (``dd iflag=direct``,
   O_DIRECT writes from an aligned buffer), as Ferry reads and writes;
2. Ferry full transfer: the sender captures the image (a reflink snapshot,
   hashed once), the receiver pulls every data chunk over mutual TLS,
   checks each, writes it and verifies the whole generation before commit
   (the ratio is given for the pull alone and for capture + pull);
3. 64 MiB of scattered 64 KiB writes to the image, then
   - Ferry incremental: capture (extent comparison with the last snapshot,
     only changed blocks read) plus pull of the delta into a new generation
     (chunks the replica holds are sent by their changed 64 KiB blocks);
   - ``rsync --inplace --no-whole-file`` of the same image to a copy of
     its previous state held by an rsync daemon in the other namespace.

Prints a table and writes JSON (default ``bench/results/transfer-latest.json``).
Needs root, mkfs.xfs and rsync (scripts/setup.sh installs them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from csi_driver.chunks.manifest import MiB
from csi_driver.node.pool import preallocate
from csi_driver.node.runner import CommandRunner
from csi_driver.pki import CertificateAuthority, Identity
from csi_driver.sandbox.network import in_namespace, linked_namespaces
from csi_driver.sandbox.scratch import scratch_filesystem

GiB = 1024 * MiB
BLOCK = 4 * MiB
PORT = 7443
RAW_PORT = 7444
RSYNC_PORT = 7873
SCATTER_BYTES = 64 * MiB
SCATTER_WRITE = 64 * 1024
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

# The raw receiver writes what arrives to a file on the receiving pool and
# fsyncs it, as any move must: the limit is read + network + write. With
# "direct" it writes 4 MiB at a time around the page cache (O_DIRECT from an
# aligned buffer), as Ferry's receiver does: the same limit without the page
# cache's cost, so that Ferry is also compared with a path that avoids it.
SINK = """
import mmap, os, socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
conn, _ = server.accept()
total = 0
if sys.argv[4] == "direct":
    fd = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    block = mmap.mmap(-1, 4 << 20)
    view = memoryview(block)
    filled = 0
    while got := conn.recv_into(view[filled:]):
        filled += got
        if filled == len(view):
            os.pwrite(fd, view, total)
            total, filled = total + filled, 0
    if filled:
        tail = os.open(sys.argv[3], os.O_WRONLY)
        os.pwrite(tail, view[:filled], total)
        os.fsync(tail)
        os.close(tail)
        total += filled
    os.fsync(fd)
    os.close(fd)
else:
    with open(sys.argv[3], "wb") as out:
        while data := conn.recv(1 << 20):
            out.write(data)
            total += len(data)
        out.flush()
        os.fsync(out.fileno())
print(total, flush=True)
"""
PUSH = """
import os, socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
while data := os.read(0, 1 << 20):
    sock.sendall(data)
sock.close()
"""


def children_cpu_seconds() -> float:
    """CPU time of the child processes waited for so far (user and system)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def settle() -> None:
    """Write back every dirty page before a timed step, so that neither side pays
    for what the bench wrote before it (the 3 GiB copy rsync starts from, made
    just before Ferry's incremental, would otherwise be flushed by Ferry's first
    fsyncs on the receiving pool). Caches are kept warm for both: nothing is dropped."""
    os.sync()


def make_image(path: Path, size: int, data: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        preallocate(fd, 0, size, "bench image")
        written = 0
        for index in range(size // BLOCK):
            if index % 4 == 3 or written >= data:
                continue
            os.pwrite(fd, os.urandom(BLOCK), index * BLOCK)
            written += BLOCK
        os.fsync(fd)
    finally:
        os.close(fd)


def scatter(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        slots = os.fstat(fd).st_size // SCATTER_WRITE
        for slot in rng.sample(range(slots), SCATTER_BYTES // SCATTER_WRITE):
            os.pwrite(fd, rng.randbytes(SCATTER_WRITE), slot * SCATTER_WRITE)
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def netns(name: str, argv: list[str]) -> list[str]:
    return list(in_namespace(name, tuple(argv)))


def json_lines(child: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert child.stdout is not None
    for line in child.stdout:
        yield json.loads(line)


#: Each node's pool: xfs, so replica generations are reflinked.
XFS_REFLINK = ("mkfs.xfs", "-q", "-m", "reflink=1")


@dataclass(frozen=True)
class Results:
    chunk_size: int
    image_bytes: int
    data_bytes: int
    raw_seconds: float
    raw_mib_s: float
    #: The same path reading and writing around the page cache (O_DIRECT).
    raw_direct_seconds: float
    raw_direct_cpu_seconds: float
    full_capture_seconds: float
    full_pull_seconds: float
    full_ratio_time: float  # raw seconds / Ferry pull seconds (image moved either way)
    full_ratio_throughput: float  # Ferry data MiB/s / raw MiB/s
    full_ratio_throughput_with_capture: float  # the same, the sender's capture included
    full_ratio_time_with_capture: float  # raw seconds / (capture + pull seconds)
    full_ratio_time_with_capture_direct: float  # the same against the direct raw path
    raw_cpu_seconds: float  # dd, the pushing and the receiving process
    full_cpu_seconds: float  # Ferry's sender (capture included) and receiver
    incremental_capture_seconds: float
    incremental_capture_bytes_read: int
    incremental_pull_seconds: float
    incremental_chunks: int
    incremental_bytes_received: int  # what crossed the wire: changed blocks and digests
    incremental_phases: dict[str, float]
    rsync_seconds: float
    incremental_speedup_vs_rsync: float
    #: CPU of the whole processes (Ferry's include Python's start and imports).
    incremental_cpu_seconds: float
    #: The same without Python's start and imports (a node's services are resident).
    incremental_work_cpu_seconds: float
    rsync_cpu_seconds: float
    sender_peak_rss_mib: float
    receiver_peak_rss_mib: float


class TransferBench:
    def __init__(self, work: Path, sender_ns: Any, receiver_ns: Any, chunk_size: int) -> None:
        self.work = work
        self.chunk_size = chunk_size
        self.children: list[subprocess.Popen[str]] = []
        self.ca = CertificateAuthority.create()
        self.a = sender_ns
        self.b = receiver_ns

    def spawn(self, argv: list[str]) -> subprocess.Popen[str]:
        """A child process, killed by :meth:`kill_all` if it is still running."""
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=ENV)
        self.children.append(child)
        return child

    def kill_all(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()

    def certificates(self, name: str) -> Path:
        directory = self.work / "tls" / name.replace("/", "-")
        if not directory.exists():
            self.ca.issue(Identity.parse(name)).write(directory)
        return directory

    def raw(self, image: Path, landing: Path, *, direct: bool = False) -> tuple[float, int]:
        mode = "direct" if direct else "buffered"
        argv = [sys.executable, "-c", SINK, self.b.address, str(RAW_PORT), str(landing), mode]
        sink = self.spawn(netns(self.b.name, argv))
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "listening"
        started = time.perf_counter()
        read = ["dd", f"if={image}", "bs=4M", "status=none", *(["iflag=direct"] if direct else [])]
        dd = subprocess.Popen(read, stdout=subprocess.PIPE)
        push = netns(self.a.name, [sys.executable, "-c", PUSH, self.b.address, str(RAW_PORT)])
        subprocess.run(push, stdin=dd.stdout, check=True)
        assert dd.stdout is not None
        dd.stdout.close()
        dd.wait()
        total = int(sink.stdout.readline().split()[0])
        sink.wait()
        return time.perf_counter() - started, total

    def serve(self, image: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        argv = [
            sys.executable, "-m", "csi_driver.transfer", "serve",
            "--listen", f"tcp://{self.a.address}:{PORT}", "--node-id", "sender",
            "--tls-dir", str(self.certificates("node/sender")),
            "--export", f"vol={image}", "--work-dir", str(image.parent / "captures"),
            "--chunk-size", str(self.chunk_size),
        ]  # fmt: skip
        child = self.spawn(netns(self.a.name, argv))
        ready = next(json_lines(child))
        if ready["event"] != "ready":
            raise RuntimeError(f"sender failed: {ready}")
        return child, ready["exports"][0]

    def stop(self, child: subprocess.Popen[str]) -> dict[str, Any]:
        child.terminate()
        stopped = next(json_lines(child))
        child.wait()
        return stopped

    def pull(self, replica: Path) -> dict[str, Any]:
        argv = [
            sys.executable, "-m", "csi_driver.transfer", "pull",
            "--source", f"tcp://{self.a.address}:{PORT}", "--server-node", "sender",
            "--tls-dir", str(self.certificates("node/receiver")),
            "--transfer", "vol", "--replica", str(replica),
        ]  # fmt: skip
        out = subprocess.run(
            netns(self.b.name, argv), capture_output=True, text=True, env=ENV, check=False
        )
        done: dict[str, Any] = json.loads(out.stdout.splitlines()[-1]) if out.stdout else {}
        if done.get("event") != "done":
            raise RuntimeError(f"pull failed: {done} {out.stderr[-2000:]}")
        return done

    @contextmanager
    def rsync_daemon(self, module: Path) -> Iterator[None]:
        config = self.work / "rsyncd.conf"
        config.write_text(
            f"port = {RSYNC_PORT}\nuse chroot = no\n[bench]\npath = {module}\n"
            "read only = no\nuid = root\ngid = root\n"
        )
        argv = ["rsync", "--daemon", "--no-detach", f"--config={config}"]
        daemon = subprocess.Popen(netns(self.b.name, argv))
        try:
            time.sleep(0.5)
            yield
        finally:
            daemon.terminate()
            daemon.wait()

    def rsync(self, image: Path, name: str) -> float:
        argv = [
            "rsync", "--inplace", "--no-whole-file", str(image),
            f"rsync://{self.b.address}:{RSYNC_PORT}/bench/{name}",
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(netns(self.a.name, argv), check=True)
        return time.perf_counter() - started


def run(args: argparse.Namespace, work: Path) -> Results:
    size, data = int(args.image_gib * GiB), int(args.data_gib * GiB)
    size -= size % BLOCK
    prefix = f"fb{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        # Image, snapshots sharing it, a replica, its next generation, rsync's copy.
        fs_size = size * 3 + GiB
        sender_pool = stack.enter_context(scratch_filesystem(work, fs_size, XFS_REFLINK, "sender"))
        receiver_pool = stack.enter_context(
            scratch_filesystem(work, fs_size, XFS_REFLINK, "receiver")
        )
        a, b = stack.enter_context(linked_namespaces(CommandRunner(), prefix))
        bench = TransferBench(work, a, b, args.chunk_kib * 1024)
        stack.callback(bench.kill_all)  # first out: before namespaces and mounts go
        image = sender_pool / "vol.img"
        progress(f"writing a {size / GiB:.1f} GiB thick image with {data / GiB:.1f} GiB of data")
        make_image(image, size, data)
        replica = receiver_pool / "replica"

        progress("raw limit: dd | TCP socket between the namespaces")
        cpu = children_cpu_seconds()
        raw_seconds, raw_bytes = bench.raw(image, receiver_pool / "raw.img")
        raw_cpu = children_cpu_seconds() - cpu
        assert raw_bytes == size
        (receiver_pool / "raw.img").unlink()
        settle()

        progress("raw limit around the page cache: dd iflag=direct | TCP | O_DIRECT writes")
        cpu = children_cpu_seconds()
        direct_seconds, direct_bytes = bench.raw(image, receiver_pool / "raw.img", direct=True)
        direct_cpu = children_cpu_seconds() - cpu
        assert direct_bytes == size
        (receiver_pool / "raw.img").unlink()
        settle()

        progress("Ferry full transfer")
        cpu = children_cpu_seconds()
        sender, capture = bench.serve(image)
        full = bench.pull(replica)
        stopped = bench.stop(sender)
        full_cpu = children_cpu_seconds() - cpu
        rss = [stopped["peak_rss_bytes"], 0]
        rss[1] = full["peak_rss_bytes"]
        assert file_digest(Path(full["image"])) == file_digest(image)

        progress("rsync's starting point: the receiver's copy of the image as it is now")
        rsync_dir = receiver_pool / "rsync"
        rsync_dir.mkdir()
        shutil.copyfile(Path(full["image"]), rsync_dir / "vol.img")
        # As a real earlier copy would be: older than the source's next change
        # (rsync skips files whose size and mtime match).
        earlier = image.stat().st_mtime - 60
        os.utime(rsync_dir / "vol.img", (earlier, earlier))

        progress(f"{SCATTER_BYTES // MiB} MiB of scattered {SCATTER_WRITE // 1024} KiB writes")
        scatter(image, seed=args.seed)

        progress("Ferry incremental: capture by extents, pull the delta")
        settle()
        cpu = children_cpu_seconds()
        sender, incremental_capture = bench.serve(image)
        incremental = bench.pull(replica)
        stopped = bench.stop(sender)
        incremental_cpu = children_cpu_seconds() - cpu
        startup_cpu = stopped["startup_cpu_s"] + incremental["startup_cpu_s"]
        rss[0] = max(rss[0], stopped["peak_rss_bytes"])
        rss[1] = max(rss[1], incremental["peak_rss_bytes"])
        assert file_digest(Path(incremental["image"])) == file_digest(image)

        progress("rsync --inplace --no-whole-file of the same change")
        with bench.rsync_daemon(rsync_dir):
            settle()
            cpu = children_cpu_seconds()
            rsync_seconds = bench.rsync(image, "vol.img")
        rsync_cpu = children_cpu_seconds() - cpu
        assert file_digest(rsync_dir / "vol.img") == file_digest(image)

    raw_mib_s = size / MiB / raw_seconds
    full_mib_s = capture["data_bytes"] / MiB / full["seconds"]
    ferry_incremental = incremental_capture["capture_s"] + incremental["seconds"]
    ferry_full = capture["capture_s"] + full["seconds"]
    return Results(
        chunk_size=args.chunk_kib * 1024,
        image_bytes=size,
        data_bytes=capture["data_bytes"],
        raw_seconds=round(raw_seconds, 2),
        raw_mib_s=round(raw_mib_s, 1),
        raw_direct_seconds=round(direct_seconds, 2),
        raw_direct_cpu_seconds=round(direct_cpu, 1),
        full_ratio_time_with_capture=round(raw_seconds / ferry_full, 2),
        full_ratio_time_with_capture_direct=round(direct_seconds / ferry_full, 2),
        full_capture_seconds=capture["capture_s"],
        full_pull_seconds=full["seconds"],
        full_ratio_time=round(raw_seconds / full["seconds"], 2),
        full_ratio_throughput=round(full_mib_s / raw_mib_s, 2),
        raw_cpu_seconds=round(raw_cpu, 1),
        full_cpu_seconds=round(full_cpu, 1),
        full_ratio_throughput_with_capture=round(
            capture["data_bytes"] / MiB / (capture["capture_s"] + full["seconds"]) / raw_mib_s, 2
        ),
        incremental_capture_seconds=incremental_capture["capture_s"],
        incremental_capture_bytes_read=incremental_capture["bytes_read"],
        incremental_pull_seconds=incremental["seconds"],
        incremental_chunks=incremental["chunks_received"],
        incremental_bytes_received=incremental["bytes_received"],
        incremental_phases=incremental["phases"],
        rsync_seconds=round(rsync_seconds, 2),
        incremental_speedup_vs_rsync=round(rsync_seconds / ferry_incremental, 1),
        incremental_cpu_seconds=round(incremental_cpu, 1),
        incremental_work_cpu_seconds=round(incremental_cpu - startup_cpu, 2),
        rsync_cpu_seconds=round(rsync_cpu, 1),
        sender_peak_rss_mib=round(rss[0] / MiB, 1),
        receiver_peak_rss_mib=round(rss[1] / MiB, 1),
    )


def render(r: Results) -> str:
    gib = r.image_bytes / GiB
    return "\n".join(
        [
            f"| Measure ({gib:.1f} GiB image, {r.data_bytes / GiB:.2f} GiB data, "
            f"{r.chunk_size // 1024} KiB chunks) | value |",
            "|---|---:|",
            "| raw limit: dd + plain TCP + write, whole image "
            f"| {r.raw_seconds} s ({r.raw_mib_s} MiB/s) |",
            f"| Ferry full: sender capture (snapshot + hash) | {r.full_capture_seconds} s |",
            f"| Ferry full: pull, verify, commit | {r.full_pull_seconds} s |",
            f"| full ratio, raw time / Ferry pull time | {r.full_ratio_time} |",
            "| full ratio with the capture, raw time / (capture + pull) "
            f"| {r.full_ratio_time_with_capture} |",
            "| raw around the page cache: dd iflag=direct + TCP + O_DIRECT writes "
            f"| {r.raw_direct_seconds} s ({r.raw_direct_cpu_seconds} CPU s) |",
            "| full ratio with the capture, direct raw time / (capture + pull) "
            f"| {r.full_ratio_time_with_capture_direct} |",
            f"| full ratio, Ferry data MiB/s / raw MiB/s | {r.full_ratio_throughput} |",
            "| full ratio with the capture, Ferry data MiB/s / raw MiB/s "
            f"| {r.full_ratio_throughput_with_capture} |",
            "| CPU seconds, raw / Ferry full (both sides, capture included) "
            f"| {r.raw_cpu_seconds} / {r.full_cpu_seconds} |",
            f"| Ferry incremental: capture by extents | {r.incremental_capture_seconds} s "
            f"({r.incremental_capture_bytes_read / MiB:.0f} MiB read) |",
            f"| Ferry incremental: pull {r.incremental_chunks} chunks "
            f"({r.incremental_bytes_received / MiB:.1f} MiB on the wire), verify, commit "
            f"| {r.incremental_pull_seconds} s |",
            f"| ... of which {' / '.join(r.incremental_phases)} "
            f"| {' / '.join(f'{v} s' for v in r.incremental_phases.values())} |",
            f"| rsync --inplace --no-whole-file | {r.rsync_seconds} s |",
            "| incremental speed-up vs rsync (capture + pull) "
            f"| {r.incremental_speedup_vs_rsync}x |",
            "| CPU seconds, Ferry incremental (whole processes) / rsync (both ends) "
            f"| {r.incremental_cpu_seconds} / {r.rsync_cpu_seconds} |",
            "| CPU seconds, Ferry incremental without Python's start and imports "
            f"| {r.incremental_work_cpu_seconds} |",
            f"| peak RSS, sender / receiver | {r.sender_peak_rss_mib} / "
            f"{r.receiver_peak_rss_mib} MiB |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transfer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--image-gib", type=float, default=4.0)
    parser.add_argument("--data-gib", type=float, default=3.0)
    parser.add_argument("--chunk-kib", type=int, default=4096, help="Ferry's chunk size")
    parser.add_argument("--seed", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default /var/tmp)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/transfer-latest.json"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the transfer benchmark needs root: loop devices, mounts, network namespaces")
        return 2
    for tool in ("mkfs.xfs", "rsync", "dd"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: run scripts/setup.sh")
            return 2
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-transfer-", dir=args.workdir or "/var/tmp"))
    try:
        results = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"results": asdict(results)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
