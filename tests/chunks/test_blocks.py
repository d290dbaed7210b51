"""Block tables on real files: entries written together land exactly where
written one by one would put them, and what lies between is kept."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from csi_driver.chunks.blocks import GAP_BYTES, BlockTable
from csi_driver.chunks.manifest import MiB
from csi_driver.core.errors import InternalError

CHUNK = 4 * MiB  # 64 blocks: a 2 KiB slot per chunk


@pytest.mark.parametrize("seed", range(4))
def test_writing_many_entries_at_once_equals_writing_them_one_by_one(
    tmp_path: Path, seed: int
) -> None:
    size = 700 * CHUNK - 12345  # a short last chunk
    rng = random.Random(seed)
    one, many = (BlockTable.create(tmp_path / n, size, CHUNK) for n in ("one", "many"))
    before = {i: rng.randbytes(len(one.read(i))) for i in range(700) if rng.random() < 0.5}
    for table in (one, many):
        for index, digests in before.items():
            table.write(index, digests)
    # Scattered, clustered and far apart (farther than GAP_BYTES), the last chunk too.
    indexes = {*rng.sample(range(700), 200), 10, 11, 12, 699, 699 - GAP_BYTES // 2048 - 5}
    after = {i: rng.randbytes(len(one.read(i))) for i in indexes}
    for index, digests in after.items():
        one.write(index, digests)
    many.write_many(after)
    one.close()
    many.close()
    assert many.path.read_bytes() == one.path.read_bytes()
    assert {i: many.read(i) for i in range(700)} == {i: one.read(i) for i in range(700)}


def test_entries_of_the_wrong_length_are_refused(tmp_path: Path) -> None:
    table = BlockTable.create(tmp_path / "t", 8 * CHUNK, CHUNK)
    with pytest.raises(InternalError, match="chunk 3 has 64 blocks; 2 digests given"):
        table.write_many({1: bytes(64 * 32), 3: os.urandom(64)})
    table.close()
