"""Where domain errors become gRPC statuses: the only place that aborts an RPC.

Every servicer method is wrapped by :func:`rpc`, which binds the request
context for logging and the call's deadline for the host commands it runs
(``csi_driver.core.deadline``), times the call, checks the request's declared
required fields before the handler runs (``csi_driver.rpc.validate``), maps a
:class:`FerryError` to its status code, and turns anything unexpected into
INTERNAL with the stack logged (never a crash of the server, never a silent
hang).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar, overload

import grpc

from csi_driver import log as ferry_log
from csi_driver.core import deadline, errors
from csi_driver.metrics import RPC_REQUESTS, RPC_SECONDS
from csi_driver.rpc.validate import Required

logger = logging.getLogger(__name__)

#: Most specific first: the first class that matches decides the code.
CODES: tuple[tuple[type[errors.FerryError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
)


def status_for(error: errors.FerryError) -> grpc.StatusCode:
    for kind, code in CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, error: errors.FerryError) -> NoReturn:
    """End the call with ``error``'s status code and message."""
    context.abort(status_for(error), error.message)


Method = TypeVar("Method", bound=Callable[..., Any])


class RunningCalls:
    """How many calls are being served right now, across every servicer.

    gRPC considers a call finished once it is cancelled, while its thread may
    still be at work; a stop asks this instead before closing what calls use.
    """

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @contextmanager
    def one(self) -> Iterator[None]:
        with self._changed:
            self._count += 1
        try:
            yield
        finally:
            with self._changed:
                self._count -= 1
                self._changed.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is running; False if some still are after ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout=timeout_s)


RUNNING = RunningCalls()


@overload
def rpc(method: Method) -> Method: ...


@overload
def rpc(*, required: Sequence[str]) -> Callable[[Method], Method]: ...


def rpc(
    method: Method | None = None, *, required: Sequence[str] = ()
) -> Method | Callable[[Method], Method]:
    """Wrap a servicer method: context, required fields, timing, metrics, error mapping.

    ``@rpc`` alone declares that the request has no required field;
    ``@rpc(required=("volume_id", ...))`` names the ones it has, checked in
    that order before the method body runs. The declaration stays readable
    on the wrapper as ``.required``.
    """
    declared = Required(tuple(required))
    if method is None:
        return lambda inner: _wrap(inner, declared)
    return _wrap(method, declared)


def _wrap(method: Method, required: Required) -> Method:
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        request_id = uuid.uuid4().hex[:12]
        volume = getattr(request, "volume_id", "") or getattr(request, "name", "")
        started = time.monotonic()
        code = grpc.StatusCode.OK
        with (
            RUNNING.one(),
            ferry_log.context(request=request_id, method=name, volume=str(volume)),
            deadline.bound(context.time_remaining()),
        ):
            try:
                required.check(request)
                return method(self, request, context)
            except errors.FerryError as exc:
                code = status_for(exc)
                level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.INFO
                logger.log(level, "rpc failed", extra={"code": code.name, "error": exc.message})
                abort(context, exc)
            except Exception as exc:
                code = grpc.StatusCode.INTERNAL
                logger.exception("rpc crashed")
                context.abort(code, f"internal error in {name}: {exc}; see the Ferry logs")
            finally:
                elapsed = time.monotonic() - started
                RPC_REQUESTS.labels(name, code.name).inc()
                RPC_SECONDS.labels(name).observe(elapsed)
                if code is grpc.StatusCode.OK:
                    logger.debug("rpc ok", extra={"seconds": round(elapsed, 4)})

    wrapper.required = required  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
