"""Backup targets for tests: a directory, and a bucket on moto's real S3 server.

The S3 server is moto's standalone server mode (``moto[server]``, a
third-party S3 implementation), started once per session as its own process
on a loopback port; every test gets its own bucket. Tests that take
``target`` run once against each kind.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from csi_driver.backup.keys import BackupKey
from csi_driver.backup.packs import Entry
from csi_driver.backup.repository import Repository
from csi_driver.backup.targets import FilesystemTarget, S3Settings, S3Target, Target
from csi_driver.backup.upload import PACKS, pack_key
from tests.chunks.images import write_image as write_images

#: Small chunks keep test images small while still spanning several batches.
CHUNK = 256 * 1024
#: Tests' grace period: short enough to see staleness, long against a slow machine.
GRACE_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not start on port {port}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def s3_settings(endpoint: str, bucket: str) -> S3Settings:
    return S3Settings(
        bucket=bucket,
        prefix="ferry",
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="test",
        secret_access_key="test",
    )


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """One bucket for the session; each test works under its own prefix in it."""
    import boto3

    bucket = f"ferry-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["fs", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A directory, then a prefix of the S3 bucket: tests that take it run on both."""
    if request.param == "fs":
        return FilesystemTarget(tmp_path / "target")
    endpoint = request.getfixturevalue("s3_endpoint")
    settings = s3_settings(endpoint, request.getfixturevalue("s3_bucket"))
    return S3Target(replace(settings, prefix=f"test-{uuid.uuid4().hex[:12]}"))


@pytest.fixture
def fs_target(tmp_path: Path) -> Target:
    return FilesystemTarget(tmp_path / "target")


@pytest.fixture
def key() -> BackupKey:
    return BackupKey.generate()


def open_repo(target: Target, key: BackupKey) -> Repository:
    # Packs of about a chunk: a random chunk's blocks fill one pack, so tests count
    # packs where they would count chunks.
    return Repository.open(
        target, key, create=True, chunk_size=CHUNK, grace_s=GRACE_S, pack_bytes=CHUNK
    )


@pytest.fixture
def repo(target: Target, key: BackupKey) -> Repository:
    return open_repo(target, key)


@pytest.fixture
def fs_repo(fs_target: Target, key: BackupKey) -> Repository:
    return open_repo(fs_target, key)


def write_image(path: Path, chunks: dict[int, bytes], count: int) -> None:
    write_images(path, chunks, count, CHUNK)


def random_chunks(indexes: range | list[int], seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {i: rng.randbytes(CHUNK) for i in indexes}


def mixed_image(path: Path, count: int = 24, seed: int = 1) -> None:
    """Random chunks, compressible text, an all-zero written chunk and holes."""
    chunks = random_chunks([i for i in range(count) if i % 3 == 0], seed)
    for index in range(1, count, 3):
        chunks[index] = (f"line {index} of a log file\n" * CHUNK).encode()[:CHUNK]
    chunks[2] = bytes(CHUNK)
    write_image(path, chunks, count)


def packs(target: Target) -> dict[str, int]:
    """The pack objects in ``target`` and their sizes."""
    return {s.key: s.size for s in target.list(PACKS)}


def block_entries(repo: Repository) -> list[tuple[bytes, Entry]]:
    """Every block entry of every index: (pack id, entry), in pack order."""
    return [(pack_id, e) for pack_id, entries in sorted(repo.indexes().items()) for e in entries]


def rewrite_pack(target: Target, pack_id: bytes, change: Callable[[bytearray], None]) -> None:
    data = bytearray(target.get(pack_key(pack_id)))
    change(data)
    target.put(pack_key(pack_id), bytes(data))


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def location_of(target: Target, directory: Path) -> tuple[str, Path | None]:
    """How a child process names ``target``: a location and, for S3, a settings file."""
    if isinstance(target, FilesystemTarget):
        return str(target.root), None
    assert isinstance(target, S3Target)
    settings = target.settings
    config = directory / "s3.json"
    config.write_text(
        json.dumps(
            {
                "endpoint": settings.endpoint_url,
                "region": settings.region,
                "access-key-id": settings.access_key_id,
                "secret-access-key": settings.secret_access_key,
            }
        )
    )
    return f"s3://{settings.bucket}/{settings.prefix}", config
