"""Controller service, RPC by RPC, against the CSI spec's rules and codes."""

from __future__ import annotations

import grpc
import pytest

from csi_driver.controller.overview import drain, undrain
from csi_driver.core.model import GiB, MiB
from csi_driver.core.placement import NODE_KEY, ZONE_KEY
from csi_driver.gen import csi_pb2
from csi_driver.store.catalog import Catalog
from csi_driver.store.sqlite import SqliteStore
from tests.csi.conftest import (
    NODE_ID,
    POOL_CAPACITY,
    ZONE,
    Ferry,
    block_capability,
    expect_code,
    mount_capability,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
_RPC = csi_pb2.ControllerServiceCapability.RPC


def create_request(
    name: str = "pvc-1", size: int = 64 * MiB, **fields: object
) -> csi_pb2.CreateVolumeRequest:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_capability()],
    )
    for key, value in fields.items():
        if key == "volume_capabilities":
            del request.volume_capabilities[:]
            request.volume_capabilities.extend(value)  # type: ignore[arg-type]
        elif key == "parameters":
            request.parameters.update(value)  # type: ignore[arg-type]
        else:
            getattr(request, key).CopyFrom(value)
    return request


def list_all(ferry: Ferry) -> list[csi_pb2.ListVolumesResponse.Entry]:
    return list(ferry.client.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries)


# -- CreateVolume ------------------------------------------------------------------


