"""ControllerModifyVolume (VolumeAttributesClass) on a real all-in-one Ferry.

One row per CSI spec rule: what a VolumeAttributesClass may change
(``replicas``, ``rpoSeconds``, ``failoverPolicy``), what it may not
(INVALID_ARGUMENT naming the key, before any lookup), an unknown volume
(NOT_FOUND), and idempotency (the same change twice bumps the volume's
generation once). The record the reconcilers watch is read back from the
catalog the controller wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest

from csi_driver.core.model import Volume, VolumeState
from csi_driver.gen import csi_pb2
from csi_driver.store.catalog import Catalog
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import Ferry, expect_code, mount_capability

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def catalog(ferry: Ferry) -> Iterator[Catalog]:
    store = SqliteStore(ferry.catalog)
    try:
        yield Catalog(store)
    finally:
        store.close()


def modify(ferry: Ferry, volume_id: str, mutable: dict[str, str]) -> None:
    ferry.client.controller.ControllerModifyVolume(
        csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=mutable)
    )


def stored(catalog: Catalog, volume_id: str) -> Volume:
    return catalog.require_volume(volume_id)


@dataclass(frozen=True)
class Change:
    name: str
    mutable: dict[str, str]
    #: The volume's recorded parameters afterwards (starting from replicas=0).
    recorded: dict[str, str]


CHANGES = [
    Change("add replicas", {"replicas": "2"}, {"replicas": "2"}),
    Change("rpo", {"rpoSeconds": "30"}, {"replicas": "0", "rpoSeconds": "30"}),
    Change(
        "promote", {"failoverPolicy": "promote"}, {"replicas": "0", "failoverPolicy": "promote"}
    ),
    Change(
        "all three",
        {"replicas": "1", "rpoSeconds": "5", "failoverPolicy": "Promote"},
        {"replicas": "1", "rpoSeconds": "5", "failoverPolicy": "promote"},
    ),
    # Back to the defaults: defaults are not recorded, as at creation.
    Change("defaults", {"rpoSeconds": "0", "failoverPolicy": "wait"}, {"replicas": "0"}),
]


@pytest.mark.parametrize("change", CHANGES, ids=[c.name for c in CHANGES])
def test_policy_change_is_recorded_once(ferry: Ferry, catalog: Catalog, change: Change) -> None:
    volume_id = ferry.create("modify-me", parameters={"fsType": "ext4"}).volume_id
    before = stored(catalog, volume_id)
    modify(ferry, volume_id, change.mutable)
    after = stored(catalog, volume_id)
    assert dict(after.parameters) == change.recorded | {"fsType": "ext4"}
    bumped = dict(after.parameters) != dict(before.parameters)
    assert after.generation == before.generation + bumped
    # The same change again is a no-op: nothing rewritten, generation unchanged.
    modify(ferry, volume_id, change.mutable)
    assert stored(catalog, volume_id) == after
    # Everything else about the volume is as it was.
    assert replace(after, parameters=before.parameters, generation=before.generation) == before


def test_successive_changes_bump_the_generation_each_time(ferry: Ferry, catalog: Catalog) -> None:
    volume_id = ferry.create("modify-twice").volume_id
    generation = stored(catalog, volume_id).generation
    modify(ferry, volume_id, {"replicas": "2"})
    modify(ferry, volume_id, {"replicas": "1"})
    modify(ferry, volume_id, {"rpoSeconds": "10"})
    after = stored(catalog, volume_id)
    assert after.generation == generation + 3
    assert dict(after.parameters) == {"replicas": "1", "rpoSeconds": "10"}


#: (mutable_parameters, words the INVALID_ARGUMENT message must hold)
REFUSED = [
    ({"fsType": "xfs"}, r"'fsType' cannot be changed on an existing volume"),
    ({"provisioning": "thin"}, r"'provisioning' cannot be changed"),
    ({"replicas": "1", "snapshotPolicy": "x"}, r"'snapshotPolicy' cannot be changed"),
    ({"replicas": "9"}, r"replicas='9' is invalid: use a whole number from 0 to 3"),
    ({"rpoSeconds": "soon"}, r"rpoSeconds='soon' is invalid"),
    ({"failoverPolicy": "always"}, r"failoverPolicy='always' is invalid: use wait or promote"),
]


@pytest.mark.parametrize(("mutable", "words"), REFUSED, ids=[str(r[0]) for r in REFUSED])
def test_refused_changes_name_the_parameter_and_change_nothing(
    ferry: Ferry, catalog: Catalog, mutable: dict[str, str], words: str
) -> None:
    volume_id = ferry.create("refuse-me").volume_id
    before = stored(catalog, volume_id)
    request = csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=mutable)
    details = expect_code(INVALID, ferry.client.controller.ControllerModifyVolume, request)
    assert re.search(words, details), details
    assert stored(catalog, volume_id) == before


@pytest.mark.parametrize("volume_id", ["vol-" + "1" * 32, "fake-vol-id", "../../etc/passwd"])
def test_refusal_of_a_bad_key_precedes_the_lookup(ferry: Ferry, volume_id: str) -> None:
    request = csi_pb2.ControllerModifyVolumeRequest(
        volume_id=volume_id, mutable_parameters={"fsType": "xfs"}
    )
    expect_code(INVALID, ferry.client.controller.ControllerModifyVolume, request)
    request = csi_pb2.ControllerModifyVolumeRequest(
        volume_id=volume_id, mutable_parameters={"replicas": "1"}
    )
    expect_code(grpc.StatusCode.NOT_FOUND, ferry.client.controller.ControllerModifyVolume, request)


def test_a_volume_being_deleted_refuses_a_new_policy(ferry: Ferry, catalog: Catalog) -> None:
    volume_id = ferry.create("going").volume_id
    # The DELETING intent as DeleteVolume persists it before the node acts.
    catalog.update_volume(volume_id, lambda v: replace(v, state=VolumeState.DELETING))
    request = csi_pb2.ControllerModifyVolumeRequest(
        volume_id=volume_id, mutable_parameters={"replicas": "1"}
    )
    details = expect_code(
        grpc.StatusCode.FAILED_PRECONDITION, ferry.client.controller.ControllerModifyVolume, request
    )
    assert "being deleted" in details


def test_create_volume_applies_the_volume_attributes_class(ferry: Ferry, catalog: Catalog) -> None:
    request = csi_pb2.CreateVolumeRequest(
        name="with-vac",
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * 1024 * 1024),
        volume_capabilities=[mount_capability()],
        parameters={"replicas": "0", "rpoSeconds": "60"},
        mutable_parameters={"replicas": "1", "failoverPolicy": "promote"},
    )
    first = ferry.client.controller.CreateVolume(request).volume
    assert dict(stored(catalog, first.volume_id).parameters) == {
        "replicas": "1",
        "rpoSeconds": "60",
        "failoverPolicy": "promote",
    }
    # A repeat of the same request is the same volume (idempotent by name).
    assert ferry.client.controller.CreateVolume(request).volume.volume_id == first.volume_id
    # A VolumeAttributesClass with another key is refused before anything is made.
    request.name = "with-bad-vac"
    request.mutable_parameters["fsType"] = "xfs"
    details = expect_code(INVALID, ferry.client.controller.CreateVolume, request)
    assert "'fsType' cannot be changed" in details


def test_validate_capabilities_takes_the_volume_attributes_class_into_account(
    ferry: Ferry,
) -> None:
    volume_id = ferry.create("validate-vac", parameters={"replicas": "0"}).volume_id
    modify(ferry, volume_id, {"replicas": "2"})

    def validate(mutable: dict[str, str]) -> Any:
        return ferry.client.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=volume_id,
                volume_capabilities=[mount_capability()],
                parameters={"replicas": "0"},
                mutable_parameters=mutable,
            )
        )

    confirmed = validate({"replicas": "2"})
    assert confirmed.HasField("confirmed"), confirmed.message
    assert dict(confirmed.confirmed.mutable_parameters) == {"replicas": "2"}
    assert not validate({}).HasField("confirmed")
    refused = validate({"fsType": "xfs"})
    assert not refused.HasField("confirmed")
    assert "'fsType' cannot be changed" in refused.message


def test_a_retried_create_finds_its_volume_after_a_policy_change(ferry: Ferry) -> None:
    params = {"fsType": "ext4", "replicas": "0"}
    volume_id = ferry.create("retried", parameters=params).volume_id
    modify(ferry, volume_id, {"replicas": "1", "rpoSeconds": "30"})
    # The provisioner retrying its original request still gets the volume.
    assert ferry.create("retried", parameters=params).volume_id == volume_id
    # A parameter the volume keeps for life still tells two claims apart.
    request = csi_pb2.CreateVolumeRequest(
        name="retried",
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * 1024 * 1024),
        volume_capabilities=[mount_capability()],
        parameters={"fsType": "ext4", "provisioning": "thin"},
    )
    details = expect_code(
        grpc.StatusCode.ALREADY_EXISTS, ferry.client.controller.CreateVolume, request
    )
    assert "its parameters differ" in details
