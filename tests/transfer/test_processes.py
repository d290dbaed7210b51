"""Transfers between real processes: a receiver killed with SIGKILL resumes
without re-fetching what landed; a transfer between two network namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from csi_driver.chunks.generations import GenerationStore
from csi_driver.node.runner import CommandRunner
from csi_driver.sandbox.network import in_namespace, linked_namespaces
from tests.certs import Pki
from tests.transfer.conftest import (
    CHUNK,
    Sender,
    child_env,
    file_digest,
    random_chunks,
    write_image,
)

TRANSFER = [sys.executable, "-m", "csi_driver.transfer"]


@contextmanager
def process(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()


def events(child: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert child.stdout is not None
    for line in child.stdout:
        yield json.loads(line)


def pull_argv(pki: Pki, source: str, replica: Path, *extra: str) -> list[str]:
    return [
        *TRANSFER,
        "pull",
        "--source",
        source,
        "--server-node",
        "sender",
        "--tls-dir",
        str(pki.issue("node/receiver")),
        "--transfer",
        "t",
        "--replica",
        str(replica),
        "--window-mib",
        "2",
        *extra,
    ]


def test_a_receiver_killed_mid_transfer_resumes_where_it_stopped(
    tmp_path: Path, pki: Pki, sender: Sender
) -> None:
    source = tmp_path / "source.img"
    write_image(source, random_chunks(range(48), 7), 48)
    sender.export("t", source)
    replica = tmp_path / "replica"
    argv = pull_argv(pki, str(sender.endpoint), replica, "--max-rate-mib", "24", "--report-chunks")
    with process(argv) as child:
        landed = []
        for event in events(child):
            assert event["event"] == "landed", event
            landed.append(event["chunk"])
            if len(landed) >= 8:
                os.kill(child.pid, signal.SIGKILL)
                break
    assert GenerationStore(replica).current() is None  # nothing committed by the dead one
    sent_before = dict(sender.exports.require("t").sent)

    with process(pull_argv(pki, str(sender.endpoint), replica)) as child:
        done = list(events(child))[-1]
    assert done["event"] == "done", done
    assert done["landed_before"] >= 8 and done["chunks_received"] == 48 - done["landed_before"]
    sent = sender.exports.require("t").sent
    assert all(sent[i] == 1 for i in landed)  # what landed was never sent again
    assert sent.total() - sum(sent_before.values()) == done["chunks_received"]
    assert file_digest(Path(done["image"])) == file_digest(source)
    assert done["peak_rss_bytes"] < 200 * 1024 * 1024


@pytest.mark.root
def test_a_transfer_between_two_network_namespaces(tmp_path: Path, pki: Pki) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    source = tmp_path / "source.img"
    write_image(source, random_chunks([0, 3, 4, 15], 8), 16)
    prefix = f"ft{uuid.uuid4().hex[:6]}"
    with linked_namespaces(CommandRunner(), prefix) as (a, b):
        serve = [
            *TRANSFER,
            "serve",
            "--listen",
            f"tcp://{a.address}:7443",
            "--node-id",
            "sender",
            "--tls-dir",
            str(pki.issue("node/sender")),
            "--export",
            f"t={source}",
            "--work-dir",
            str(tmp_path / "captures"),
            "--chunk-size",
            str(CHUNK),
        ]
        with process(list(in_namespace(a.name, tuple(serve)))) as server:
            ready = next(events(server))
            assert ready["event"] == "ready", ready
            assert ready["exports"][0]["data_bytes"] == 4 * CHUNK
            pull = pull_argv(pki, f"tcp://{a.address}:7443", tmp_path / "replica")
            with process(list(in_namespace(b.name, tuple(pull)))) as child:
                done = list(events(child))[-1]
            server.send_signal(signal.SIGTERM)
            stopped = next(events(server))
        assert done["event"] == "done" and done["chunks_received"] == 4, done
        assert file_digest(Path(done["image"])) == file_digest(source)
        assert stopped["sent_chunks"] == {"t": 4}
    assert not list(Path("/run/netns").glob(f"{prefix}-*"))
    assert not list(Path("/sys/class/net").glob(f"{prefix}-*"))