class TestCreateVolume:
    def test_creates_a_volume_of_at_least_the_required_size(self, ferry: Ferry) -> None:
        volume = ferry.client.controller.CreateVolume(create_request(size=100 * MiB + 1)).volume
        assert volume.volume_id.startswith("vol-")
        assert volume.capacity_bytes == 101 * MiB
        assert volume.volume_context["fsType"] == "ext4"
        assert [dict(t.segments) for t in volume.accessible_topology] == [{ZONE_KEY: ZONE}]

    def test_default_size_is_one_gib(self, ferry: Ferry) -> None:
        request = csi_pb2.CreateVolumeRequest(name="d", volume_capabilities=[mount_capability()])
        assert ferry.client.controller.CreateVolume(request).volume.capacity_bytes == 1 * GiB

    def test_limit_is_honoured(self, ferry: Ferry) -> None:
        request = create_request(size=0)
        request.capacity_range.limit_bytes = 10 * MiB
        assert ferry.client.controller.CreateVolume(request).volume.capacity_bytes == 10 * MiB

    def test_same_name_same_arguments_returns_the_same_volume(self, ferry: Ferry) -> None:
        first = ferry.client.controller.CreateVolume(create_request()).volume
        again = ferry.client.controller.CreateVolume(create_request()).volume
        assert again == first

    @pytest.mark.parametrize(
        "changed",
        [
            {"size": 128 * MiB},
            {"parameters": {"fsType": "xfs"}, "size": 512 * MiB},
            {"volume_capabilities": [block_capability()]},
        ],
    )
    def test_same_name_incompatible_arguments_is_already_exists(
        self, ferry: Ferry, changed: dict[str, object]
    ) -> None:
        ferry.client.controller.CreateVolume(
            create_request(size=512 * MiB if "parameters" in changed else 64 * MiB)
        )
        expect_code(
            grpc.StatusCode.ALREADY_EXISTS,
            ferry.client.controller.CreateVolume,
            create_request(**changed),  # type: ignore[arg-type]
        )

    def test_missing_name_is_invalid(self, ferry: Ferry) -> None:
        assert "name" in expect_code(
            INVALID, ferry.client.controller.CreateVolume, create_request(name="")
        )

    def test_missing_capabilities_is_invalid(self, ferry: Ferry) -> None:
        request = create_request(volume_capabilities=[])
        assert "volume_capabilities" in expect_code(
            INVALID, ferry.client.controller.CreateVolume, request
        )

    def test_capability_without_access_type_is_invalid(self, ferry: Ferry) -> None:
        cap = csi_pb2.VolumeCapability(
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            )
        )
        expect_code(
            INVALID, ferry.client.controller.CreateVolume, create_request(volume_capabilities=[cap])
        )

    def test_capability_without_access_mode_is_invalid(self, ferry: Ferry) -> None:
        cap = csi_pb2.VolumeCapability()
        cap.mount.SetInParent()
        expect_code(
            INVALID, ferry.client.controller.CreateVolume, create_request(volume_capabilities=[cap])
        )

    @pytest.mark.parametrize(
        "mode", ["MULTI_NODE_MULTI_WRITER", "MULTI_NODE_READER_ONLY", "MULTI_NODE_SINGLE_WRITER"]
    )
    def test_multi_node_access_modes_are_invalid(self, ferry: Ferry, mode: str) -> None:
        request = create_request(volume_capabilities=[mount_capability(mode=mode)])
        assert "not supported" in expect_code(
            INVALID, ferry.client.controller.CreateVolume, request
        )

    @pytest.mark.parametrize(
        "mode",
        [
            "SINGLE_NODE_WRITER",
            "SINGLE_NODE_SINGLE_WRITER",
            "SINGLE_NODE_MULTI_WRITER",
            "SINGLE_NODE_READER_ONLY",
        ],
    )
    def test_single_node_access_modes_are_served(self, ferry: Ferry, mode: str) -> None:
        request = create_request(
            name=f"m-{mode}", volume_capabilities=[mount_capability(mode=mode)]
        )
        assert ferry.client.controller.CreateVolume(request).volume.volume_id

    def test_block_and_mount_together_are_invalid(self, ferry: Ferry) -> None:
        request = create_request(volume_capabilities=[mount_capability(), block_capability()])
        expect_code(INVALID, ferry.client.controller.CreateVolume, request)

    def test_unknown_parameter_is_invalid_and_named(self, ferry: Ferry) -> None:
        request = create_request(parameters={"fsType": "ext4", "speed": "ludicrous"})
        assert "speed" in expect_code(INVALID, ferry.client.controller.CreateVolume, request)

    @pytest.mark.parametrize(
        "params",
        [{"fsType": "ntfs"}, {"replicas": "9"}, {"replicas": "two"}, {"provisioning": "sparse"}],
    )
    def test_bad_parameter_values_are_invalid(self, ferry: Ferry, params: dict[str, str]) -> None:
        expect_code(
            INVALID, ferry.client.controller.CreateVolume, create_request(parameters=params)
        )

    def test_kubernetes_passthrough_parameters_are_accepted(self, ferry: Ferry) -> None:
        params = {"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "db"}
        assert ferry.client.controller.CreateVolume(
            create_request(parameters=params)
        ).volume.volume_id

    def test_conflicting_fs_types_are_invalid(self, ferry: Ferry) -> None:
        request = create_request(
            volume_capabilities=[mount_capability("xfs")], parameters={"fsType": "ext4"}
        )
        expect_code(INVALID, ferry.client.controller.CreateVolume, request)

    def test_required_above_limit_is_invalid(self, ferry: Ferry) -> None:
        request = create_request(size=20 * MiB)
        request.capacity_range.limit_bytes = 10 * MiB
        expect_code(INVALID, ferry.client.controller.CreateVolume, request)

    def test_limit_below_the_filesystem_minimum_is_out_of_range(self, ferry: Ferry) -> None:
        request = create_request(size=0, parameters={"fsType": "xfs"})
        request.capacity_range.limit_bytes = 100 * MiB
        expect_code(grpc.StatusCode.OUT_OF_RANGE, ferry.client.controller.CreateVolume, request)

    def test_larger_than_any_node_is_out_of_range(self, ferry: Ferry) -> None:
        request = create_request(size=POOL_CAPACITY + 1 * MiB)
        expect_code(grpc.StatusCode.OUT_OF_RANGE, ferry.client.controller.CreateVolume, request)

    def test_larger_than_what_is_left_is_resource_exhausted(self, ferry: Ferry) -> None:
        ferry.create("big", size=POOL_CAPACITY - 100 * MiB)
        expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ferry.client.controller.CreateVolume,
            create_request(name="more", size=200 * MiB),
        )

    def test_a_repeat_on_a_full_node_returns_the_volume(self, ferry: Ferry) -> None:
        # The repeat finds no room for another volume that size: it must still
        # answer with the volume the name already has, not RESOURCE_EXHAUSTED.
        first = ferry.create("fills", size=POOL_CAPACITY - 100 * MiB)
        assert ferry.create("fills", size=POOL_CAPACITY - 100 * MiB) == first

    def test_unreachable_topology_is_resource_exhausted(self, ferry: Ferry) -> None:
        requirement = csi_pb2.TopologyRequirement(
            requisite=[csi_pb2.Topology(segments={ZONE_KEY: "elsewhere"})]
        )
        request = create_request(accessibility_requirements=requirement)
        expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED, ferry.client.controller.CreateVolume, request
        )

    def test_preferred_node_is_used(self, ferry: Ferry, second_node: str) -> None:
        requirement = csi_pb2.TopologyRequirement(
            requisite=[csi_pb2.Topology(segments={ZONE_KEY: ZONE})],
            preferred=[csi_pb2.Topology(segments={ZONE_KEY: ZONE, NODE_KEY: second_node})],
        )
        volume = ferry.client.controller.CreateVolume(
            create_request(accessibility_requirements=requirement)
        ).volume
        assert (ferry.base / second_node / "pool" / "images" / f"{volume.volume_id}.img").exists()

    def test_an_empty_content_source_is_refused(self, ferry: Ferry) -> None:
        for source in (
            csi_pb2.VolumeContentSource(),
            csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource()),
            csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource()),
        ):
            expect_code(
                INVALID,
                ferry.client.controller.CreateVolume,
                create_request(volume_content_source=source),
            )

    def test_the_image_reserves_its_space_on_the_node(self, ferry: Ferry) -> None:
        volume = ferry.create("thick", size=512 * MiB)
        image = ferry.base / NODE_ID / "pool" / "images" / f"{volume.volume_id}.img"
        stat = image.stat()
        assert stat.st_size == 512 * MiB and stat.st_blocks * 512 >= 512 * MiB

    def test_a_thin_image_is_sparse_on_the_node(self, ferry: Ferry) -> None:
        volume = ferry.create("thin", size=512 * MiB, parameters={"provisioning": "thin"})
        image = ferry.base / NODE_ID / "pool" / "images" / f"{volume.volume_id}.img"
        stat = image.stat()
        assert stat.st_size == 512 * MiB and stat.st_blocks * 512 < 1 * MiB
        # A repeat that leaves the choice to the default (thick) is another volume.
        expect_code(
            grpc.StatusCode.ALREADY_EXISTS,
            ferry.client.controller.CreateVolume,
            create_request(name="thin", size=512 * MiB),
        )


