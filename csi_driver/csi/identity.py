"""CSI Identity service: who Ferry is, what it offers, and whether it is ready."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from csi_driver import DRIVER_NAME, __version__
from csi_driver.core.errors import FailedPrecondition, FerryError
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.rpc.errors import rpc

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """Identity for a process serving the controller, the node, or both.

    ``checks`` are the readiness checks of the parts this process serves
    (catalog, pool); Probe reports ready only when all pass.
    """

    def __init__(self, checks: Sequence[Callable[[], None]], *, controller: bool) -> None:
        self._checks = list(checks)
        self._controller = controller

    @rpc
    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @rpc
    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        caps = [
            csi_pb2.PluginCapability(
                service=_Service(type=_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
            ),
            csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)),
        ]
        if self._controller:
            caps[:0] = [
                csi_pb2.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
                csi_pb2.PluginCapability(service=_Service(type=_Service.GROUP_CONTROLLER_SERVICE)),
            ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc
    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:
        for check in self._checks:
            try:
                check()
            except FerryError as exc:
                raise FailedPrecondition(f"Ferry is not ready: {exc.message}") from exc
        response = csi_pb2.ProbeResponse()
        response.ready.value = True
        return response
