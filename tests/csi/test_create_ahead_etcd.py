"""The all-in-one on a real etcd creates images ahead of their records, safely.

An etcd txn whose answer is lost (a timeout, a dropped connection) may
still apply, even after the caller gave up. An image created ahead of such
a txn is neither kept nor dropped then: the node settles it once etcd
answers, by the spec's presence, and drops it only after a write that makes
the lost txn impossible (its compare on the node's accounting). These tests
prove both outcomes on the store, then cut a real create's commit by
freezing the etcd process (SIGSTOP) and check that exactly one outcome
remains and a retry of the same CreateVolume converges.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.controller.images import ImageIntents
from csi_driver.core.errors import Conflict, OutcomeUnknown
from csi_driver.core.model import AccessType, MiB, Volume, VolumeState
from csi_driver.core.records import (
    ImagePhase,
    ImageSpec,
    ImageStatus,
    NodeAccounting,
    node_accounting_key,
)
from csi_driver.csi.client import CsiClient, block_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.pool import Pool
from csi_driver.node.reconcile.images import settle_left
from csi_driver.runtime import start_all_in_one
from csi_driver.store.base import Compare, Op, undecided
from csi_driver.store.catalog import NAMES, Catalog
from csi_driver.store.etcd import EtcdStore
from csi_driver.store.records import read
from csi_driver.store.url import open_store
from tests.csi.conftest import NODE_ID, accounted_specs, node_config
from tests.store.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

pytestmark = [pytest.mark.skipif(ETCD is None, reason=SKIP_REASON), pytest.mark.slow]

VOL = "vol-" + "a" * 32
SETTLE_S = 60.0


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-ahead"), 1).start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def catalog(etcd: EtcdCluster) -> Iterator[Catalog]:
    etcd.wipe()
    with closing(open_store(etcd.url)) as store:
        yield Catalog(store)


def _records(volume_id: str) -> tuple[Volume, ImageSpec, ImageStatus]:
    volume = Volume(
        volume_id=volume_id,
        name="pvc-" + volume_id[-6:],
        capacity_bytes=8 * MiB,
        access_type=AccessType.BLOCK,
        fs_type=None,
        primary_node=NODE_ID,
        epoch=1,
        state=VolumeState.READY,
        parameters=(),
        created_at=time.time(),
    )
    spec = ImageSpec(volume_id, NODE_ID, 8 * MiB, 1, thin=True)
    status = ImageStatus(volume_id, NODE_ID, ImagePhase.READY, spec.generation, 8 * MiB)
    return volume, spec, status


def _files(pool: Pool) -> list[str]:
    return sorted(p.name for p in pool.images_dir.iterdir())


def test_only_a_domain_error_other_than_an_unknown_outcome_is_decided() -> None:
    assert not undecided(Conflict("lost", key="k"))
    assert undecided(OutcomeUnknown("answer lost"))
    assert undecided(KeyboardInterrupt())
    assert undecided(RuntimeError("a bug mid-commit"))


def test_an_undecided_commit_that_applied_keeps_its_image(catalog: Catalog, tmp_path: Path) -> None:
    pool = Pool(tmp_path / "pool", 256 * MiB)
    volume, spec, status = _records(VOL)
    pool.create_ahead(VOL, spec.size_bytes, 1, thin=True)
    ImageIntents(catalog).provision(volume, spec, None, claim_name=True, status=status)
    pool.leave_ahead(VOL)  # as if the txn's answer had been lost
    assert pool.unsettled(VOL) and pool.get(VOL) is None

    assert settle_left(catalog.store, pool, NODE_ID, VOL) is True
    assert _files(pool) == [f"{VOL}.img", f"{VOL}.json"]
    assert not pool.unsettled(VOL)
    assert pool.provisioned_bytes == 8 * MiB


def test_an_undecided_commit_is_made_impossible_before_its_image_is_dropped(
    catalog: Catalog, tmp_path: Path
) -> None:
    """The settle's txn rewrites the accounting the create's txn compared: that txn,
    arriving late (replayed here exactly as built), can no longer apply."""
    intents = ImageIntents(catalog)
    other, other_spec, other_status = _records("vol-" + "b" * 32)
    intents.provision(other, other_spec, None, claim_name=True, status=other_status)
    account = read(catalog.store, NodeAccounting, node_accounting_key(NODE_ID))
    assert account is not None

    pool = Pool(tmp_path / "pool", 256 * MiB)
    volume, spec, status = _records(VOL)
    pool.create_ahead(VOL, spec.size_bytes, 1, thin=True)
    pool.leave_ahead(VOL)  # the txn below was sent, its answer lost, it did not apply yet
    assert pool.provisioned_bytes == 8 * MiB  # its space stays reserved until settled

    assert settle_left(catalog.store, pool, NODE_ID, VOL) is False
    assert _files(pool) == [] and not pool.unsettled(VOL)
    assert pool.provisioned_bytes == 0
    with pytest.raises(Conflict) as lost:
        intents.provision(volume, spec, account, claim_name=True, status=status)
    assert lost.value.key == node_accounting_key(NODE_ID)
    assert catalog.get_volume(VOL) is None
    after = read(catalog.store, NodeAccounting, node_accounting_key(NODE_ID))
    assert after is not None and after.value == account.value  # rewritten as it was


def test_an_undecided_commit_on_a_node_without_accounting_is_fenced_too(
    catalog: Catalog, tmp_path: Path
) -> None:
    """The create's txn required the accounting absent: the settle creates it."""
    pool = Pool(tmp_path / "pool", 256 * MiB)
    volume, spec, status = _records(VOL)
    pool.create_ahead(VOL, spec.size_bytes, 1, thin=True)
    pool.leave_ahead(VOL)
    assert settle_left(catalog.store, pool, NODE_ID, VOL) is False
    with pytest.raises(Conflict):
        ImageIntents(catalog).provision(volume, spec, None, claim_name=True, status=status)
    account = read(catalog.store, NodeAccounting, node_accounting_key(NODE_ID))
    assert account is not None and account.value == NodeAccounting(NODE_ID)


