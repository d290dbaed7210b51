"""End-to-end tests against a real Kubernetes cluster with Ferry installed.

They run only where ``KUBECONFIG`` points at a reachable cluster (for example
a kind or k3s node after ``helm install ferry charts/ferry``) and skip with
that reason everywhere else. Run them with ``python3 -m pytest e2e``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

SKIP_REASON = "KUBECONFIG does not point at a reachable Kubernetes cluster with Ferry installed"


def _api() -> Any:
    if not os.environ.get("KUBECONFIG"):
        pytest.skip(SKIP_REASON)
    from kubernetes import client, config

    try:
        config.load_kube_config()
        client.VersionApi().get_code(_request_timeout=5)
    except Exception as exc:  # any failure to reach the API server means: not here
        pytest.skip(f"{SKIP_REASON} ({exc})")
    return client


@pytest.fixture
def kube() -> Any:
    return _api()


@pytest.fixture
def namespace(kube: Any) -> Iterator[str]:
    name = f"ferry-e2e-{uuid.uuid4().hex[:6]}"
    core = kube.CoreV1Api()
    core.create_namespace(kube.V1Namespace(metadata=kube.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)
