"""Progress as a value: rate over the current session, ETA, and the gauges."""

from __future__ import annotations

from prometheus_client import REGISTRY

from csi_driver.transfer.progress import ProgressMeter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_eta_count_this_session_and_what_landed_before() -> None:
    clock = Clock()
    meter = ProgressMeter("t-progress", bytes_total=1000, bytes_done=400, clock=clock)
    assert meter.value().eta_s is None  # nothing arrived yet: no rate, no guess
    clock.now += 2
    meter.add(200)
    progress = meter.value()
    assert progress.bytes_done == 600 and progress.bytes_this_session == 200
    assert progress.rate_bytes_per_s == 100.0
    assert progress.eta_s == 4.0 and progress.fraction == 0.6
    meter.publish("test")
    sample = REGISTRY.get_sample_value
    assert sample("ferry_transfer_remaining_bytes", {"transfer": "t-progress"}) == 400
    assert sample("ferry_transfer_eta_seconds", {"transfer": "t-progress"}) == 4.0
    clock.now += 4
    meter.add(400)
    assert meter.finish().eta_s == 0.0
    assert sample("ferry_transfer_remaining_bytes", {"transfer": "t-progress"}) is None
