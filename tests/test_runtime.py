from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi_driver.core.errors import InvalidArgument
from csi_driver.runtime import start_all_in_one
from tests.csi.conftest import node_config


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
