"""Identity service, over the CSI socket."""

from __future__ import annotations

import grpc

from csi_driver import DRIVER_NAME, __version__
from csi_driver.gen import csi_pb2
from tests.csi.conftest import Ferry, expect_code

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


def test_plugin_info_names_the_driver_and_version(ferry: Ferry) -> None:
    info = ferry.client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert (info.name, info.vendor_version) == (DRIVER_NAME, __version__)


def test_capabilities_cover_controller_topology_and_online_expansion(ferry: Ferry) -> None:
    reply = ferry.client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in reply.capabilities if c.HasField("service")}
    expansion = {
        c.volume_expansion.type for c in reply.capabilities if c.HasField("volume_expansion")
    }
    assert services == {
        _Service.CONTROLLER_SERVICE,
        _Service.GROUP_CONTROLLER_SERVICE,
        _Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    }
    assert expansion == {_Expansion.ONLINE}


def test_probe_is_ready_when_pool_and_catalog_work(ferry: Ferry) -> None:
    reply = ferry.client.identity.Probe(csi_pb2.ProbeRequest())
    assert reply.HasField("ready") and reply.ready.value


def test_probe_fails_while_the_pool_is_gone(ferry: Ferry) -> None:
    pool = ferry.base / "node-a" / "pool"
    moved = pool.with_name("pool-away")
    pool.rename(moved)
    try:
        details = expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, ferry.client.identity.Probe, csi_pb2.ProbeRequest()
        )
        assert "not writable" in details
    finally:
        moved.rename(pool)
    assert ferry.client.identity.Probe(csi_pb2.ProbeRequest()).ready.value