# -- DeleteVolume --------------------------------------------------------------------


class TestDeleteVolume:
    def test_deletes_the_volume_and_its_image(self, ferry: Ferry) -> None:
        volume = ferry.create("gone")
        ferry.client.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
        )
        assert not list((ferry.base / NODE_ID / "pool" / "images").glob(f"{volume.volume_id}*"))
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            ferry.client.controller.ControllerGetVolume,
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id),
        )

    def test_name_is_reusable_after_delete(self, ferry: Ferry) -> None:
        first = ferry.create("again")
        ferry.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=first.volume_id))
        assert ferry.create("again").volume_id != first.volume_id

    @pytest.mark.parametrize("volume_id", ["vol-" + "0" * 32, "not-a-ferry-id", "../../etc"])
    def test_unknown_volume_succeeds(self, ferry: Ferry, volume_id: str) -> None:
        kept = ferry.create("bystander")
        reply = ferry.client.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id)
        )
        assert reply == csi_pb2.DeleteVolumeResponse()
        assert [e.volume.volume_id for e in list_all(ferry)] == [kept.volume_id]

    def test_repeat_succeeds(self, ferry: Ferry) -> None:
        volume = ferry.create("twice")
        for _ in range(2):
            ferry.client.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
            )
            assert list_all(ferry) == []

    def test_missing_id_is_invalid(self, ferry: Ferry) -> None:
        expect_code(INVALID, ferry.client.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest())

    def test_published_volume_is_failed_precondition(self, ferry: Ferry) -> None:
        volume = ferry.create("busy")
        ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            ferry.client.controller.DeleteVolume,
            csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id),
        )


