"""Catalog records: key layout, generations and strict JSON codecs (property-tested)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.core.errors import CorruptRecord, InvalidArgument
from csi_driver.core.model import AccessMode, AccessType, FsType, Publication
from csi_driver.core.records import (
    KINDS,
    SCHEMA_VERSION,
    CatalogRecord,
    ExportPhase,
    ExportSpec,
    ExportStatus,
    FailoverStatus,
    FailureReason,
    GroupMember,
    GroupSnapshotSpec,
    GroupSnapshotStatus,
    ImagePhase,
    ImageRole,
    ImageSource,
    ImageSpec,
    ImageStatus,
    MoveSpec,
    MoveStatus,
    MoveStep,
    NodeAccounting,
    NodeSpec,
    NodeStatus,
    SnapshotMethod,
    SnapshotSpec,
    SnapshotStatus,
    TransferPhase,
    TransferStatus,
    VolumePhase,
    VolumeSpec,
    VolumeStatus,
    answers,
    decode,
    encode,
    export_status_key,
    image_spec_key,
    image_specs_on,
    image_status_key,
    image_statuses_on,
    node_accounting_key,
    revise,
    snapshot_spec_key,
    snapshot_specs_on,
    volume_of_key,
)

VOL = "vol-" + "a" * 32

volume_ids = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda h: "vol-" + h)
node_ids = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?\Z")
sizes = st.integers(min_value=0, max_value=2**62)
texts = st.text(max_size=40)
pairs = st.lists(st.tuples(texts, texts), max_size=4).map(lambda x: tuple(sorted(set(x))))
generations = st.integers(min_value=1, max_value=2**40)
floats = st.floats(allow_nan=False, allow_infinity=False)

snapshot_ids = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda h: "snap-" + h)
group_ids = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda h: "group-" + h)
node_ids = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?\Z")
sizes = st.integers(min_value=0, max_value=2**62)
texts = st.text(max_size=40)
pairs = st.lists(st.tuples(texts, texts), max_size=4).map(lambda x: tuple(sorted(set(x))))
generations = st.integers(min_value=1, max_value=2**40)
floats = st.floats(allow_nan=False, allow_infinity=False)

publications = st.builds(
    Publication,
    node_id=node_ids,
    readonly=st.booleans(),
    access_type=st.sampled_from(AccessType),
    access_mode=st.sampled_from(AccessMode),
)
records: st.SearchStrategy[CatalogRecord] = st.one_of(
    st.builds(
        VolumeSpec,
        volume_id=volume_ids,
        name=texts,
        capacity_bytes=sizes,
        access_type=st.sampled_from(AccessType),
        fs_type=st.none() | st.sampled_from(FsType),
        primary_node=node_ids,
        epoch=generations,
        parameters=pairs,
        publications=st.lists(publications, max_size=3).map(tuple),
        created_at=floats,
        deleted=st.booleans(),
        generation=generations,
    ),
    st.builds(
        VolumeStatus,
        volume_id=volume_ids,
        phase=st.sampled_from(VolumePhase),
        observed_generation=generations,
        capacity_bytes=sizes,
        message=texts,
    ),
    st.builds(
        NodeSpec,
        node_id=node_ids,
        agent_endpoint=texts,
        topology=pairs,
        capacity_bytes=sizes,
        max_volumes=sizes,
        labels=pairs,
        generation=generations,
    ),
    st.builds(
        NodeStatus,
        node_id=node_ids,
        observed_generation=generations,
        heartbeat_at=floats,
        pool_capacity_bytes=sizes,
        allocated_bytes=sizes,
        image_count=sizes,
        message=texts,
    ),
    st.builds(NodeAccounting, node_id=node_ids, provisioned_bytes=sizes, volume_count=sizes),
    st.builds(
        ImageSpec,
        volume_id=volume_ids,
        node_id=node_ids,
        size_bytes=sizes,
        epoch=generations,
        role=st.sampled_from(ImageRole),
        thin=st.booleans(),
        deleted=st.booleans(),
        generation=generations,
        source=st.none() | st.builds(ImageSource, snapshot_id=snapshot_ids, node_id=node_ids),
        source_node=texts,
        keep_divergent=st.booleans(),
    ),
    st.builds(
        ImageStatus,
        volume_id=volume_ids,
        node_id=node_ids,
        phase=st.sampled_from(ImagePhase),
        observed_generation=generations,
        size_bytes=sizes,
        reason=st.sampled_from(FailureReason),
        message=texts,
        synced_transfer=texts,
        manifest_digest=texts,
        synced_at=floats,
        synced_bytes=sizes,
        synced_captured_at=floats,
    ),
    st.builds(
        ExportSpec,
        volume_id=volume_ids,
        node_id=node_ids,
        epoch=generations,
        round=generations,
        final=st.booleans(),
        generation=generations,
    ),
    st.builds(
        ExportStatus,
        volume_id=volume_ids,
        node_id=node_ids,
        phase=st.sampled_from(ExportPhase),
        observed_generation=generations,
        epoch=generations,
        transfer_id=texts,
        endpoint=texts,
        manifest_digest=texts,
        size_bytes=sizes,
        data_bytes=sizes,
        captured_at=floats,
        final=st.booleans(),
        message=texts,
    ),
    st.builds(
        TransferStatus,
        volume_id=volume_ids,
        node_id=node_ids,
        transfer_id=texts,
        source_node=node_ids,
        phase=st.sampled_from(TransferPhase),
        bytes_total=sizes,
        bytes_done=sizes,
        rate_bytes_per_s=floats,
        eta_s=floats,
        started_at=floats,
        updated_at=floats,
        message=texts,
    ),
    st.builds(
        MoveSpec,
        volume_id=volume_ids,
        source_node=node_ids,
        target_node=node_ids,
        from_epoch=generations,
        requested_at=floats,
        generation=generations,
    ),
    st.builds(
        MoveStatus,
        volume_id=volume_ids,
        observed_generation=generations,
        step=st.sampled_from(MoveStep),
        message=texts,
        updated_at=floats,
        final_bytes=sizes,
        final_started_at=floats,
        finished_at=floats,
    ),
    st.builds(
        FailoverStatus,
        volume_id=volume_ids,
        from_node=node_ids,
        to_node=node_ids,
        epoch=generations,
        at=floats,
        primary_last_seen=floats,
        replica_captured_at=floats,
        data_loss_window_s=floats,
    ),
    st.builds(
        SnapshotSpec,
        snapshot_id=snapshot_ids,
        name=texts,
        node_id=node_ids,
        source_volume_id=volume_ids,
        size_bytes=sizes,
        access_type=st.sampled_from(AccessType),
        fs_type=st.none() | st.sampled_from(FsType),
        created_at=floats,
        group_id=st.just("") | group_ids,
        deleted=st.booleans(),
        generation=generations,
    ),
    st.builds(
        SnapshotStatus,
        snapshot_id=snapshot_ids,
        node_id=node_ids,
        phase=st.sampled_from(ImagePhase),
        observed_generation=generations,
        size_bytes=sizes,
        taken_at=floats,
        method=st.sampled_from(SnapshotMethod),
        reason=st.sampled_from(FailureReason),
        message=texts,
    ),
    st.builds(
        GroupSnapshotSpec,
        group_id=group_ids,
        name=texts,
        node_id=node_ids,
        members=st.lists(
            st.builds(GroupMember, snapshot_id=snapshot_ids, volume_id=volume_ids), max_size=3
        ).map(tuple),
        created_at=floats,
        deleted=st.booleans(),
        generation=generations,
    ),
    st.builds(
        GroupSnapshotStatus,
        group_id=group_ids,
        node_id=node_ids,
        phase=st.sampled_from(ImagePhase),
        observed_generation=generations,
        taken_at=floats,
        reason=st.sampled_from(FailureReason),
        message=texts,
    ),
)


@given(records)
def test_every_record_round_trips(record: CatalogRecord) -> None:
    raw = encode(record)
    assert decode(type(record), raw) == record
    assert encode(decode(type(record), raw)) == raw  # canonical: same value, same bytes


@given(records, st.dictionaries(st.text(min_size=1).filter(str.isupper), st.integers()))
def test_unknown_fields_from_a_newer_writer_are_ignored(
    record: CatalogRecord, extra: dict[str, int]
) -> None:
    doc = json.loads(encode(record))
    doc.update(extra)
    assert decode(type(record), json.dumps(doc).encode()) == record


@given(records, st.data())
def test_a_field_of_the_wrong_type_is_refused(record: CatalogRecord, data: st.DataObject) -> None:
    doc = json.loads(encode(record))
    name = data.draw(st.sampled_from(sorted(set(doc) - {"kind", "version"})))
    doc[name] = {"not": "this"}
    with pytest.raises(CorruptRecord, match=name):
        decode(type(record), json.dumps(doc).encode())


def _image_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(encode(ImageSpec(VOL, "n1", 1 << 20, 1)))
    return doc


def test_fields_missing_from_an_older_writer_take_their_defaults() -> None:
    doc = _image_doc()
    del doc["role"], doc["thin"], doc["deleted"], doc["generation"]
    assert decode(ImageSpec, json.dumps(doc).encode()) == ImageSpec(VOL, "n1", 1 << 20, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("size_bytes"), "required field 'size_bytes'"),
        (lambda d: d.update(size_bytes=True), "expected int"),
        (lambda d: d.update(size_bytes="1"), "expected int"),
        (lambda d: d.update(role="leader"), "not a ImageRole"),
        (lambda d: d.update(kind="ImageStatus"), "expected a ImageSpec record"),
        (lambda d: d.pop("version"), "no valid schema version"),
        (lambda d: d.update(version=SCHEMA_VERSION + 1), "newer than this Ferry"),
    ],
)
def test_malformed_records_are_refused_with_the_reason(change: Any, message: str) -> None:
    doc = _image_doc()
    change(doc)
    with pytest.raises(CorruptRecord, match=message):
        decode(ImageSpec, json.dumps(doc).encode())


@pytest.mark.parametrize("raw", [b"", b"\xff", b"[]", b"null", b"{"])
def test_bytes_that_are_not_a_record_are_refused(raw: bytes) -> None:
    with pytest.raises(CorruptRecord):
        decode(VolumeStatus, raw)


def test_kinds_registry_names_every_record_type() -> None:
    assert set(KINDS) == {
        "VolumeSpec",
        "VolumeStatus",
        "NodeSpec",
        "NodeStatus",
        "NodeAccounting",
        "ImageSpec",
        "ImageStatus",
        "ExportSpec",
        "ExportStatus",
        "TransferStatus",
        "MoveSpec",
        "MoveStatus",
        "FailoverStatus",
        "FenceStatus",
        "DrainSpec",
        "SnapshotSpec",
        "SnapshotStatus",
        "GroupSnapshotSpec",
        "GroupSnapshotStatus",
    }
    assert all(kind == cls.KIND for kind, cls in KINDS.items())


def test_spec_and_status_of_an_image_live_under_different_keys() -> None:
    spec = ImageSpec(VOL, "node-1", 1 << 20, 1)
    assert spec.key == f"spec/images/node-1/{VOL}" == image_spec_key("node-1", VOL)
    assert spec.status_key == f"status/images/node-1/{VOL}" == image_status_key("node-1", VOL)
    assert spec.key.startswith(image_specs_on("node-1"))
    # A node's prefix never matches another node whose id extends it.
    assert not image_spec_key("node-10", VOL).startswith(image_specs_on("node-1"))
    assert not spec.status_key.startswith("spec/")


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "-x", "x" * 200])
def test_ids_that_could_escape_a_key_prefix_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        image_spec_key(bad, VOL)
    with pytest.raises(InvalidArgument):
        node_accounting_key(bad)
    with pytest.raises(InvalidArgument):
        image_spec_key("n1", bad)


def test_revise_bumps_the_generation_only_on_a_real_change() -> None:
    spec = ImageSpec(VOL, "n1", 1 << 20, 1)
    assert revise(spec, size_bytes=1 << 20) is spec
    grown = revise(spec, size_bytes=2 << 20)
    assert grown.generation == 2 and grown.size_bytes == 2 << 20
    assert revise(grown, deleted=True).generation == 3
    with pytest.raises(InvalidArgument):
        revise(spec, generation=7)


def test_a_status_answers_only_its_own_generation() -> None:
    spec = ImageSpec(VOL, "n1", 1 << 20, 1)
    old = ImageStatus(VOL, "n1", ImagePhase.READY, 1, 1 << 20)
    assert answers(old, spec)
    grown = revise(spec, size_bytes=2 << 20)
    assert not answers(old, grown)
    assert not answers(None, grown)


def test_accounting_charges_and_refuses_to_go_negative() -> None:
    account = NodeAccounting("n1").charge(64 << 20).charge(32 << 20)
    assert (account.provisioned_bytes, account.volume_count) == (96 << 20, 2)
    released = account.charge(-(64 << 20), -1)
    assert (released.provisioned_bytes, released.volume_count) == (32 << 20, 1)
    assert released.charge(16 << 20, 0).volume_count == 1  # an expansion
    with pytest.raises(InvalidArgument, match="negative"):
        released.charge(-(64 << 20), -1)


def test_runners_woken_by_other_nodes_records_find_the_volume_in_the_key() -> None:
    assert volume_of_key(export_status_key("node-2", VOL)) == VOL
    assert volume_of_key(image_status_key("n", VOL)) == VOL
    assert volume_of_key(image_statuses_on("n")) is None  # the prefix itself
    assert volume_of_key("status/exports/n/not-a-volume") is None
    assert volume_of_key(f"status/exports/a/b/{VOL}") is None


def test_snapshot_keys_are_node_first_and_refuse_foreign_ids() -> None:
    snap = "snap-" + "b" * 32
    assert snapshot_spec_key("node-1", snap) == f"spec/snapshots/node-1/{snap}"
    assert not snapshot_spec_key("node-10", snap).startswith(snapshot_specs_on("node-1"))
    for bad in ("snap-x", "../" + snap, "vol-" + "b" * 32):
        with pytest.raises(InvalidArgument):
            snapshot_spec_key("node-1", bad)
