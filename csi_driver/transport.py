"""gRPC endpoints: parsing ``unix://`` and ``tcp://`` addresses and serving on them."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi_driver.core.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

#: Registers one servicer on a server, e.g. ``lambda s: add_XServicer_to_server(x, s)``.
Registration = Callable[[grpc.Server], None]


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "unix" or "tcp"
    address: str  # a socket path, or host:port

    def __str__(self) -> str:
        return f"unix://{self.address}" if self.scheme == "unix" else f"tcp://{self.address}"


def parse_endpoint(text: str) -> Endpoint:
    """``unix:///run/csi.sock``, ``unix:/run/csi.sock``, ``tcp://h:p`` or ``h:p``."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
    elif text.startswith("unix:"):
        path = text[len("unix:") :]
    else:
        address = text[len("tcp://") :] if text.startswith("tcp://") else text
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidArgument(f"endpoint {text!r} is neither unix:///path nor tcp://host:port")
        return Endpoint("tcp", f"{host or '0.0.0.0'}:{port}")
    if not path.startswith("/"):
        raise InvalidArgument(f"unix endpoint {text!r} must name an absolute socket path")
    return Endpoint("unix", os.path.normpath(path))


def channel_target(text: str) -> str:
    """The gRPC channel target for an endpoint string."""
    endpoint = parse_endpoint(text)
    return f"unix://{endpoint.address}" if endpoint.scheme == "unix" else endpoint.address


def _prepare_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FailedPrecondition(
            f"{path} exists and is not a socket; refusing to replace it: remove it or "
            "choose another endpoint"
        )
    path.unlink()  # a stale socket from a previous run


def start_server(
    endpoint: str, registrations: list[Registration], *, max_workers: int = 32
) -> tuple[grpc.Server, Endpoint]:
    """Start a gRPC server with ``registrations`` on ``endpoint``; return it running."""
    parsed = parse_endpoint(endpoint)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    for register in registrations:
        register(server)
    if parsed.scheme == "unix":
        _prepare_socket(Path(parsed.address))
        server.add_insecure_port(f"unix://{parsed.address}")
    else:
        port = server.add_insecure_port(parsed.address)
        if port == 0:
            raise FailedPrecondition(f"cannot listen on {parsed.address}; is it in use?")
        parsed = Endpoint("tcp", f"{parsed.address.rpartition(':')[0]}:{port}")
    server.start()
    if parsed.scheme == "unix":
        os.chmod(parsed.address, 0o660)
    log.info("serving", extra={"endpoint": str(parsed)})
    return server, parsed
