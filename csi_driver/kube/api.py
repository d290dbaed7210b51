"""The Kubernetes API, for what only it knows: Events on PVCs, Node readiness.

The only module of Ferry that imports the ``kubernetes`` client. It reaches
the API server in-cluster (the pod's service account) or through a
kubeconfig (``KUBECONFIG``), never otherwise; each call carries a short
timeout, because what calls it (a move, a failover) must not wait on the
API server. Invariants:

- An Event goes on the volume's PersistentVolumeClaim (found through the
  PersistentVolume named like the volume, its ``claimRef``), with the PV as
  the related object; on the PV itself (namespace ``default``, as for any
  cluster-scoped object) when it is bound to no claim. A volume whose PV
  does not exist (yet, or any more) gets a log line instead.
- Emitting never raises and never waits on the API server: the Event is
  logged at once and posted by a worker thread; a failed post is logged.
- Nothing here decides anything; the decisions are the pure functions of
  :mod:`.events` and :mod:`.nodes`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from csi_driver import DRIVER_NAME
from csi_driver.core.errors import Unavailable
from csi_driver.kube.events import EventSink, LoggingSink, VolumeEvent, VolumeRef
from csi_driver.kube.nodes import NODE_DELETED, NodeFacts, NodeState, Taint, readiness

log = logging.getLogger(__name__)

#: Seconds any one call to the API server may take.
CALL_TIMEOUT_S = 5.0
REPORTING_CONTROLLER = f"{DRIVER_NAME}/controller"
#: Where Events about cluster-scoped objects (a PV without a claim) go.
CLUSTER_EVENTS_NAMESPACE = "default"


@dataclass(frozen=True)
class ObjectRef:
    """The object an Event is about."""

    kind: str
    name: str
    namespace: str = ""
    uid: str = ""
    api_version: str = "v1"

    def as_dict(self) -> dict[str, str]:
        out = {"apiVersion": self.api_version, "kind": self.kind, "name": self.name}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.uid:
            out["uid"] = self.uid
        return out


def cluster_configured() -> bool:
    """True in a pod with a service account, or when ``KUBECONFIG`` names a file."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) or bool(os.environ.get("KUBECONFIG"))


def connect(kubeconfig: str | None = None) -> client.ApiClient:
    """An API client: ``kubeconfig`` if given, in-cluster in a pod, else ``KUBECONFIG``."""
    configuration = client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration
            )
    except (config.ConfigException, OSError) as exc:
        raise Unavailable(
            f"cannot reach the Kubernetes API: {exc}; run in a pod with a service account "
            "or set KUBECONFIG"
        ) from exc
    # One retry, not urllib3's three: the callers (reconcilers reporting a
    # move, a failover) have their own next pass, and must not stall on a
    # dead API server for CALL_TIMEOUT_S times four.
    configuration.retries = 1
    return client.ApiClient(configuration)


def _timestamp(value: dt.datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


def node_facts(node: Any) -> NodeFacts:
    """A ``V1Node`` read as :class:`NodeFacts`."""
    conditions = (node.status.conditions if node.status else None) or []
    ready = next((c for c in conditions if c.type == "Ready"), None)
    spec = node.spec
    taints = (spec.taints if spec else None) or []
    return NodeFacts(
        name=node.metadata.name,
        ready=ready.status if ready is not None else "",
        ready_since=_timestamp(ready.last_transition_time) if ready is not None else 0.0,
        unschedulable=bool(spec.unschedulable) if spec else False,
        taints=tuple(
            Taint(t.key, t.value or "", t.effect or "", _timestamp(t.time_added)) for t in taints
        ),
    )


class KubeApi:
    """The few calls Ferry makes to the Kubernetes API."""

    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)
        self._events = client.EventsV1Api(api)

    def node(self, name: str) -> NodeFacts | None:
        """The Node called ``name``, or None when Kubernetes has no such Node."""
        try:
            return node_facts(self._core.read_node(name, _request_timeout=CALL_TIMEOUT_S))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def nodes(self) -> list[NodeFacts]:
        listed = self._core.list_node(_request_timeout=CALL_TIMEOUT_S)
        return [node_facts(n) for n in listed.items]

    def regarding(self, volume: VolumeRef) -> tuple[ObjectRef, ObjectRef] | None:
        """(the object an Event about ``volume`` goes on, its PV), or None without a PV."""
        try:
            pv: Any = self._core.read_persistent_volume(
                volume.name, _request_timeout=CALL_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        pv_ref = ObjectRef("PersistentVolume", volume.name, uid=pv.metadata.uid or "")
        claim = pv.spec.claim_ref if pv.spec is not None else None
        if claim is None or not claim.name:
            return pv_ref, pv_ref
        return ObjectRef(
            "PersistentVolumeClaim", claim.name, claim.namespace or "", claim.uid or ""
        ), pv_ref

    def post_event(
        self, regarding: ObjectRef, related: ObjectRef, event: VolumeEvent, instance: str
    ) -> str:
        """Create an events.k8s.io/v1 Event; return its name."""
        namespace = regarding.namespace or CLUSTER_EVENTS_NAMESPACE
        now = dt.datetime.now(dt.UTC)
        body: dict[str, Any] = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": f"{regarding.name}.", "namespace": namespace},
            # MicroTime: Kubernetes wants the microseconds written out.
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": instance[:128],
            "action": event.reason.action,
            "reason": event.reason.reason,
            "note": event.note,
            "type": event.event_type.value,
            "regarding": regarding.as_dict(),
        }
        if related != regarding:
            body["related"] = related.as_dict()
        # A plain dict: the client's model would write eventTime without the
        # microseconds when they happen to be 0, which the API server refuses.
        created: Any = self._events.create_namespaced_event(
            namespace,
            body,  # type: ignore[arg-type]
            _request_timeout=CALL_TIMEOUT_S,
        )
        return str(created.metadata.name)


