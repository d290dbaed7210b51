"""The Helm chart and the plain manifests: lint, render, validate, agree."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi_driver.cli import build_parser
from csi_driver.core.params import parse_parameters
from csi_driver.pki import CertificateAuthority, Identity, TlsBundle
from csi_driver.store.url import parse_catalog_url

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".cache" / "tools" / "helm"
CHART = ROOT / "charts" / "ferry"
PLAIN = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "deploy" / "kubernetes" / "examples").glob("*.yaml"))
KUBERNETES_VERSION = "1.31.0"
#: Kinds that exist (as the manifests write them) only in later Kubernetes releases.
KIND_SINCE = {"VolumeAttributesClass": "1.34.0"}
#: Labels helm adds that the plain manifests leave out.
HELM_LABELS = ("app.kubernetes.io/managed-by", "app.kubernetes.io/version", "helm.sh/chart")

needs_helm = pytest.mark.skipif(
    not HELM.exists(), reason="helm not fetched: run `python3 scripts/fetch_helm.py` (setup does)"
)


def load(paths: list[Path]) -> list[dict[str, Any]]:
    return [doc for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]


def helm(*args: str) -> str:
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


#: Values for an existing etcd with its own PKI (endpoints plus a client TLS Secret).
EXISTING_ETCD = (
    "--set", "catalog.etcd.deploy=false",
    "--set", "catalog.etcd.endpoints={etcd-0.db.example:2379,10.0.0.5:2379}",
    "--set", "catalog.etcd.tlsSecret=etcd-client",
)  # fmt: skip


def render(*values: str) -> list[dict[str, Any]]:
    if not HELM.exists():
        pytest.skip("helm not fetched: run `python3 scripts/fetch_helm.py` (setup does)")
    out = helm("template", "ferry", str(CHART), "--namespace", "ferry-system", *values)
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def existing_etcd() -> list[dict[str, Any]]:
    """The chart for an existing etcd that keeps its own PKI."""
    return render(*EXISTING_ETCD)


@needs_helm
def test_chart_lints() -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART))


def test_every_manifest_matches_the_kubernetes_schema(
    rendered: list[dict[str, Any]], existing_etcd: list[dict[str, Any]]
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = [*load(PLAIN), *load(EXAMPLES), *rendered, *existing_etcd]
    assert len(docs) >= 20
    for doc in docs:
        # Raises ValidationError naming the object and the offending field.
        version = KIND_SINCE.get(doc["kind"], KUBERNETES_VERSION)
        kubernetes_validate.validate(doc, version, strict=True)


def test_chart_renders_what_the_plain_manifests_define(rendered: list[dict[str, Any]]) -> None:
    def names(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "Namespace"}

    # The chart can make the cluster CA, its certificate alone for nodes and the
    # enrollment token; with the plain manifests the operator makes them.
    made = {("Secret", "ferry-ca"), ("ConfigMap", "ferry-ca-cert"), ("Secret", "ferry-enrollment")}
    assert names(rendered) == names(load(PLAIN)) | made


def test_plain_manifests_are_the_chart_rendered_without_a_generated_ca() -> None:
    """deploy/kubernetes holds what the chart renders (helm's own labels aside)."""
    if not HELM.exists():
        pytest.skip("helm not fetched: run `python3 scripts/fetch_helm.py` (setup does)")
    out = helm(
        "template", "ferry", str(CHART), "--namespace", "ferry-system",
        "--set", "tls.generateCA=false",
    )  # fmt: skip

    def keyed(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        for doc in docs:
            for labels in (
                doc["metadata"],
                doc.get("spec", {}).get("template", {}).get("metadata", {}),
            ):
                for helm_label in HELM_LABELS:
                    labels.get("labels", {}).pop(helm_label, None)
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    chart = keyed([doc for doc in yaml.safe_load_all(out) if doc])
    plain = keyed([d for d in load(PLAIN) if d["kind"] != "Namespace"])
    assert chart.keys() == plain.keys()
    for key, doc in chart.items():
        assert doc == plain[key], (
            f"{key} differs: render the chart again (deploy/kubernetes/README.md)"
        )


def ferry_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pods = [d["spec"]["template"]["spec"] for d in docs if "template" in d.get("spec", {})]
    return [
        c
        for pod in pods
        for c in [*pod.get("initContainers", []), *pod["containers"]]
        if c["image"].startswith("ghcr.io/ferry-csi/ferry")
    ]


def test_every_ferry_command_line_parses(
    rendered: list[dict[str, Any]], existing_etcd: list[dict[str, Any]]
) -> None:
    """Flags in the manifests are flags Ferry has: a renamed flag fails here, not in a pod."""
    containers = ferry_containers([*rendered, *load(PLAIN), *existing_etcd])
    assert {c["args"][0] for c in containers} == {"ca", "controller", "node"}
    parser = build_parser()
    for container in containers:
        args = [re.sub(r"\$\((\w+)\)", "x", a) for a in container["args"]]
        parser.parse_args(args)


def test_multi_node_wiring(rendered: list[dict[str, Any]]) -> None:
    """No node-local catalog or socket: every agent reaches etcd and its peers over mTLS."""
    for container in ferry_containers([*rendered, *load(PLAIN)]):
        args = container["args"]
        if args[0] in ("controller", "node"):
            catalog = next(a for a in args if a.startswith("--catalog="))
            assert catalog.startswith("--catalog=etcds://ferry-etcd-0.ferry-etcd.")
            assert parse_catalog_url(catalog.removeprefix("--catalog=")).etcd_tls
            assert "--tls-dir=/tls" in args
            assert not any(a.startswith("--catalog-tls-dir") for a in args)
        if args[0] == "node":
            assert "--agent-endpoint=tcp://$(POD_IP):9810" in args
    kinds = {d["kind"]: d for d in rendered if d["metadata"]["name"] == "ferry-etcd"}
    assert kinds["StatefulSet"]["spec"]["replicas"] == 3
    assert kinds["Service"]["spec"]["clusterIP"] == "None"
    assert not any(
        "hostPath" in v and "catalog" in v["hostPath"]["path"]
        for d in rendered
        if "template" in d.get("spec", {})
        for v in d["spec"]["template"]["spec"].get("volumes", [])
    )


def test_an_existing_etcd_with_its_own_pki(existing_etcd: list[dict[str, Any]]) -> None:
    """deploy: false with endpoints and tlsSecret: no etcd of ours, the Secret mounted into
    the controller and every node and passed as --catalog-tls-dir."""
    assert not [d for d in existing_etcd if d["metadata"]["name"] == "ferry-etcd"]
    pods = {
        d["kind"]: d["spec"]["template"]["spec"]
        for d in existing_etcd
        if d["kind"] in ("Deployment", "DaemonSet")
    }
    assert set(pods) == {"Deployment", "DaemonSet"}
    for pod in pods.values():
        ferry = next(c for c in pod["containers"] if c["name"] == "ferry")
        args = build_parser().parse_args([re.sub(r"\$\((\w+)\)", "x", a) for a in ferry["args"]])
        assert args.catalog == "etcds://etcd-0.db.example:2379,10.0.0.5:2379"
        assert parse_catalog_url(args.catalog).etcd_endpoints == (
            ("etcd-0.db.example", 2379),
            ("10.0.0.5", 2379),
        )
        assert args.catalog_tls_dir == Path("/catalog-tls")
        assert args.tls_dir == Path("/tls")  # the agent API keeps the cluster CA
        mounts = {m["name"]: m for m in ferry["volumeMounts"]}
        assert mounts["catalog-tls"] == {
            "name": "catalog-tls", "mountPath": "/catalog-tls", "readOnly": True,
        }  # fmt: skip
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["catalog-tls"]["secret"]["secretName"] == "etcd-client"


@needs_helm
def test_a_tls_secret_next_to_the_charts_own_etcd_is_refused() -> None:
    done = subprocess.run(
        [str(HELM), "template", "ferry", str(CHART), "--set", "catalog.etcd.tlsSecret=x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "catalog.etcd.tlsSecret is for an existing etcd" in done.stderr


def test_chart_uses_the_same_images(rendered: list[dict[str, Any]]) -> None:
    def images(docs: list[dict[str, Any]]) -> set[str]:
        return {
            c["image"]
            for d in docs
            if d["kind"] in ("Deployment", "DaemonSet")
            for c in d["spec"]["template"]["spec"]["containers"]
        }

    assert images(rendered) == images(load(PLAIN))


def test_storage_class_parameters_are_ones_ferry_accepts(rendered: list[dict[str, Any]]) -> None:
    classes = [d for d in [*load(PLAIN), *rendered] if d["kind"] == "StorageClass"]
    assert classes
    for sc in classes:
        assert sc["provisioner"] == "ferry.csi.dev"
        parse_parameters(sc.get("parameters", {}))


def _pod(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
    pod: dict[str, Any] = found["spec"]["template"]["spec"]
    return pod


def test_node_pods_hold_no_ca_key(rendered: list[dict[str, Any]]) -> None:
    """Only the controller and the etcd members mount the CA's key: a node that is
    compromised cannot mint a controller certificate; it enrolls instead."""
    for docs in (rendered, load(PLAIN)):
        secrets = {
            kind: {
                v["secret"]["secretName"]
                for v in _pod(docs, kind, name)["volumes"]
                if "secret" in v
            }
            for kind, name in (
                ("DaemonSet", "ferry-node"),
                ("Deployment", "ferry-controller"),
                ("StatefulSet", "ferry-etcd"),
            )
        }
        assert "ferry-ca" not in secrets["DaemonSet"]
        assert "ferry-enrollment" in secrets["DaemonSet"]
        assert "ferry-ca" in secrets["Deployment"] and "ferry-ca" in secrets["StatefulSet"]
        node = _pod(docs, "DaemonSet", "ferry-node")
        assert {"configMap": {"name": "ferry-ca-cert"}, "name": "ca-cert"} in node["volumes"]
        (enroll,) = node["initContainers"]
        assert enroll["args"][:2] == ["ca", "enroll"]
        controller = next(
            c
            for c in _pod(docs, "Deployment", "ferry-controller")["containers"]
            if c["name"] == "ferry"
        )
        args = controller["args"]
        assert "--enroll-listen=tcp://0.0.0.0:7401" in args and "--ca-dir=/ca" in args
        server = next(a for a in enroll["args"] if a.startswith("--server="))
        service = next(
            d
            for d in docs
            if d["kind"] == "Service" and d["metadata"]["name"] == "ferry-controller"
        )
        assert server == "--server=tcp://ferry-controller.ferry-system.svc:7401"
        assert service["spec"]["ports"][0]["port"] == 7401


def test_the_chart_makes_the_ca_certificate_and_a_random_token(
    rendered: list[dict[str, Any]],
) -> None:
    ca = next(d for d in rendered if d["kind"] == "Secret" and d["metadata"]["name"] == "ferry-ca")
    cert = next(d for d in rendered if d["kind"] == "ConfigMap")
    assert cert["metadata"]["name"] == "ferry-ca-cert" and set(cert["data"]) == {"ca.crt"}
    assert cert["data"]["ca.crt"] == base64.b64decode(ca["data"]["ca.crt"]).decode()
    token = next(
        d for d in rendered if d["kind"] == "Secret" and d["metadata"]["name"] == "ferry-enrollment"
    )
    assert len(base64.b64decode(token["data"]["token"])) == 48
    again = render()
    other = next(d for d in again if d["metadata"]["name"] == "ferry-enrollment")
    assert other["data"]["token"] != token["data"]["token"]  # random per install


def test_the_chart_made_cluster_ca_issues_every_identity(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The CA Helm generates is one Ferry's own PKI loads and signs with."""
    secret = next(d for d in rendered if d["kind"] == "Secret")
    assert secret["metadata"]["name"] == "ferry-ca"
    for name, value in secret["data"].items():
        (tmp_path / name).write_bytes(base64.b64decode(value))
    ca = CertificateAuthority.load(tmp_path)
    for identity in ("controller", "catalog", "node/worker-1"):
        out = tmp_path / identity.replace("/", "-")
        ca.issue(Identity.parse(identity), ips=("10.1.2.3",)).write(out)
        assert TlsBundle.load(out).identity == Identity.parse(identity)


def test_snapshots_in_the_chart(rendered: list[dict[str, Any]]) -> None:
    """The csi-snapshotter sidecar shares the controller's socket; nodes serve chunks;
    the classes (which need the cluster's snapshot CRDs) render only when asked for."""
    controller = next(d for d in rendered if d["kind"] == "Deployment")
    sidecars = {c["name"]: c for c in controller["spec"]["template"]["spec"]["containers"]}
    assert "--csi-address=/csi/csi.sock" in sidecars["csi-snapshotter"]["args"]
    assert not [d for d in rendered if d["kind"].startswith("Volume")]
    node = next(d for d in rendered if d["kind"] == "DaemonSet")
    ferry = node["spec"]["template"]["spec"]["containers"][0]
    assert "--chunk-endpoint=tcp://$(POD_IP):9811" in ferry["args"]
    classes = render(
        "--set", "snapshots.volumeSnapshotClass.create=true",
        "--set", "snapshots.volumeGroupSnapshotClass.create=true",
    )  # fmt: skip
    made = {d["kind"]: d for d in classes if d["kind"].startswith("Volume")}
    assert made["VolumeSnapshotClass"]["apiVersion"] == "snapshot.storage.k8s.io/v1"
    assert made["VolumeGroupSnapshotClass"]["apiVersion"] == "groupsnapshot.storage.k8s.io/v1beta1"
    for kind in made.values():
        assert (kind["driver"], kind["deletionPolicy"]) == ("ferry.csi.dev", "Delete")
