"""Serves a :class:`CatalogStore` over ``ferry.v1.Catalog`` (run by the controller).

The service adds nothing to the store's semantics: each RPC is one store
call. Two streams carry the long-lived parts:

- ``Watch`` sends whole revisions per message (so a client that resumes from
  the last ``next_revision`` it saw has no gap and no repeat), and a
  progress message every ``progress_s`` of quiet so a client's resume point
  keeps up with the store even when its prefix is idle.
- ``Campaign`` runs the store's own election on the caller's behalf and
  holds leadership exactly as long as the stream is open: a caller that
  dies or disconnects resigns, so a standby takes over.

Over TCP the service is one of Ferry's agent servers: mutual TLS under the
cluster CA, callers admitted by :func:`admitted_callers` (see transport.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from csi_driver.core.errors import Compacted, Conflict, FerryError
from csi_driver.gen.ferry.v1 import catalog_pb2, catalog_pb2_grpc
from csi_driver.pki import Identity, Role
from csi_driver.rpc.errors import rpc, status_for
from csi_driver.store.base import (
    CatalogStore,
    Compare,
    Delete,
    Event,
    EventType,
    Op,
    Put,
    Record,
)
from csi_driver.store.base import (
    Watch as StoreWatch,
)

#: How long a leader's stream waits between checks that it still leads.
_LEADERSHIP_CHECK_S = 0.5


def _kv(record: Record) -> Any:
    return catalog_pb2.KeyValue(key=record.key, value=record.value, revision=record.revision)


def _event(event: Event) -> Any:
    return catalog_pb2.Event(
        deleted=event.type is EventType.DELETE,
        kv=catalog_pb2.KeyValue(key=event.key, value=event.value, revision=event.revision),
    )


def _op(message: Any) -> Op:
    if message.WhichOneof("kind") == "delete":
        return Delete(message.delete)
    return Put(message.put.key, message.put.value)


class CatalogServicer(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, store: CatalogStore, *, progress_s: float = 5.0) -> None:
        self._store = store
        self._progress = progress_s

    @rpc
    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
        record = self._store.get(request.key)
        if record is None:
            return catalog_pb2.GetResponse(found=False)
        return catalog_pb2.GetResponse(found=True, record=_kv(record))

    @rpc
    def Txn(self, request: Any, context: grpc.ServicerContext) -> Any:
        compares = [Compare(c.key, c.revision) for c in request.compares]
        try:
            revision = self._store.txn(compares, [_op(op) for op in request.ops])
        except Conflict as lost:
            return catalog_pb2.TxnResponse(
                succeeded=False, conflict_key=lost.key or "", conflict_message=lost.message
            )
        return catalog_pb2.TxnResponse(succeeded=True, revision=revision)

    @rpc
    def Range(self, request: Any, context: grpc.ServicerContext) -> Any:
        page = self._store.range(request.prefix, request.start_after, request.limit)
        return catalog_pb2.RangeResponse(
            records=[_kv(r) for r in page.records], revision=page.revision, more=page.more
        )

    @rpc
    def Revision(self, request: Any, context: grpc.ServicerContext) -> Any:
        return catalog_pb2.RevisionResponse(revision=self._store.revision())

    @rpc
    def Compact(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._store.compact(request.revision)
        return catalog_pb2.CompactResponse()

    # Streams: the ``rpc`` wrapper cannot see errors raised while a generator
    # runs, so they map errors with the same table (status_for) themselves.

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            watch = self._store.watch(request.prefix, request.from_revision)
        except Compacted as gone:
            yield catalog_pb2.WatchResponse(
                compact_revision=gone.compact_revision, message=gone.message
            )
            return
        except FerryError as exc:
            context.abort(status_for(exc), exc.message)
        context.add_callback(watch.close)
        try:
            yield catalog_pb2.WatchResponse(next_revision=watch.next_revision)
            yield from self._batches(watch, context)
        except Compacted as gone:
            yield catalog_pb2.WatchResponse(
                compact_revision=gone.compact_revision, message=gone.message
            )
        except FerryError as exc:
            context.abort(status_for(exc), exc.message)
        finally:
            watch.close()

    def _batches(self, watch: StoreWatch, context: grpc.ServicerContext) -> Iterator[Any]:
        """Whole revisions, one message each; a progress message after quiet periods."""
        pending: Event | None = None
        while context.is_active():
            first = pending or watch.poll(self._progress)
            pending = None
            if first is None:
                if watch.closed:
                    return
                yield catalog_pb2.WatchResponse(next_revision=watch.next_revision)
                continue
            batch = [first]
            while (more := watch.poll(0)) is not None:
                if more.revision != first.revision:
                    pending = more
                    break
                batch.append(more)
            after = pending.revision if pending else watch.next_revision
            yield catalog_pb2.WatchResponse(events=[_event(e) for e in batch], next_revision=after)

    def Campaign(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            election = self._store.election(request.name, request.candidate)
        except FerryError as exc:
            context.abort(status_for(exc), exc.message)
        # The caller's cancel or disconnect resigns (and ends a pending campaign).
        context.add_callback(election.resign)
        try:
            if not election.campaign():
                return
            fence = election.fence()
            yield catalog_pb2.CampaignResponse(leader_key=fence.key, fence_revision=fence.revision)
            while context.is_active() and not election.wait_lost(_LEADERSHIP_CHECK_S):
                pass
        except FerryError as exc:
            context.abort(status_for(exc), exc.message)
        finally:
            election.resign()


def admitted_callers(peer: Identity) -> bool:
    """Who may use the catalog service over mTLS: the controller and every node."""
    return peer.role in (Role.CONTROLLER, Role.NODE)


def register(store: CatalogStore, *, progress_s: float = 5.0) -> Any:
    """A start_server registration serving ``store`` as ``ferry.v1.Catalog``."""
    servicer = CatalogServicer(store, progress_s=progress_s)
    return lambda server: catalog_pb2_grpc.add_CatalogServicer_to_server(servicer, server)