# -- ControllerPublishVolume / ControllerUnpublishVolume ---------------------------------


def publish_request(
    volume_id: str, node_id: str = NODE_ID, readonly: bool = False, capability: object = None
) -> csi_pb2.ControllerPublishVolumeRequest:
    return csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id,
        node_id=node_id,
        volume_capability=capability or mount_capability(),  # type: ignore[arg-type]
        readonly=readonly,
    )


class TestControllerPublish:
    def test_publish_returns_the_epoch_and_is_idempotent(self, ferry: Ferry) -> None:
        volume = ferry.create("pub")
        first = ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        again = ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        assert dict(first.publish_context) == dict(again.publish_context)
        assert first.publish_context["ferry.csi.dev/epoch"] == "1"
        status = ferry.client.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
        ).status
        assert list(status.published_node_ids) == [NODE_ID]

    def test_incompatible_republish_is_already_exists(self, ferry: Ferry) -> None:
        volume = ferry.create("ro")
        ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        expect_code(
            grpc.StatusCode.ALREADY_EXISTS,
            ferry.client.controller.ControllerPublishVolume,
            publish_request(volume.volume_id, readonly=True),
        )

    def test_second_node_is_failed_precondition(self, ferry: Ferry, second_node: str) -> None:
        volume = ferry.create("single")
        ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            ferry.client.controller.ControllerPublishVolume,
            publish_request(volume.volume_id, node_id=second_node),
        )

    def test_node_without_the_data_gets_it_moved_there(
        self, ferry: Ferry, second_node: str
    ) -> None:
        # The move itself is tested in tests/controller/test_moves.py.
        volume = ferry.create("follows")
        context = ferry.client.controller.ControllerPublishVolume(
            publish_request(volume.volume_id, node_id=second_node), timeout=60
        ).publish_context
        assert context["ferry.csi.dev/primary"] == second_node
        assert context["ferry.csi.dev/epoch"] == "2"

    def test_node_volume_limit_is_resource_exhausted(self, ferry: Ferry) -> None:
        for i in range(16):  # the test node's max_volumes
            volume = ferry.create(f"many-{i}", size=8 * MiB)
            ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        one_more = ferry.create("one-too-many", size=8 * MiB)
        expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ferry.client.controller.ControllerPublishVolume,
            publish_request(one_more.volume_id),
        )

    def test_unknown_volume_is_not_found(self, ferry: Ferry) -> None:
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            ferry.client.controller.ControllerPublishVolume,
            publish_request("vol-" + "1" * 32),
        )

    def test_unknown_node_is_not_found(self, ferry: Ferry) -> None:
        volume = ferry.create("nonode")
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            ferry.client.controller.ControllerPublishVolume,
            publish_request(volume.volume_id, node_id="no-such-node"),
        )

    def test_wrong_access_type_is_invalid(self, ferry: Ferry) -> None:
        volume = ferry.create("fs")
        request = publish_request(volume.volume_id, capability=block_capability())
        expect_code(INVALID, ferry.client.controller.ControllerPublishVolume, request)

    @pytest.mark.parametrize("missing", ["volume_id", "node_id", "volume_capability"])
    def test_missing_fields_are_invalid(self, ferry: Ferry, missing: str) -> None:
        volume = ferry.create("fields")
        request = publish_request(volume.volume_id)
        request.ClearField(missing)  # type: ignore[arg-type]
        assert missing in expect_code(
            INVALID, ferry.client.controller.ControllerPublishVolume, request
        )

    def test_unpublish_frees_the_node_and_repeats(self, ferry: Ferry, second_node: str) -> None:
        volume = ferry.create("moveable")
        ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        unpublish = csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=volume.volume_id, node_id=NODE_ID
        )
        ferry.client.controller.ControllerUnpublishVolume(unpublish)
        ferry.client.controller.ControllerUnpublishVolume(unpublish)
        status = ferry.client.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
        ).status
        assert list(status.published_node_ids) == []

    def test_unpublish_of_unknown_volume_or_node_succeeds(self, ferry: Ferry) -> None:
        volume = ferry.create("stays-published")
        ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        for volume_id, node_id in (
            ("vol-" + "2" * 32, NODE_ID),
            ("junk", "nobody"),
            (volume.volume_id, "nobody"),
        ):
            ferry.client.controller.ControllerUnpublishVolume(
                csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id)
            )
        (entry,) = list_all(ferry)
        assert list(entry.status.published_node_ids) == [NODE_ID]

    def test_unpublish_without_volume_id_is_invalid(self, ferry: Ferry) -> None:
        expect_code(
            INVALID,
            ferry.client.controller.ControllerUnpublishVolume,
            csi_pb2.ControllerUnpublishVolumeRequest(node_id=NODE_ID),
        )


