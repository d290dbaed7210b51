"""``python -m bench.backup``: backup and restore throughput against ``cp``, and what
a second backup uploads after 1% of the volume changed.

One scratch directory (``--dir``) holds the source image and the target, so
both sides read and write the same disk. The image (``--size-gib``) is fully
written, one 4 MiB block in two random, the other compressible text (a
volume of logs and a database's pages, roughly). Before each timed run the
image is read once, so every side reads it from the page cache.

- ``cp``: ``cp image TARGET/copy`` then an fsync of the copy (a backup is
  only a backup once it is on disk; the table also shows ``cp`` without it);
  restore's baseline copies that file back out the same way.
- Ferry: ``backup_image`` into a fresh directory target (zstd + AES-GCM,
  every chunk fsynced before its manifest), then ``restore_image`` to a new
  file (every chunk authenticated and hash-checked, fsynced at the end).
  The target is read once before the restore, as ``cp``'s copy is before it
  is copied back: packs are written with O_DIRECT, so writing them no longer
  leaves them in the page cache.
- Incremental: 1% of the image changed, then a second backup; bytes put in
  the target are counted by the target itself (packs, indexes, manifest and
  claims). Two patterns: one clustered 1% region, and the same bytes as
  64 KiB writes scattered over the image.
- CPU: user + system seconds per GiB of the Ferry process (``getrusage``) for
  the backup and for the restore, and of ``cp`` (its child's usage): steadier
  than wall time on a shared machine.
- Memory: the peak RSS of each Ferry process (one backup and one restore),
  which the chunk buffers and the two pack buffers bound.

Rounds alternate (cp, Ferry, cp, Ferry...) and the table shows medians.
With ``--baseline TREE`` (another checkout of Ferry, e.g. a ``git worktree``
of the previous commit), each round also runs that tree's backup and
restore, so before and after are measured in the same run under the same
load. Each Ferry side runs in its own process (the tree's ``PYTHONPATH``),
timed inside it, not counting its start; ``cp`` runs once per round for both.
The page cache is warm for every side (reading what it copies); dropping it
would need ``/proc/sys/vm/drop_caches``, which on a shared machine slows
everyone's work, so the cold case is not measured here.
Prints a table and writes JSON (default ``bench/results/backup-latest.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import Repository, backup_image
from csi_driver.backup.targets import FilesystemTarget
from csi_driver.chunks.manifest import MiB

GiB = 1024 * MiB
BLOCK = 4 * MiB
SCATTER_WRITE = 64 * 1024


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def make_image(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    text = b"".join(
        f"{i:08d} GET /api/v1/items?id={i * 7919 % 100003} 200\n".encode()
        for i in range(BLOCK // 40)
    )[:BLOCK]
    with open(path, "wb") as handle:
        for index in range(size // BLOCK):
            handle.write(rng.randbytes(BLOCK) if index % 2 == 0 else text)
        handle.flush()
        os.fsync(handle.fileno())


def warm(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(BLOCK):
            pass


#: One timed backup and restore, run in a process of its own with a tree's PYTHONPATH:
#: argv is the image, the work directory and the key; prints the seconds as JSON.
_ONE_ROUND = """
import json, resource, shutil, sys, time
from pathlib import Path
from csi_driver.backup.keys import BackupKey
from csi_driver.backup.repository import Repository, backup_image, restore_image
from csi_driver.backup.targets import FilesystemTarget
image, work, key = Path(sys.argv[1]), Path(sys.argv[2]), BackupKey.parse(sys.argv[3])
target = FilesystemTarget(work / "ferry-target")
repo = Repository.open(target, key, create=True)
with open(image, "rb") as handle:  # warm, as for cp
    while handle.read(4 << 20):
        pass
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
before = cpu()
backup = backup_image(repo, image, volume_name="bench")
backup_cpu = cpu() - before
stored = sum(s.size for prefix in ("chunks/", "packs/") for s in target.list(prefix))
for prefix in ("chunks/", "packs/", "index/"):  # warm, as cp's restore reads its copy
    for s in target.list(prefix):
        target.get(s.key)