# -- a real create whose commit is cut ------------------------------------------------


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not check():
        assert time.monotonic() < deadline, f"not settled within {SETTLE_S}s: {what}"
        time.sleep(0.2)


def _create(client: CsiClient, name: str, timeout: float = 30.0) -> Any:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB),
        volume_capabilities=[block_capability()],
        parameters={"provisioning": "thin"},
    )
    return client.controller.CreateVolume(request, timeout=timeout).volume


def _consistent(catalog: Catalog, images: Path) -> dict[str, str]:
    """Every image in the pool is a volume's and every volume has its image, nothing
    is left created ahead, and the node's charge is the sum of its specs. Returns
    each volume's name -> id."""
    names = {
        record.key.removeprefix(NAMES): record.value.decode()
        for record in catalog.store.list(NAMES)
    }
    specs = accounted_specs(catalog.store)
    files = sorted(p.name for p in images.iterdir())
    assert not [f for f in files if f.endswith(".ahead")], files
    assert sorted(names.values()) == sorted(s.volume_id for s in specs)
    assert files == sorted(f"{s.volume_id}{suffix}" for s in specs for suffix in (".img", ".json"))
    return names


def _freeze_before(etcd: EtcdCluster, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first txn that claims ``name`` freezes the etcd process (SIGSTOP) just
    before it is sent: the real txn then reaches a real etcd that cannot answer
    within the request's deadline (the reads placement makes just before it would
    fail first if etcd were frozen from outside)."""
    process = etcd.members[0].process
    assert process is not None
    apply = EtcdStore._apply
    fired: list[bool] = []

    def frozen_first(store: EtcdStore, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        if not fired and any(op.key == NAMES + name for op in ops):
            fired.append(True)
            process.send_signal(signal.SIGSTOP)
        return apply(store, compares, ops)

    monkeypatch.setattr(EtcdStore, "_apply", frozen_first)


@contextmanager
def _all_in_one(etcd: EtcdCluster, tmp_path: Path) -> Iterator[tuple[CsiClient, Any, Path]]:
    """A Ferry all-in-one on the emptied etcd: its CSI client, etcd's process and the
    pool's images directory."""
    etcd.wipe()
    config = replace(node_config(tmp_path), pool_capacity_bytes=512 * MiB)
    (tmp_path / "kubelet").mkdir()
    services = start_all_in_one(f"unix://{tmp_path}/csi.sock", config, etcd.url)
    client = CsiClient(f"unix://{tmp_path}/csi.sock")
    process = etcd.members[0].process
    assert process is not None
    try:
        client.wait_ready()
        yield client, process, config.pool_root / "images"
    finally:
        client.close()
        services.stop(grace_s=0)


