"""``python -m csi_driver.transfer``: serve exported images, or pull one into a replica.

One process per side, as a node service would run them; used by the tests
(killed and restarted for real) and the benchmark (inside network
namespaces). Each prints JSON lines on stdout: ``ready`` / ``landed`` as it
goes, then ``done`` or ``stopped`` with what it measured, peak RSS included.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csi_driver import allocator
from csi_driver import log as ferry_log
from csi_driver.chunks.changes import ChangeTracker
from csi_driver.chunks.generations import GenerationStore
from csi_driver.chunks.manifest import DEFAULT_CHUNK_SIZE, MiB
from csi_driver.core.errors import FerryError, InvalidArgument
from csi_driver.pki import Identity, TlsBundle
from csi_driver.transfer.progress import Progress
from csi_driver.transfer.receiver import CHANNEL_OPTIONS, Receiver
from csi_driver.transfer.source import Exports, serve_chunks
from csi_driver.transport import AgentSecurity, open_channel


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> float:
    """CPU time this process used so far, user and system, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 2)


#: This process's CPU seconds once its imports are done: Python's start and the
#: imports, not the transfer's (a node's services are resident).
STARTUP_CPU_S = cpu_seconds()


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _security(tls_dir: Path) -> AgentSecurity:
    return AgentSecurity(tls=TlsBundle.load(tls_dir))


def serve(args: argparse.Namespace) -> int:
    exports = Exports()
    described = []
    trackers: list[ChangeTracker] = []
    for spec in args.export:
        transfer_id, sep, path = spec.partition("=")
        if not sep or not path:
            raise InvalidArgument(f"--export {spec!r} is not TRANSFER_ID=IMAGE_PATH")
        started = time.monotonic()
        tracker = ChangeTracker(Path(path), args.work_dir / transfer_id, args.chunk_size)
        capture = tracker.capture(keep_older=True)
        trackers.append(tracker)
        exports.add(transfer_id, capture.source, capture.manifest, capture.blocks)
        described.append(
            {
                "transfer": transfer_id,
                "method": capture.method.value,
                "bytes_read": capture.bytes_read,
                "data_bytes": capture.manifest.data_bytes,
                "capture_s": round(time.monotonic() - started, 3),
            }
        )
    server, endpoint = serve_chunks(args.listen, exports, _security(args.tls_dir), args.node_id)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    emit("ready", endpoint=str(endpoint), exports=described)
    for tracker in trackers:  # freed while the receivers pull, not before
        tracker.retire_older()
    stop.wait()
    server.stop(grace=1).wait()
    sent = {d["transfer"]: exports.require(str(d["transfer"])).sent.total() for d in described}
    emit(
        "stopped",
        sent_chunks=sent,
        peak_rss_bytes=peak_rss_bytes(),
        cpu_s=cpu_seconds(),
        startup_cpu_s=STARTUP_CPU_S,
    )
    return 0


def pull(args: argparse.Namespace) -> int:
    security = _security(args.tls_dir)
    server = Identity.node(args.server_node)

    def landed(index: int, progress: Progress) -> None:
        if args.report_chunks:
            emit("landed", chunk=index, done_bytes=progress.bytes_done)

    receiver = Receiver(
        lambda: open_channel(args.source, security, server, CHANNEL_OPTIONS),
        window_bytes=args.window_mib * MiB,
        on_landed=landed,
        max_rate_bytes_per_s=args.max_rate_mib * MiB if args.max_rate_mib else None,
    )
    started = time.monotonic()
    store = GenerationStore(args.replica)
    result = receiver.pull(args.transfer, store)
    emit(
        "done",
        generation=result.generation.number,
        image=str(result.generation.image),
        chunks_received=result.chunks_received,
        chunks_rejected=result.chunks_rejected,
        landed_before=result.landed_before,
        bytes_received=result.bytes_received,
        chunk_bytes=result.progress.bytes_this_session,
        seconds=round(time.monotonic() - started, 3),
        rate_mib_s=round(result.progress.rate_bytes_per_s / MiB, 1),
        phases=dict(result.phases),
        peak_rss_bytes=peak_rss_bytes(),
        cpu_s=cpu_seconds(),
        startup_cpu_s=STARTUP_CPU_S,
    )
    store.retire_older()  # the new generation is reported: the old one can go
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m csi_driver.transfer", description=__doc__)
    top.add_argument("--log-level", default="warning")
    sub = top.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="export images to the other nodes")
    s.add_argument("--listen", required=True, help="tcp://HOST:PORT")
    s.add_argument("--node-id", required=True)
    s.add_argument("--tls-dir", type=Path, required=True, help="this node's certificates")
    s.add_argument("--export", action="append", default=[], help="TRANSFER_ID=IMAGE_PATH")
    s.add_argument("--work-dir", type=Path, required=True, help="captures (reflink snapshots)")
    s.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    s.set_defaults(run=serve)
    p = sub.add_parser("pull", help="pull an exported image into a replica")
    p.add_argument("--source", required=True, help="the sending node's tcp://HOST:PORT")
    p.add_argument("--server-node", required=True, help="the sending node's id")
    p.add_argument("--tls-dir", type=Path, required=True, help="this node's certificates")
    p.add_argument("--transfer", required=True)
    p.add_argument("--replica", type=Path, required=True, help="the replica's directory")
    p.add_argument("--window-mib", type=int, default=16, help="bytes in flight at most")
    p.add_argument("--max-rate-mib", type=float, default=0, help="MiB/s at most (0: no cap)")
    p.add_argument("--report-chunks", action="store_true", help="a line per landed chunk")
    p.set_defaults(run=pull)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # As a node service sets its allocator (cli.py), before any thread starts.
    allocator.limit_arenas()
    ferry_log.configure(args.log_level)
    try:
        return int(args.run(args))
    except FerryError as exc:
        emit("failed", error=type(exc).__name__, message=exc.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