# -- ValidateVolumeCapabilities -------------------------------------------------------------


class TestValidateVolumeCapabilities:
    def validate(
        self, ferry: Ferry, volume_id: str, *caps: object
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        return ferry.client.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=volume_id, volume_capabilities=list(caps)
            )  # type: ignore[arg-type]
        )

    def test_served_capabilities_are_confirmed(self, ferry: Ferry) -> None:
        volume = ferry.create("v")
        reply = self.validate(
            ferry,
            volume.volume_id,
            mount_capability(),
            mount_capability("ext4", "SINGLE_NODE_READER_ONLY"),
        )
        assert reply.HasField("confirmed") and len(reply.confirmed.volume_capabilities) == 2

    @pytest.mark.parametrize(
        "cap",
        [
            block_capability(),
            mount_capability("xfs"),
            mount_capability(mode="MULTI_NODE_MULTI_WRITER"),
        ],
    )
    def test_unserved_capabilities_are_not_confirmed(self, ferry: Ferry, cap: object) -> None:
        volume = ferry.create("v")
        reply = self.validate(ferry, volume.volume_id, cap)
        assert not reply.HasField("confirmed") and reply.message

    def test_unknown_volume_is_not_found(self, ferry: Ferry) -> None:
        request = csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id="vol-" + "3" * 32, volume_capabilities=[mount_capability()]
        )
        expect_code(
            grpc.StatusCode.NOT_FOUND, ferry.client.controller.ValidateVolumeCapabilities, request
        )

    def test_missing_fields_are_invalid(self, ferry: Ferry) -> None:
        volume = ferry.create("v")
        for request in (
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_capability()]),
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id),
        ):
            expect_code(INVALID, ferry.client.controller.ValidateVolumeCapabilities, request)


# -- ListVolumes ---------------------------------------------------------------------


class TestListVolumes:
    def test_pages_cover_every_volume_once(self, ferry: Ferry) -> None:
        created = {ferry.create(f"l{i}", size=8 * MiB).volume_id for i in range(7)}
        seen: list[str] = []
        token = ""
        while True:
            reply = ferry.client.controller.ListVolumes(
                csi_pb2.ListVolumesRequest(max_entries=3, starting_token=token)
            )
            assert len(reply.entries) <= 3
            seen += [e.volume.volume_id for e in reply.entries]
            token = reply.next_token
            if not token:
                break
        assert sorted(seen) == sorted(created)

    def test_paging_survives_deleting_the_token_volume(self, ferry: Ferry) -> None:
        created = sorted(ferry.create(f"d{i}", size=8 * MiB).volume_id for i in range(5))
        first = ferry.client.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
        token = first.next_token
        assert token == created[1]
        ferry.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=token))
        rest = ferry.client.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=token))
        assert [e.volume.volume_id for e in rest.entries] == created[2:]

    def test_without_max_entries_lists_all(self, ferry: Ferry) -> None:
        for i in range(4):
            ferry.create(f"a{i}", size=8 * MiB)
        reply = ferry.client.controller.ListVolumes(csi_pb2.ListVolumesRequest())
        assert len(reply.entries) == 4 and not reply.next_token

    def test_entries_show_published_nodes_and_condition(self, ferry: Ferry) -> None:
        volume = ferry.create("p")
        ferry.client.controller.ControllerPublishVolume(publish_request(volume.volume_id))
        (entry,) = ferry.client.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
        assert list(entry.status.published_node_ids) == [NODE_ID]
        assert not entry.status.volume_condition.abnormal

    def test_unknown_token_is_aborted(self, ferry: Ferry) -> None:
        expect_code(
            grpc.StatusCode.ABORTED,
            ferry.client.controller.ListVolumes,
            csi_pb2.ListVolumesRequest(starting_token="garbage"),
        )

    def test_negative_max_entries_is_invalid(self, ferry: Ferry) -> None:
        expect_code(
            INVALID, ferry.client.controller.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=-1)
        )


