"""Where Events go without a reachable cluster: the log, never an exception or a stall.

The unreachable API server here is a real kubeconfig naming a local TCP
port that nothing listens on: the kubernetes client really connects and
really fails.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
import yaml

from csi_driver.core.errors import Unavailable
from csi_driver.kube.api import KubeApi, KubeSink, connect, event_sink
from csi_driver.kube.events import LoggingSink, MobilityEvents, VolumeRef

VOL = VolumeRef("vol-" + "d" * 32, "pvc-sink")


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def kubeconfig(path: Path, server: str) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_without_a_cluster_the_sink_is_the_log(no_cluster: None) -> None:
    assert isinstance(event_sink(), LoggingSink)


def test_a_kubeconfig_that_is_not_one_is_unavailable_and_falls_back_to_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(Unavailable, match="set KUBECONFIG"):
        connect(str(tmp_path / "absent"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "empty"))
    (tmp_path / "empty").write_text("")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with caplog.at_level(logging.WARNING, logger="csi_driver.kube.api"):
        assert isinstance(event_sink(), LoggingSink)
    assert "Kubernetes Events disabled" in caplog.text


def test_an_unreachable_api_server_costs_the_caller_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api = connect(str(kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{closed_port()}")))
    sink = KubeSink(KubeApi(api), "ferry-test")
    events = MobilityEvents(sink)
    with caplog.at_level(logging.INFO):
        started = time.monotonic()
        for n in range(20):
            events.move_failed(VOL, "node-2", f"attempt {n}")
        queued_in = time.monotonic() - started
        assert sink.close(timeout_s=60)
    # Emitting only logs and queues: far below one call to the API server.
    assert queued_in < 1.0, queued_in
    logged = [r for r in caplog.records if r.name == "csi_driver.kube.events"]
    assert len(logged) == 20 and "attempt 19" in logged[-1].getMessage()
    failures = [r for r in caplog.records if r.getMessage() == "could not post a Kubernetes Event"]
    assert len(failures) == 20
    api.close()


def test_a_full_queue_logs_instead_of_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api = connect(str(kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{closed_port()}")))
    sink = KubeSink(KubeApi(api), "ferry-test", queue_size=1)
    with caplog.at_level(logging.WARNING, logger="csi_driver.kube.api"):
        for n in range(50):
            MobilityEvents(sink).move_failed(VOL, "node-2", f"attempt {n}")
        sink.close(timeout_s=60)
    assert "too many Kubernetes Events waiting to be posted" in caplog.text
    api.close()
