"""Replica generations on real files: deltas applied into a new generation, verified
whole before an atomic commit; corrupt chunks never committed; a process killed
mid-apply leaves the old generation intact and a retry completes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.chunks.blocks import BlockTable
from csi_driver.chunks.generations import GenerationStore, Staging, differing_entries
from csi_driver.chunks.manifest import BLOCK_SIZE, Manifest, MiB, block_digests
from csi_driver.chunks.scan import scan_image
from csi_driver.core.errors import DataLoss, FailedPrecondition
from csi_driver.node.pool import punch_hole
from tests.chunks.images import write_at, write_image
from tests.node.conftest import requires_root, small_filesystem

CHUNK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


def make_image(path: Path, chunks: dict[int, bytes], count: int) -> Manifest:
    write_image(path, chunks, count, CHUNK)
    return scan_image(path, CHUNK).manifest


def fill(staging: Staging, source: Path) -> int:
    """Write the chunks ``staging`` lacks from ``source``; return how many."""
    missing = staging.missing()
    with open(source, "rb") as handle:
        for index in missing:
            offset, length = staging.target.span(index)
            handle.seek(offset)
            staging.write(index, handle.read(length))
    return len(missing)


def apply(store: GenerationStore, source: Path, target: Manifest) -> int:
    """Stage ``target`` from ``source``'s bytes and commit; return chunks written."""
    staging = store.stage(target)
    written = fill(staging, source)
    staging.commit()
    return written


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generations_follow_the_source_and_send_only_what_changed(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    store = GenerationStore(tmp_path / "replica")
    first = make_image(source, {0: b"\1" * CHUNK, 3: b"\2" * CHUNK, 9: b"\3" * 10}, 16)
    assert apply(store, source, first) == 3
    one = store.current()
    assert one is not None and one.number == 1 and digest(one.image) == digest(source)

    second = make_image(source, {3: b"\4" * CHUNK, 12: b"\5" * CHUNK}, 16)  # 0 and 9 now zero
    staging = store.stage(second)
    assert staging.missing() == [3, 12]
    # Until the commit the previous generation is current, untouched.
    assert store.current() == one and digest(one.image) != digest(source)
    fill(staging, source)
    two = staging.commit()
    assert two.number == 2 and store.current() == two
    assert digest(two.image) == digest(source)
    store.retire_older()
    assert not one.image.exists()


def test_a_corrupt_chunk_is_refused_and_never_lands(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    target = make_image(source, {1: b"\1" * CHUNK, 2: b"\2" * CHUNK}, 4)
    store = GenerationStore(tmp_path / "replica")
    staging = store.stage(target)
    with pytest.raises(DataLoss, match="chunk 1 does not match"):
        staging.write(1, b"\1" * (CHUNK - 1) + b"\0")
    with pytest.raises(DataLoss):
        staging.write(0, b"\1" * CHUNK)  # a hole in the target
    staging.write(2, b"\2" * CHUNK)
    staging.sync()
    assert staging.missing() == [1]
    with pytest.raises(FailedPrecondition, match="1 chunks have not landed"):
        staging.commit()
    assert store.current() is None


def test_bytes_damaged_on_disk_after_landing_are_caught_at_commit(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    target = make_image(source, {1: b"\1" * CHUNK, 2: b"\2" * CHUNK}, 4)
    store = GenerationStore(tmp_path / "replica")
    staging = store.stage(target)
    staging.write(1, b"\1" * CHUNK)
    staging.write(2, b"\2" * CHUNK)
    staging.sync()
    with open(staging.image, "r+b") as handle:  # bit rot under the staged image
        handle.seek(2 * CHUNK + 17)
        handle.write(b"\xff")
    with pytest.raises(DataLoss, match=r"chunks \[2\]"):
        staging.commit()
    assert store.current() is None
    # The damaged chunk was forgotten, so a retry asks for it again and commits.
    retry = store.stage(target)
    assert retry.missing() == [2]
    assert apply(store, source, target) == 1
    current = store.current()
    assert current is not None and digest(current.image) == digest(source)


def test_chunks_read_back_as_they_land_are_not_read_again_and_rot_before_it_is_caught(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source.img"
    chunks = {i: bytes([i + 1]) * CHUNK for i in range(4)}
    target = make_image(source, chunks, 6)  # chunks 4 and 5 are holes
    store = GenerationStore(tmp_path / "replica")
    staging = store.stage(target)
    fill(staging, source)
    landed = staging.sync()
    write_at(staging.image, 2 * CHUNK + 17, b"\xff")  # rots before it is read back
    assert staging.read_back(landed) == 4 * CHUNK
    with pytest.raises(DataLoss, match=r"chunks \[2\]"):
        staging.commit()
    assert staging.verified_bytes == CHUNK  # only the chunk that did not match is read again
    assert apply(store, source, target) == 1
    current = store.current()
    assert current is not None and digest(current.image) == digest(source)


def test_a_placed_chunk_lands_only_once_read_back_from_disk_as_the_target(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source.img"
    chunks = {i: bytes([i + 1]) * CHUNK for i in range(3)}
    target = make_image(source, chunks, 4)  # chunk 3 is a hole
    store = GenerationStore(tmp_path / "replica")
    staging = store.stage(target)
    with pytest.raises(DataLoss, match="chunk 1 arrived with"):
        staging.place(1, chunks[1][:-1])
    with pytest.raises(DataLoss, match="chunk 3 is not a data chunk"):
        staging.place(3, bytes(CHUNK))
    staging.place(0, chunks[0])
    staging.place(1, b"\7" * CHUNK)  # corrupt, and written: found when read back
    staging.place(2, chunks[2])
    write_at(staging.image, 2 * CHUNK + 5, b"\xff")  # rots after it was written
    assert staging.sync() == [0]
    assert sorted(staging.take_rejected()) == [1, 2] and staging.take_rejected() == []
    assert staging.missing() == [1, 2]
    staging.place(1, chunks[1])
    staging.place(2, chunks[2])
    assert sorted(staging.sync()) == [1, 2]
    # Read back once, as they landed: the commit reads none of them again.
    assert staging.read_back([0, 1, 2]) == 0
    generation = staging.commit()
    assert staging.verified_bytes == 0
    assert digest(generation.image) == digest(source)


def test_placed_chunks_that_never_landed_are_fetched_again_after_a_restart(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source.img"
    chunks = {i: bytes([i + 1]) * CHUNK for i in range(4)}
    target = make_image(source, chunks, 4)
    store = GenerationStore(tmp_path / "replica")
    before = make_image(tmp_path / "old.img", {0: b"\x09" * CHUNK}, 4)
    apply(store, tmp_path / "old.img", before)
    old = store.current()
    assert old is not None
    staging = store.stage(target)
    staging.place(0, chunks[0])
    staging.place(1, chunks[1])
    assert sorted(staging.sync()) == [0, 1]
    staging.place(2, chunks[2])  # written, never synced: the process dies here
    resumed = GenerationStore(tmp_path / "replica").stage(target)
    assert resumed.missing() == [2, 3]
    assert store.current() == old and digest(old.image) == digest(tmp_path / "old.img")
    for index in resumed.missing():
        resumed.place(index, chunks[index])
    resumed.sync()
    generation = resumed.commit()
    assert generation.number == 2 and digest(generation.image) == digest(source)


APPLY_SLOWLY = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from csi_driver.chunks.generations import GenerationStore, Staging, differing_entries
    from csi_driver.chunks.scan import scan_image

    source, root = Path(sys.argv[1]), Path(sys.argv[2])
    target = scan_image(source, int(sys.argv[3])).manifest
    staging = GenerationStore(root).stage(target)
    with open(source, "rb") as handle:
        for index in staging.missing():
            offset, length = target.span(index)
            handle.seek(offset)
            staging.write(index, handle.read(length))
            staging.sync()
            print(index, flush=True)
            time.sleep(0.05)
    staging.commit()
    print("committed", flush=True)
    """
)


def test_a_process_killed_mid_apply_leaves_the_old_generation_and_a_retry_completes(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source.img"
    store = GenerationStore(tmp_path / "replica")
    first = make_image(source, {i: bytes([i + 1]) * CHUNK for i in range(0, 32, 2)}, 32)
    apply(store, source, first)
    old = store.current()
    assert old is not None
    old_digest = digest(old.image)
    second = make_image(source, {i: bytes([i + 100]) * CHUNK for i in range(32)}, 32)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", APPLY_SLOWLY, str(source), str(store.root), str(CHUNK)]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        landed_before_kill = [child.stdout.readline() for _ in range(10)]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert all(line.strip().isdigit() for line in landed_before_kill)
    # The killed apply left generation 1 current and byte-for-byte intact.
    assert store.current() == old and digest(old.image) == old_digest
    resumed = store.stage(second)
    assert len(resumed.missing()) <= 32 - 10  # what landed is not asked for again
    assert apply(store, source, second) == len(resumed.missing())
    current = store.current()
    assert current is not None and current.number == 2
    assert digest(current.image) == digest(source)


@requires_root
@pytest.mark.root
def test_on_xfs_a_generation_is_a_reflink_and_verifying_it_reads_what_changed(
    tmp_path: Path,
) -> None:
    with small_filesystem(tmp_path, 320 * MiB, ["mkfs.xfs", "-q", "-m", "reflink=1"]) as mount:
        source = mount / "source.img"
        store = GenerationStore(mount / "replica")
        chunks = {i: bytes([i + 1]) * CHUNK for i in range(64)}
        first = make_image(source, chunks, 64)
        staging = store.stage(first)
        fill(staging, source)
        staging.commit()
        assert staging.verified_bytes == 64 * CHUNK  # the first one is read whole
        second = make_image(source, {**chunks, 7: b"\xaa" * CHUNK, 50: b"\xbb" * CHUNK}, 64)
        staging = store.stage(second)
        assert (store.staging_dir / "copy").read_text() == "reflink"
        assert fill(staging, source) == 2
        staging.sync()
        with open(staging.image, "r+b") as handle:  # a landed chunk rots before commit
            handle.seek(50 * CHUNK + 3)
            handle.write(b"\0")
        with pytest.raises(DataLoss, match=r"chunks \[50\]"):
            staging.commit()
        assert staging.verified_bytes <= 2 * CHUNK
        retry = store.stage(second)
        assert retry.missing() == [50]
        assert apply(store, source, second) == 1
        current = store.current()
        assert current is not None and digest(current.image) == digest(source)


@requires_root
@pytest.mark.root
def test_by_blocks_only_changed_blocks_are_written_and_an_unsent_one_that_rots_is_caught(
    tmp_path: Path,
) -> None:
    big = 4 * BLOCK_SIZE  # chunks of four blocks
    with small_filesystem(tmp_path, 320 * MiB, ["mkfs.xfs", "-q", "-m", "reflink=1"]) as mount:
        source = mount / "source.img"
        store = GenerationStore(mount / "replica")
        chunks = {i: bytes([i + 1]) * big for i in range(16)}
        write_image(source, chunks, 16, big)
        first = scan_image(source, big).manifest
        staging = store.stage(first)
        with open(source, "rb") as handle:
            for index in staging.missing():
                handle.seek(index * big)
                staging.write(index, handle.read(big))
        staging.commit()

        with open(source, "r+b") as handle:  # block 1 of chunk 3 changes, block 2 zeroes
            handle.seek(3 * big + BLOCK_SIZE)
            handle.write(b"\xcc" * BLOCK_SIZE + bytes(BLOCK_SIZE))
        second = scan_image(source, big).manifest
        staging = store.stage(second)
        assert staging.missing() == [3] and staging.by_blocks(3)
        with open(source, "rb") as handle:
            handle.seek(3 * big)
            data = handle.read(big)
        patch = staging.plan_blocks(3, block_digests(data, big))
        assert patch.runs == ((1, 1),) and patch.zero == (2,)
        with pytest.raises(DataLoss, match="block 1 of chunk 3"):
            staging.write_run(patch, 1, b"\xcd" * BLOCK_SIZE)
        staging.write_run(patch, 1, data[BLOCK_SIZE : 2 * BLOCK_SIZE])
        staging.finish(patch)
        assert staging.sync() == [3]
        assert staging.read_back([3]) == 2 * BLOCK_SIZE  # the blocks written and zeroed
        write_at(staging.image, 3 * big + 3 * BLOCK_SIZE + 5, b"\0")  # block 3, never sent, rots
        with pytest.raises(DataLoss, match=r"chunks \[3\]"):
            staging.commit()
        # Blocks 1 and 2 were read back as they landed; only block 3 moved since.
        assert staging.verified_bytes == BLOCK_SIZE
        retry = store.stage(second)
        assert retry.missing() == [3] and not retry.by_blocks(3)  # asked for whole now
        with open(source, "rb") as handle:
            handle.seek(3 * big)
            retry.write(3, handle.read(big))
        two = retry.commit()
        assert digest(two.image) == digest(source)
        assert two.blocks.read_bytes()[: 16 * 4 * 32] == _table_of(source, big, mount)


def _table_of(image: Path, chunk_size: int, scratch: Path) -> bytes:
    table = BlockTable.create(scratch / "fresh.blocks", image.stat().st_size, chunk_size)
    scan_image(image, chunk_size, table=table)
    table.close()
    return table.path.read_bytes()


@requires_root
@pytest.mark.root
def test_a_staging_is_durable_only_from_its_first_sync_and_a_lost_copy_is_caught(
    tmp_path: Path,
) -> None:
    """Staging fsyncs nothing until its first sync (its cost follows the delta, not
    the volume): meanwhile the old generation stays current and unchanged, and
    base bytes the staged copy lost before they were durable fail verification."""
    with small_filesystem(tmp_path, 320 * MiB, ["mkfs.xfs", "-q", "-m", "reflink=1"]) as mount:
        source = mount / "source.img"
        store = GenerationStore(mount / "replica")
        chunks = {i: bytes([i + 1]) * CHUNK for i in range(32)}
        apply(store, source, make_image(source, chunks, 32))
        old = store.current()
        assert old is not None
        old_digest = digest(old.image)
        second = make_image(source, {**chunks, 5: b"\xaa" * CHUNK}, 32)

        staging = store.stage(second)
        assert staging.missing() == [5]
        # The pull dies here, before any sync: a crash could lose the copy's
        # blocks, as this punched range of a chunk the delta does not send.
        fd = os.open(staging.image, os.O_WRONLY)
        try:
            punch_hole(fd, 20 * CHUNK, CHUNK)
        finally:
            os.close(fd)
        assert store.current() == old and digest(old.image) == old_digest

        resumed = store.stage(second)  # the same target and base: resumed
        assert resumed.missing() == [5] and not resumed.landed
        fill(resumed, source)
        with pytest.raises(DataLoss, match=r"chunks \[20\]"):
            resumed.commit()
        assert store.current() == old and digest(old.image) == old_digest
        assert apply(store, source, second) == 1  # chunk 20, fetched again
        current = store.current()
        assert current is not None and current.number == 2
        assert digest(current.image) == digest(source)


def test_a_commit_keeps_the_previous_generation_until_it_is_retired(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    store = GenerationStore(tmp_path / "replica")
    apply(store, source, make_image(source, {0: b"\1" * CHUNK}, 4))
    first = store.current()
    assert first is not None
    first_digest = digest(first.image)
    apply(store, source, make_image(source, {0: b"\1" * CHUNK, 2: b"\2" * CHUNK}, 4))
    second = store.current()
    assert second is not None and second.number == 2
    # Committed and current; the previous one is intact until retired.
    assert digest(first.image) == first_digest
    store.retire_older()
    assert not first.image.exists() and store.current() == second
    apply(store, source, make_image(source, {1: b"\3" * CHUNK}, 4))
    apply(store, source, make_image(source, {3: b"\4" * CHUNK}, 4))
    # Without retiring, a commit removes all but the generation before it.
    assert sorted(p.name for p in store.root.glob("gen-*")) == ["gen-00000003", "gen-00000004"]
    current = store.current()
    assert current is not None and digest(current.image) == digest(source)


@given(st.binary(min_size=32, max_size=32 * 64), st.data())
def test_differing_entries_are_exactly_the_digests_that_differ(
    ours: bytes, data: st.DataObject
) -> None:
    entries = [ours[at : at + 32] for at in range(0, len(ours) - len(ours) % 32, 32)]
    theirs = [
        data.draw(st.binary(min_size=32, max_size=32)) if data.draw(st.booleans()) else entry
        for entry in entries
    ]
    expected = {k for k, (a, b) in enumerate(zip(entries, theirs, strict=True)) if a != b}
    assert differing_entries(b"".join(entries), b"".join(theirs)) == expected
