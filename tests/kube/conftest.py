"""A Kubernetes API to test against, where KUBECONFIG reaches one; skipped otherwise.

No API server can run on Ferry's CI machines, and Ferry never tests its
Kubernetes calls against an imitation of one: these tests run where
``KUBECONFIG`` (or a pod's service account) reaches a real cluster, and
skip, saying so, everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from csi_driver.kube.api import CALL_TIMEOUT_S, cluster_configured, connect


@pytest.fixture(scope="session")
def kube_client() -> Iterator[Any]:
    if not cluster_configured():
        pytest.skip("needs a Kubernetes cluster: KUBECONFIG is not set and this is not a pod")
    try:
        api = connect()
        client.VersionApi(api).get_code(_request_timeout=CALL_TIMEOUT_S)
    except Exception as exc:  # any failure to reach it (Unavailable, HTTP, TLS) is a skip
        pytest.skip(f"KUBECONFIG does not reach a Kubernetes cluster: {exc}")
    try:
        yield api
    finally:
        api.close()
