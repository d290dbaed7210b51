"""Nodes converge to their records after a crash and after a lost watch.

In a real sandbox (etcd, controller and nodes in network namespaces): work
asked of a node while it is dead, or while its link is cut and its catalog
watch broken, is done once it is back — images created and deleted, each
exactly once — and what it holds on the host matches its stage records:
one loop device per staged volume, its staging and target mounts, nothing
else attached, mounted or leaked.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.sandbox.conftest import Place, requires_host
from tests.sandbox.test_sandbox import (
    RETRIED_BY_THE_PROVISIONER,
    RETRYABLE,
    RPC_TIMEOUT_S,
    attach_and_mount,
    create_on,
    create_with_retries,
    paths,
    refused_while_away,
    unmount,
)

pytestmark = [requires_host, pytest.mark.root, pytest.mark.slow]

#: A call made while its node cannot answer: short, so the intent is left behind.
SHORT_S = 3.0


def _delete(place: Place, volume_id: str, timeout: float = RPC_TIMEOUT_S) -> None:
    with place.client("controller") as client:
        client.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=timeout
        )


def _left_pending(call: Callable[[], object]) -> None:
    """``call()`` must fail retryably: its node is away, the intent stays recorded."""
    with pytest.raises(grpc.RpcError) as failed:
        call()
    assert failed.value.code() in RETRYABLE, failed.value.details()


def _refused_or_pending(place: Place, node: str, name: str) -> None:
    """A create for ``node`` while it is away: left pending, or refused outright once
    the node was silent past the stale threshold (see ``refused_while_away``); either
    way the provisioner's retry once it is back creates it, once."""
    with pytest.raises(grpc.RpcError) as failed:
        create_on(place, node, name, timeout=SHORT_S)
    assert refused_while_away(failed.value, node), failed.value.details()


def _image(place: Place, node: str, volume_id: str) -> Path:
    return place.node_dir(node) / "pool" / "images" / f"{volume_id}.img"


def _eventually(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.1)


def _host_state(place: Place, node: str) -> tuple[list[str], list[str], set[str]]:
    """The node's stage records, the volumes its loop devices back, and its mounts."""
    base = place.node_dir(node)
    staged = sorted(p.stem for p in (base / "pool" / "state").glob("*.json"))
    loops = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            image = Path(backing.read_text().strip())
        except FileNotFoundError:
            continue
        if image.parent == base / "pool" / "images":
            loops.append(image.stem)
    mounts = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mountpoint = line.split()[4]
        if mountpoint.startswith(f"{base}/kubelet/"):
            mounts.add(mountpoint)
    return staged, sorted(loops), mounts


def _assert_matches_stage_records(place: Place, node: str, volume_id: str) -> None:
    staged, loops, mounts = _host_state(place, node)
    assert staged == [volume_id]
    assert loops == [volume_id], "one loop device per staged volume, no double attach"
    assert mounts == set(paths(place, node, volume_id))


def _reported(place: Place, node: str, volume_id: str, phase: str) -> int:
    """How many times the node reported ``phase`` for the volume's image (its log)."""
    log = place.directory / "logs" / f"{node}.log"
    count = 0
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line torn by the kill
        if (
            entry.get("msg") == "image status reported"
            and entry.get("volume") == volume_id
            and entry.get("phase") == phase
        ):
            count += 1
    return count


def _stage_again(place: Place, node: str, volume_id: str) -> None:
    """What kubelet does after a node service restart: repeat stage and publish."""
    attach_and_mount(place, node, volume_id)


def _finish(place: Place, node: str, volume_id: str) -> None:
    unmount(place, node, volume_id)
    with place.client("controller") as controller:
        controller.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node),
            timeout=RPC_TIMEOUT_S,
        )
    _delete(place, volume_id)


def _ask_while_away(place: Place, node: str, doomed: str) -> str:
    """Ask for a create and a delete the node cannot do now; return the create's name."""
    late_name = f"pvc-{uuid.uuid4()}"
    _refused_or_pending(place, node, late_name)
    _left_pending(lambda: _delete(place, doomed, timeout=SHORT_S))
    assert _image(place, node, doomed).exists()
    return late_name


def _done_once_back(place: Place, node: str, doomed: str, late_name: str) -> str:
    """The node, back, does the recorded work before anyone retries, and does it once."""
    _eventually(lambda: not _image(place, node, doomed).exists(), "the pending delete")
    # Back, it may not be counted ready until its next heartbeat lands: retried as a
    # provisioner retries.
    late = create_with_retries(place, node, late_name, RETRIED_BY_THE_PROVISIONER).volume_id
    assert _image(place, node, late).exists()
    _delete(place, doomed)  # the provisioner's retry finds the work done
    assert _reported(place, node, late, "ready") == 1
    assert _reported(place, node, doomed, "deleted") == 1
    return str(late)


def test_a_killed_node_converges_to_its_records_when_restarted(running: Place) -> None:
    node = "node-1"
    mounted = create_on(running, node, f"pvc-{uuid.uuid4()}").volume_id
    target = attach_and_mount(running, node, mounted)
    data = os.urandom(1 << 20)
    (Path(target) / "data").write_bytes(data)
    doomed = create_on(running, node, f"pvc-{uuid.uuid4()}").volume_id

    assert running.fault("kill", node)["STATE"] == "dead"
    late_name = _ask_while_away(running, node, doomed)
    assert running.fault("start", node)["STATE"] == "alive"
    late = _done_once_back(running, node, doomed, late_name)

    # What survived the crash on the host is exactly what the stage records say,
    # also after kubelet repeats its calls.
    _assert_matches_stage_records(running, node, mounted)
    _stage_again(running, node, mounted)
    _assert_matches_stage_records(running, node, mounted)
    assert (Path(target) / "data").read_bytes() == data
    _finish(running, node, mounted)
    _delete(running, late)
    assert _host_state(running, node) == ([], [], set())


def _watch_lost(place: Place, node: str) -> bool:
    log = (place.directory / "logs" / f"{node}.log").read_text()
    return "catalog watch lost; resuming" in log


def test_a_node_whose_watch_is_cut_converges_when_healed(running: Place) -> None:
    node = "node-2"
    mounted = create_on(running, node, f"pvc-{uuid.uuid4()}").volume_id
    attach_and_mount(running, node, mounted)
    doomed = create_on(running, node, f"pvc-{uuid.uuid4()}").volume_id
    assert not _watch_lost(running, node)

    assert running.fault("cut", node)["STATE"] == "cut"
    running.end_connections(node)
    _eventually(lambda: _watch_lost(running, node), "the node noticing its lost watch")
    late_name = _ask_while_away(running, node, doomed)
    assert running.fault("heal", node)["STATE"] == "alive"
    late = _done_once_back(running, node, doomed, late_name)

    _assert_matches_stage_records(running, node, mounted)
    _finish(running, node, mounted)
    _delete(running, late)
    assert _host_state(running, node) == ([], [], set())