class KubeSink:
    """An :class:`EventSink` posting Events on the volume's PVC, off the caller's thread.

    ``emit`` logs the Event and queues the post; one worker thread posts in
    order, so a slow or unreachable API server never stalls a move or a
    failover. When ``queue_size`` posts are waiting, further Events are
    logged only (the log is the record anyway).
    """

    def __init__(self, api: KubeApi, instance: str, queue_size: int = 1000) -> None:
        self._api = api
        self._instance = instance
        self._fallback = LoggingSink()
        self._queue: queue.Queue[tuple[VolumeRef, VolumeEvent] | None] = queue.Queue(queue_size)
        self._worker = threading.Thread(target=self._post_all, name="kube-events", daemon=True)
        self._worker.start()

    def emit(self, volume: VolumeRef, event: VolumeEvent) -> None:
        # The log line is written whatever happens to the post: the log is
        # the record that outlives Kubernetes' one-hour Event retention.
        self._fallback.emit(volume, event)
        try:
            self._queue.put_nowait((volume, event))
        except queue.Full:
            log.warning(
                "too many Kubernetes Events waiting to be posted: event logged only",
                extra={"volume": volume.volume_id, "reason": event.reason.reason},
            )

    def close(self, timeout_s: float = CALL_TIMEOUT_S) -> bool:
        """Post what is queued (within ``timeout_s``) and stop; True if all was posted."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return False
        self._worker.join(timeout_s)
        return not self._worker.is_alive()

    def _post_all(self) -> None:
        while (item := self._queue.get()) is not None:
            self._post(*item)

    def _post(self, volume: VolumeRef, event: VolumeEvent) -> None:
        try:
            target = self._api.regarding(volume)
            if target is None:
                log.info(
                    "no PersistentVolume for the volume: event logged only",
                    extra={"volume": volume.volume_id, "volume_name": volume.name},
                )
                return
            self._api.post_event(target[0], target[1], event, self._instance)
        except (ApiException, HTTPError, OSError) as exc:
            log.warning(
                "could not post a Kubernetes Event",
                extra={
                    "volume": volume.volume_id,
                    "reason": event.reason.reason,
                    "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                },
            )


class KubeNodes:
    """Node readiness from the API server, for failover and placement.

    ``state(name)`` answers from a cache at most ``ttl_s`` old, so the
    leader's reconcilers (one call per volume and pass) cost the API server
    one read per node per ``ttl_s``. None when the API cannot be read
    (logged): the caller then decides on Ferry's heartbeat alone. A Node
    Kubernetes does not have reads as :data:`~csi_driver.kube.nodes.NODE_DELETED`.
    """

    def __init__(self, api: KubeApi, ttl_s: float = 5.0) -> None:
        self._api = api
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, NodeState | None]] = {}

    def state(self, name: str) -> NodeState | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        try:
            facts = self._api.node(name)
            found = NODE_DELETED if facts is None else readiness(facts)
        except (ApiException, HTTPError, OSError) as exc:
            log.warning(
                "could not read a Node from Kubernetes: deciding on Ferry's heartbeat",
                extra={"node": name, "error": str(exc).splitlines()[0] if str(exc) else ""},
            )
            found = None
        with self._lock:
            self._cache[name] = (now, found)
        return found


def node_states() -> KubeNodes | None:
    """Node readiness from the cluster when one is configured (in a pod, or KUBECONFIG)."""
    if not cluster_configured():
        return None
    try:
        return KubeNodes(KubeApi(connect()))
    except Unavailable as exc:
        log.warning("Kubernetes Node readiness not used: %s", exc.message)
        return None


def event_sink(instance: str | None = None) -> EventSink:
    """Events to the cluster when one is configured (in a pod, or KUBECONFIG), else the log."""
    if not cluster_configured():
        return LoggingSink()
    try:
        api = KubeApi(connect())
    except Unavailable as exc:
        log.warning("Kubernetes Events disabled: %s", exc.message)
        return LoggingSink()
    return KubeSink(api, instance or os.environ.get("POD_NAME") or socket.gethostname())
