"""The chart's policy and observability pieces: sidecar flags for moves and
VolumeAttributesClass, the example classes, the optional ServiceMonitor, and a
Grafana dashboard whose every query names metrics Ferry exports."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from csi_driver import metrics
from csi_driver.core.params import StorageParameters
from tests.deploy.test_manifests import (
    CHART,
    EXAMPLES,
    KIND_SINCE,
    KUBERNETES_VERSION,
    PLAIN,
    load,
    render,
)

DASHBOARD = CHART / "dashboards" / "ferry.json"
MONITORING = (
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.serviceMonitor.labels.release=prom",
    "--set", "grafana.dashboard.enabled=true",
    "--set", "volumeAttributesClasses[0].name=gold",
    "--set-string", "volumeAttributesClasses[0].parameters.replicas=2",
    "--set-string", "volumeAttributesClasses[0].parameters.failoverPolicy=promote",
)  # fmt: skip
#: How long after a move finishes the attacher may take to call again, at most.
PICKUP_S = 10


def exported_names() -> set[str]:
    """Every sample name Ferry's registry can expose, by each metric's type."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names.update(family.name + s for s in suffixes[family.type])
    return names


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_dashboard_query_names_metrics_ferry_exports() -> None:
    known = exported_names()
    assert "ferry_replication_lag_seconds" in known  # the table itself is sound
    used = {name for expr in queries() for name in re.findall(r"\bferry_[a-z0-9_]+\b", expr)}
    assert used - known == set(), "dashboard queries name metrics Ferry does not export"
    # The mobility metrics are all on it.
    for name in (
        "ferry_volume_moved_bytes_total",
        "ferry_move_duration_seconds_bucket",
        "ferry_failover_duration_seconds_bucket",
        "ferry_failover_data_loss_window_seconds_bucket",
        "ferry_replication_lag_seconds",
        "ferry_replication_lag_bytes",
        "ferry_transfers_in_flight",
        "ferry_replica_changes_total",
        "ferry_forced_detaches_total",
    ):
        assert name in used, name


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert [t["refId"] for t in panel["targets"]] == [
            chr(65 + i) for i in range(len(panel["targets"]))
        ]
        for expr in (t["expr"] for t in panel["targets"]):
            assert expr.count("(") == expr.count(")"), expr
    assert dashboard["templating"]["list"][0]["name"] == "datasource"


@pytest.fixture(scope="module")
def monitored() -> list[dict[str, Any]]:
    return render(*MONITORING)


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render()


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_monitoring_is_off_unless_asked_for(rendered: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in rendered}
    assert not kinds & {"ServiceMonitor", "VolumeAttributesClass"}
    assert set(by_kind(rendered, "ConfigMap")) == {"ferry-ca-cert"}  # no dashboard


def test_service_monitors_reach_every_ferry_pods_metrics_port(
    monitored: list[dict[str, Any]],
) -> None:
    workloads = {**by_kind(monitored, "Deployment"), **by_kind(monitored, "DaemonSet")}
    services = by_kind(monitored, "Service")
    monitors = by_kind(monitored, "ServiceMonitor")
    assert set(monitors) == {"ferry-controller", "ferry-node"}
    for name, monitor in monitors.items():
        assert monitor["metadata"]["labels"]["release"] == "prom"
        service = services[f"{name}-metrics"]
        wanted = monitor["spec"]["selector"]["matchLabels"]
        assert wanted.items() <= service["metadata"]["labels"].items()
        assert service["spec"]["clusterIP"] == "None"
        pod = workloads[name]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        ferry = next(c for c in pod["spec"]["containers"] if c["name"] == "ferry")
        port = next(p for p in ferry["ports"] if p["name"] == "metrics")
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port["containerPort"]
        assert f"--metrics-port={port['containerPort']}" in ferry["args"]
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service_port["name"]]


def test_dashboard_config_map_holds_the_dashboard(monitored: list[dict[str, Any]]) -> None:
    config_map = by_kind(monitored, "ConfigMap")["ferry-grafana-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["ferry.json"]) == json.loads(DASHBOARD.read_text())


def test_monitoring_objects_match_the_kubernetes_schema(monitored: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    # ServiceMonitor is the Prometheus Operator's CRD: no schema ships for it.
    for doc in (d for d in monitored if d["kind"] != "ServiceMonitor"):
        version = KIND_SINCE.get(doc["kind"], KUBERNETES_VERSION)
        kubernetes_validate.validate(doc, version, strict=True)


def test_volume_attributes_classes_carry_only_what_ferry_may_change(
    monitored: list[dict[str, Any]],
) -> None:
    classes = [d for d in [*monitored, *load(EXAMPLES)] if d["kind"] == "VolumeAttributesClass"]
    assert {c["metadata"]["name"] for c in classes} >= {"gold", "ferry-replicated"}
    for vac in classes:
        assert vac["apiVersion"] == "storage.k8s.io/v1"
        assert vac["driverName"] == "ferry.csi.dev"
        assert all(isinstance(v, str) for v in vac["parameters"].values())
        StorageParameters().with_mutable(vac["parameters"])  # raises if refused
    claims = [d for d in load(EXAMPLES) if d["kind"] == "PersistentVolumeClaim"]
    names = {c["metadata"]["name"] for c in classes}
    assert any(c["spec"].get("volumeAttributesClassName") in names for c in claims)


def _seconds(flag: str) -> float:
    value = flag.split("=", 1)[1]
    match = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert match, f"{flag}: not a duration in ms, s or m"
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def sidecar_args(docs: list[dict[str, Any]], name: str) -> list[str]:
    deployment = by_kind(docs, "Deployment")["ferry-controller"]
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return list(next(c for c in containers if c["name"] == name)["args"])


@pytest.mark.parametrize("source", ["chart", "plain"])
def test_attacher_picks_up_a_finished_move_within_seconds(
    rendered: list[dict[str, Any]], source: str
) -> None:
    docs = rendered if source == "chart" else load(PLAIN)
    args = sidecar_args(docs, "csi-attacher")
    flags = {a.split("=", 1)[0]: a for a in args}
    assert _seconds(flags["--retry-interval-max"]) <= PICKUP_S
    assert _seconds(flags["--retry-interval-start"]) <= _seconds(flags["--retry-interval-max"])
    # Long enough for a warm move to finish in its first call.
    assert _seconds(flags["--timeout"]) >= 15
    resizer = sidecar_args(docs, "csi-resizer")
    assert any(
        a.startswith("--feature-gates=") and "VolumeAttributesClass=true" in a for a in resizer
    )


def test_the_chart_comments_why_the_attacher_is_tuned() -> None:
    text = (CHART / "templates" / "controller.yaml").read_text()
    assert "--retry-interval-max" in text
    assert "within seconds" in text
    dashboard_rows = yaml.safe_load((CHART / "values.yaml").read_text())
    assert dashboard_rows["volumeAttributesClasses"] == []