@pytest.mark.parametrize("retry_first", [False, True], ids=["settled-then-retried", "retried"])
def test_a_create_whose_commit_is_cut_leaves_one_outcome_and_its_retry_converges(
    etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retry_first: bool
) -> None:
    """``retried``: the provisioner's retry comes as soon as etcd is back, before
    or while the node settles the image (the create then settles it itself)."""
    with _all_in_one(etcd, tmp_path) as (client, process, images):
        warm = _create(client, "pvc-warm").volume_id
        _freeze_before(etcd, "pvc-cut", monkeypatch)
        try:
            with pytest.raises(grpc.RpcError) as cut:
                _create(client, "pvc-cut")
            # Until etcd answers, the image stays aside, neither kept nor dropped.
            left = [p.name for p in images.iterdir() if p.name.endswith(".ahead")]
        finally:
            process.send_signal(signal.SIGCONT)
        error: grpc.Call = cut.value  # type: ignore[assignment]
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "retry CreateVolume with the same name" in (error.details() or "")
        assert len(left) == 2, left

        with closing(open_store(etcd.url)) as store:
            catalog = Catalog(store)

            def settled() -> bool:
                try:
                    return not [p for p in images.iterdir() if p.name.endswith(".ahead")]
                except FileNotFoundError:
                    return False

            if retry_first:
                etcd.wait_healthy()
                retried = _create(client, "pvc-cut").volume_id
                _eventually(settled, "the image created ahead of the cut commit")
                assert _consistent(catalog, images) == {"pvc-warm": warm, "pvc-cut": retried}
                return
            _eventually(settled, "the image created ahead of the cut commit")
            # One outcome: the volume with its image, or neither.
            outcome = _consistent(catalog, images)
            assert set(outcome) <= {"pvc-warm", "pvc-cut"} and outcome["pvc-warm"] == warm
            landed = outcome.get("pvc-cut")

            retried = _create(client, "pvc-cut").volume_id
            if landed is not None:
                assert retried == landed
            assert _create(client, "pvc-cut").volume_id == retried  # and again: the same
            assert _consistent(catalog, images) == {"pvc-warm": warm, "pvc-cut": retried}


def test_a_batch_whose_commit_is_cut_fails_each_create_and_lands_all_or_none(
    etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creates queued behind a commit share the next txn. Its answer lost (etcd frozen
    just before it is sent), each of them fails UNAVAILABLE; the node settles their
    images by one outcome (every volume of the txn, or none), and retries converge."""
    first_sent, cut = threading.Event(), threading.Event()
    frozen: list[list[str]] = []
    apply = EtcdStore._apply

    def held_then_frozen(store: EtcdStore, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        names = [op.key.removeprefix(NAMES) for op in ops if op.key.startswith(NAMES)]
        if names == ["pvc-first"]:
            first_sent.set()
            assert cut.wait(30)  # the others queue behind this commit meanwhile
        elif len(names) > 1 and not frozen:
            frozen.append(names)
            process.send_signal(signal.SIGSTOP)
        return apply(store, compares, ops)

    def attempt(name: str) -> grpc.StatusCode | str:
        try:
            return str(_create(client, name).volume_id)
        except grpc.RpcError as exc:
            assert "retry CreateVolume with the same name" in (exc.details() or "")
            code: grpc.StatusCode = exc.code()
            return code

    queued = [f"pvc-{i}" for i in range(4)]
    with _all_in_one(etcd, tmp_path) as (client, process, images):
        warm = _create(client, "pvc-warm").volume_id
        monkeypatch.setattr(EtcdStore, "_apply", held_then_frozen)
        try:
            with ThreadPoolExecutor(max_workers=5) as pool:
                first = pool.submit(_create, client, "pvc-first")
                assert first_sent.wait(30)
                outcomes = [pool.submit(attempt, name) for name in queued]
                _eventually(  # the first's image too: its commit has not returned
                    lambda: len(list(images.glob("*.img.ahead"))) == 1 + len(queued),
                    "the queued creates' images",
                )
                time.sleep(0.5)  # from their images to the placement queue
                cut.set()
                made = first.result(timeout=60).volume_id
                codes = [outcome.result(timeout=60) for outcome in outcomes]
        finally:
            cut.set()
            process.send_signal(signal.SIGCONT)
        assert frozen and len(frozen[0]) > 1, frozen
        assert codes == [grpc.StatusCode.UNAVAILABLE] * len(queued), codes
        with closing(open_store(etcd.url)) as store:
            catalog = Catalog(store)
            _eventually(lambda: not list(images.glob("*.ahead")), "the images of the cut batch")
            outcome = _consistent(catalog, images)
            landed = {name for name in frozen[0] if name in outcome}
            assert landed in (set(), set(frozen[0])), (landed, frozen[0])
            retried = {name: _create(client, name).volume_id for name in queued}
            for name in landed:
                assert retried[name] == outcome[name]
            assert _consistent(catalog, images) == {
                "pvc-warm": warm,
                "pvc-first": made,
                **retried,
            }