before = cpu()
restored = restore_image(repo, backup.backup.backup_id, work / "ferry-restored")
restore_cpu = cpu() - before
(work / "ferry-restored").unlink()
shutil.rmtree(target.root)
print(json.dumps({"backup_s": backup.elapsed_s, "restore_s": restored.elapsed_s, "stored": stored,
                  "backup_cpu_s": backup_cpu, "restore_cpu_s": restore_cpu,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def ferry_round(tree: Path, image: Path, work: Path, key: BackupKey) -> dict[str, float]:
    """One backup and restore by the Ferry in ``tree``, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", _ONE_ROUND, str(image), str(work), key.dump().strip()],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_cp(source: Path, destination: Path) -> tuple[float, float, float]:
    """Seconds for ``cp``, for ``cp`` plus an fsync of the copy, and ``cp``'s CPU."""
    destination.unlink(missing_ok=True)
    cpu = children_cpu()
    started = time.perf_counter()
    subprocess.run(["cp", str(source), str(destination)], check=True)
    copied = time.perf_counter() - started
    fsync_file(destination)
    return copied, time.perf_counter() - started, children_cpu() - cpu


def change(path: Path, fraction: float, seed: int, scattered: bool) -> int:
    """Overwrite ``fraction`` of ``path`` with random bytes; return the bytes written."""
    rng = random.Random(seed)
    size = path.stat().st_size
    total = int(size * fraction) // SCATTER_WRITE * SCATTER_WRITE
    fd = os.open(path, os.O_WRONLY)
    try:
        if scattered:
            slots = rng.sample(range(size // SCATTER_WRITE), total // SCATTER_WRITE)
            for slot in slots:
                os.pwrite(fd, rng.randbytes(SCATTER_WRITE), slot * SCATTER_WRITE)
        else:
            start = rng.randrange(0, (size - total) // BLOCK) * BLOCK
            os.pwrite(fd, rng.randbytes(total), start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


@dataclass
class Results:
    size_bytes: int
    rounds: int
    cp_s: list[float] = field(default_factory=list)
    cp_fsync_s: list[float] = field(default_factory=list)
    backup_s: list[float] = field(default_factory=list)
    restore_cp_s: list[float] = field(default_factory=list)
    restore_cp_fsync_s: list[float] = field(default_factory=list)
    restore_s: list[float] = field(default_factory=list)
    baseline: str = ""
    baseline_backup_s: list[float] = field(default_factory=list)
    baseline_restore_s: list[float] = field(default_factory=list)
    stored_bytes: int = 0
    cp_cpu_s: list[float] = field(default_factory=list)
    backup_cpu_s: list[float] = field(default_factory=list)
    restore_cpu_s: list[float] = field(default_factory=list)
    baseline_backup_cpu_s: list[float] = field(default_factory=list)
    baseline_restore_cpu_s: list[float] = field(default_factory=list)
    peak_rss_bytes: list[float] = field(default_factory=list)
    baseline_peak_rss_bytes: list[float] = field(default_factory=list)
    incremental: dict[str, dict[str, float]] = field(default_factory=dict)
    load_average: list[float] = field(default_factory=list)

    def rate(self, samples: list[float]) -> float:
        return self.size_bytes / statistics.median(samples) / MiB


def incremental(work: Path, size: int, scattered: bool) -> dict[str, float]:
    image = work / "incremental.img"
    make_image(image, size, seed=3)
    target = FilesystemTarget(work / f"incremental-{scattered}")
    repo = Repository.open(target, BackupKey.generate(), create=True)
    first = backup_image(repo, image, volume_name="bench")
    changed = change(image, 0.01, seed=4, scattered=scattered)
    second = backup_image(repo, image, volume_name="bench")
    shutil.rmtree(target.root)
    image.unlink()
    return {
        "changed_bytes": changed,
        "first_uploaded_bytes": first.bytes_uploaded,
        "second_uploaded_bytes": second.bytes_uploaded,
        "second_chunks_uploaded": second.chunks_uploaded,
        "second_blocks_uploaded": second.blocks_uploaded,
        "second_packs_uploaded": second.packs_uploaded,
        "second_uploaded_fraction": second.bytes_uploaded / size,
        "second_backup_s": second.elapsed_s,
    }


def run(args: argparse.Namespace, work: Path) -> Results:
    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    results = Results(size, args.rounds)
    image = work / "volume.img"
    progress(f"writing a {size / GiB:.2f} GiB image")
    make_image(image, size, seed=1)
    key = BackupKey.generate()
    this_tree = Path(__file__).resolve().parent.parent
    sides = [("after", this_tree)]
    if args.baseline is not None:
        results.baseline = str(args.baseline)
        sides.insert(0, ("before", args.baseline.resolve()))
    for round_ in range(args.rounds):
        progress(f"round {round_ + 1} of {args.rounds}")
        plain = work / "cp-target"
        plain.mkdir(exist_ok=True)
        warm(image)
        copied, synced, cpu = timed_cp(image, plain / "copy")
        results.cp_s.append(copied)
        results.cp_fsync_s.append(synced)
        results.cp_cpu_s.append(cpu)
        warm(plain / "copy")
        copied, synced, _ = timed_cp(plain / "copy", work / "cp-restored")
        results.restore_cp_s.append(copied)
        results.restore_cp_fsync_s.append(synced)
        shutil.rmtree(plain)
        (work / "cp-restored").unlink()

        # Alternate which side goes first, so neither always follows cp.
        for side, tree in sides if round_ % 2 == 0 else sides[::-1]:
            timed = ferry_round(tree, image, work, key)
            if side == "after":
                results.backup_s.append(timed["backup_s"])
                results.restore_s.append(timed["restore_s"])
                results.stored_bytes = int(timed["stored"])
                results.backup_cpu_s.append(timed["backup_cpu_s"])
                results.restore_cpu_s.append(timed["restore_cpu_s"])
                results.peak_rss_bytes.append(timed.get("peak_rss_bytes", 0.0))
            else:
                results.baseline_backup_s.append(timed["backup_s"])
                results.baseline_restore_s.append(timed["restore_s"])
                results.baseline_backup_cpu_s.append(timed["backup_cpu_s"])
                results.baseline_restore_cpu_s.append(timed["restore_cpu_s"])
                results.baseline_peak_rss_bytes.append(timed.get("peak_rss_bytes", 0.0))
        results.load_average.extend(os.getloadavg()[:1])
    if args.no_incremental:
        return results
    progress("incremental backups")
    patterns = (("clustered 1% (one region)", False), ("scattered 1% (64 KiB writes)", True))
    for name, scattered in patterns:
        results.incremental[name] = incremental(work, size, scattered)
    return results


def render(r: Results) -> str:
    def row(name: str, ferry: list[float], base: list[float], base_sync: list[float]) -> str:
        f, b, s = r.rate(ferry), r.rate(base), r.rate(base_sync)
        return f"| {name} | {f:.0f} | {b:.0f} | {s:.0f} | {f / b:.2f} | {f / s:.2f} |"

    lines = [
        f"{r.size_bytes / GiB:.2f} GiB image, {r.rounds} rounds (medians), "
        f"stored {r.stored_bytes / r.size_bytes:.0%} of it (zstd + AES-GCM), "
        f"1-minute load average per round {', '.join(f'{x:.1f}' for x in r.load_average)}",
        "",
        "| | Ferry MiB/s | cp MiB/s | cp + fsync MiB/s | ratio to cp | ratio to cp + fsync |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if r.baseline:
        lines += [
            row("backup, before", r.baseline_backup_s, r.cp_s, r.cp_fsync_s),
            row("backup, after", r.backup_s, r.cp_s, r.cp_fsync_s),
            row("restore, before", r.baseline_restore_s, r.restore_cp_s, r.restore_cp_fsync_s),
            row("restore, after", r.restore_s, r.restore_cp_s, r.restore_cp_fsync_s),
        ]
    else:
        lines += [
            row("backup", r.backup_s, r.cp_s, r.cp_fsync_s),
            row("restore", r.restore_s, r.restore_cp_s, r.restore_cp_fsync_s),
        ]
    gib = r.size_bytes / GiB

    def cpu(samples: list[float]) -> str:
        return ", ".join(f"{s / gib:.2f}" for s in samples) if samples else "-"

    lines += [
        "",
        "| CPU s/GiB (user + system, per round) | backup | restore |",
        "|---|---|---|",
        f"| Ferry | {cpu(r.backup_cpu_s)} | {cpu(r.restore_cpu_s)} |",
    ]
    if r.baseline:
        lines.append(
            f"| Ferry, before | {cpu(r.baseline_backup_cpu_s)} | {cpu(r.baseline_restore_cpu_s)} |"
        )
    lines.append(f"| cp | {cpu(r.cp_cpu_s)} | |")

    def rss(samples: list[float]) -> str:
        return ", ".join(f"{s / MiB:.0f}" for s in samples) if any(samples) else "-"

    peak = rss(r.peak_rss_bytes)
    lines += ["", f"Peak RSS of the Ferry process (backup and restore), MiB: {peak}"]
    if r.baseline:
        lines[-1] += f"; before: {rss(r.baseline_peak_rss_bytes)}"
    if not r.incremental:
        return "\n".join(lines)
    lines += [
        "",
        "| second backup after 1% changed | blocks uploaded | packs | bytes uploaded "
        "| of the volume |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, inc in r.incremental.items():
        lines.append(
            f"| {name} | {inc['second_blocks_uploaded']:.0f} | "
            f"{inc['second_packs_uploaded']:.0f} | "
            f"{inc['second_uploaded_bytes'] / MiB:.1f} MiB | "
            f"{inc['second_uploaded_fraction']:.2%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backup", description=__doc__)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument(
        "--baseline", type=Path, help="another Ferry tree to measure in the same rounds"
    )
    parser.add_argument("--no-incremental", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("bench/results/backup-latest.json"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-backup-", dir=args.dir))
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
