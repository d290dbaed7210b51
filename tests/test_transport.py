from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi_driver.core.errors import FailedPrecondition, InvalidArgument
from csi_driver.csi.identity import IdentityServicer
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.transport import Endpoint, channel_target, parse_endpoint, start_server


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:///run/ferry/csi.sock", Endpoint("unix", "/run/ferry/csi.sock")),
        ("unix:/run/x//y.sock", Endpoint("unix", "/run/x/y.sock")),
        ("tcp://127.0.0.1:9000", Endpoint("tcp", "127.0.0.1:9000")),
        (":9000", Endpoint("tcp", "0.0.0.0:9000")),
    ],
)
def test_endpoints_parse(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["unix://relative.sock", "tcp://host", "nonsense", "tcp://h:x"])
def test_bad_endpoints_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_endpoint(text)


def _identity(server: grpc.Server) -> None:
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer([], controller=False), server)


def test_serves_on_unix_socket_replacing_a_stale_one(tmp_path: Path) -> None:
    endpoint = f"unix://{tmp_path}/sub/csi.sock"
    first, _ = start_server(endpoint, [_identity])
    first.stop(0).wait()  # leaves the socket file behind, as a crash would
    server, bound = start_server(endpoint, [_identity])
    try:
        assert (tmp_path / "sub" / "csi.sock").stat().st_mode & 0o777 == 0o660
        with grpc.insecure_channel(channel_target(str(bound))) as channel:
            reply = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        assert reply.name == "ferry.csi.dev"
    finally:
        server.stop(0)


def test_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    precious = tmp_path / "csi.sock"
    precious.write_text("not a socket")
    with pytest.raises(FailedPrecondition, match="not a socket"):
        start_server(f"unix://{precious}", [_identity])
    assert precious.read_text() == "not a socket"


def test_tcp_port_zero_reports_the_bound_port() -> None:
    server, bound = start_server("tcp://127.0.0.1:0", [_identity])
    try:
        assert bound.scheme == "tcp" and not bound.address.endswith(":0")
    finally:
        server.stop(0)
