from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.runtime import start_all_in_one, start_controller
from csi_driver.transport import AgentSecurity
from tests.certs import Pki
from tests.csi.conftest import NODE_ID, node_config


def test_a_failed_start_stops_what_it_had_started(tmp_path: Path) -> None:
    (tmp_path / "kubelet").mkdir()
    config = node_config(tmp_path)
    with pytest.raises(InvalidArgument):
        start_all_in_one("nonsense", config, tmp_path / "c.db")
    channel = grpc.insecure_channel(config.agent_endpoint)
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=1)  # the agent server is gone
    channel.close()
    services = start_all_in_one(f"unix://{tmp_path}/csi.sock", config, tmp_path / "c.db")
    services.stop(grace_s=0)


def test_all_in_one_calls_its_own_agent_over_mtls(tmp_path: Path) -> None:
    """One process, one node certificate: it serves its agent API and calls it as itself."""
    (tmp_path / "kubelet").mkdir()
    pki = Pki.create(tmp_path / "pki")
    security = AgentSecurity(pki.bundle(f"node/{NODE_ID}"))
    config = replace(node_config(tmp_path), agent_endpoint="tcp://127.0.0.1:0", security=security)
    services = start_all_in_one(f"unix://{tmp_path}/csi.sock", config, tmp_path / "c.db")
    try:
        assert any(e.scheme == "tcp" for e in services.endpoints)
        with CsiClient(f"unix://{tmp_path}/csi.sock") as client:
            volume = client.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-1",
                    capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
                    volume_capabilities=[mount_capability()],
                ),
                timeout=30,
            ).volume
        assert (config.pool_root / "images" / f"{volume.volume_id}.img").exists()
    finally:
        services.stop(grace_s=0)


def test_a_process_refuses_a_certificate_of_another_identity(tmp_path: Path) -> None:
    (tmp_path / "kubelet").mkdir()
    pki = Pki.create(tmp_path / "pki")
    config = replace(node_config(tmp_path), security=AgentSecurity(pki.bundle("node/other")))
    with pytest.raises(InvalidArgument, match=f"is for node/other, but .* runs as node/{NODE_ID}"):
        start_all_in_one(f"unix://{tmp_path}/csi.sock", config, tmp_path / "c.db")
    with pytest.raises(InvalidArgument, match=r"is for node/other, but .* runs as controller"):
        start_controller(f"unix://{tmp_path}/c.sock", tmp_path / "c.db", config.security)