# -- GetCapacity -----------------------------------------------------------------------


class TestGetCapacity:
    def capacity(self, ferry: Ferry, **fields: object) -> csi_pb2.GetCapacityResponse:
        return ferry.client.controller.GetCapacity(csi_pb2.GetCapacityRequest(**fields))  # type: ignore[arg-type]

    def test_whole_pool_is_available_when_empty(self, ferry: Ferry) -> None:
        reply = self.capacity(ferry)
        assert reply.available_capacity == POOL_CAPACITY
        assert reply.maximum_volume_size.value == POOL_CAPACITY

    def test_agrees_with_create_volume(self, ferry: Ferry) -> None:
        ferry.create("half", size=POOL_CAPACITY // 2)
        left = self.capacity(ferry).available_capacity
        assert left == POOL_CAPACITY // 2
        ferry.create("rest", size=left)
        assert self.capacity(ferry).available_capacity == 0
        expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ferry.client.controller.CreateVolume,
            create_request("one-more", 8 * MiB),
        )

    def test_per_topology_segment(self, ferry: Ferry, second_node: str) -> None:
        zone = csi_pb2.Topology(segments={ZONE_KEY: ZONE})
        node_b = csi_pb2.Topology(segments={ZONE_KEY: ZONE, NODE_KEY: second_node})
        elsewhere = csi_pb2.Topology(segments={ZONE_KEY: "zone-9"})
        assert (
            self.capacity(ferry, accessible_topology=zone).available_capacity == 2 * POOL_CAPACITY
        )
        assert self.capacity(ferry, accessible_topology=node_b).available_capacity == POOL_CAPACITY
        assert self.capacity(ferry, accessible_topology=elsewhere).available_capacity == 0

    def test_a_drained_node_offers_no_capacity(self, ferry: Ferry, second_node: str) -> None:
        """GetCapacity counts only nodes CreateVolume would place on: the scheduler
        must not be drawn to a drained node that refuses new volumes."""
        zone = csi_pb2.Topology(segments={ZONE_KEY: ZONE})
        node_b = csi_pb2.Topology(segments={ZONE_KEY: ZONE, NODE_KEY: second_node})
        store = SqliteStore(ferry.catalog)
        try:
            catalog = Catalog(store)
            assert drain(catalog, second_node) == {}
            drained = self.capacity(ferry, accessible_topology=node_b)
            assert drained.available_capacity == 0
            assert drained.maximum_volume_size.value == 0
            whole = self.capacity(ferry, accessible_topology=zone)
            assert whole.available_capacity == POOL_CAPACITY
            assert undrain(catalog, second_node)
            back = self.capacity(ferry, accessible_topology=node_b)
            assert back.available_capacity == POOL_CAPACITY
        finally:
            store.close()

    def test_minimum_size_follows_the_filesystem(self, ferry: Ferry) -> None:
        reply = self.capacity(ferry, volume_capabilities=[mount_capability("xfs")])
        assert reply.minimum_volume_size.value == 300 * MiB

    def test_unservable_capability_has_no_capacity(self, ferry: Ferry) -> None:
        reply = self.capacity(
            ferry, volume_capabilities=[mount_capability(mode="MULTI_NODE_MULTI_WRITER")]
        )
        assert reply.available_capacity == 0


# -- ControllerGetVolume / ControllerExpandVolume / capabilities ----------------------------


class TestControllerGetVolume:
    def test_reports_the_volume(self, ferry: Ferry) -> None:
        volume = ferry.create("g")
        reply = ferry.client.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
        )
        assert reply.volume == volume
        assert not reply.status.volume_condition.abnormal

    def test_unknown_is_not_found_and_missing_is_invalid(self, ferry: Ferry) -> None:
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            ferry.client.controller.ControllerGetVolume,
            csi_pb2.ControllerGetVolumeRequest(volume_id="vol-" + "4" * 32),
        )
        expect_code(
            INVALID,
            ferry.client.controller.ControllerGetVolume,
            csi_pb2.ControllerGetVolumeRequest(),
        )


class TestControllerExpandVolume:
    def expand(self, volume_id: str, size: int) -> csi_pb2.ControllerExpandVolumeRequest:
        return csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size)
        )

    def test_grows_and_asks_for_node_expansion(self, ferry: Ferry) -> None:
        volume = ferry.create("e", size=64 * MiB)
        reply = ferry.client.controller.ControllerExpandVolume(
            self.expand(volume.volume_id, 96 * MiB)
        )
        assert (reply.capacity_bytes, reply.node_expansion_required) == (96 * MiB, True)
        image = ferry.base / NODE_ID / "pool" / "images" / f"{volume.volume_id}.img"
        assert image.stat().st_size == 96 * MiB
        again = ferry.client.controller.ControllerExpandVolume(
            self.expand(volume.volume_id, 96 * MiB)
        )
        assert again.capacity_bytes == 96 * MiB

    def test_never_shrinks(self, ferry: Ferry) -> None:
        volume = ferry.create("e", size=64 * MiB)
        reply = ferry.client.controller.ControllerExpandVolume(
            self.expand(volume.volume_id, 32 * MiB)
        )
        assert reply.capacity_bytes == 64 * MiB

    def test_beyond_the_pool_is_out_of_range(self, ferry: Ferry) -> None:
        volume = ferry.create("e")
        expect_code(
            grpc.StatusCode.OUT_OF_RANGE,
            ferry.client.controller.ControllerExpandVolume,
            self.expand(volume.volume_id, POOL_CAPACITY * 2),
        )

    def test_beyond_free_space_is_resource_exhausted(self, ferry: Ferry) -> None:
        volume = ferry.create("e")
        ferry.create("filler", size=POOL_CAPACITY - 128 * MiB)
        expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ferry.client.controller.ControllerExpandVolume,
            self.expand(volume.volume_id, 256 * MiB),
        )

    def test_unknown_is_not_found_and_missing_fields_are_invalid(self, ferry: Ferry) -> None:
        expect_code(
            grpc.StatusCode.NOT_FOUND,
            ferry.client.controller.ControllerExpandVolume,
            self.expand("vol-" + "5" * 32, MiB),
        )
        expect_code(INVALID, ferry.client.controller.ControllerExpandVolume, self.expand("", MiB))
        volume = ferry.create("e")
        expect_code(
            INVALID,
            ferry.client.controller.ControllerExpandVolume,
            csi_pb2.ControllerExpandVolumeRequest(volume_id=volume.volume_id),
        )


def test_controller_capabilities(ferry: Ferry) -> None:
    reply = ferry.client.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()
    )
    assert {c.rpc.type for c in reply.capabilities} == {
        _RPC.CREATE_DELETE_VOLUME,
        _RPC.PUBLISH_UNPUBLISH_VOLUME,
        _RPC.LIST_VOLUMES,
        _RPC.GET_CAPACITY,
        _RPC.EXPAND_VOLUME,
        _RPC.LIST_VOLUMES_PUBLISHED_NODES,
        _RPC.VOLUME_CONDITION,
        _RPC.GET_VOLUME,
        _RPC.SINGLE_NODE_MULTI_WRITER,
        _RPC.MODIFY_VOLUME,
        _RPC.CREATE_DELETE_SNAPSHOT,
        _RPC.LIST_SNAPSHOTS,
        _RPC.CLONE_VOLUME,
        _RPC.GET_SNAPSHOT,
    }
