"""Structured logging: one JSON object per line, with request context.

The CSI layer sets the request id, RPC name and volume id in context
variables when a call arrives; every log line written while serving it
carries them, whichever module logs.

gRPC's C core writes its own lines (glog style: ``I1126 21:01:13.30 1234
file.cc:2563] text``) straight to file descriptor 2, among them the only
trace of a TLS handshake it refused. :func:`route_native_stderr` turns
those into records of the ``grpc.core`` logger, so that with JSON logs every
line on stderr is JSON. A peer that refuses this process's certificate after
a TLS 1.3 handshake does so with an alert, which gRPC reports in three lines
as "Corruption detected."; :class:`NativeLines` logs that as the refusal it
is (one warning naming the alert), and real corruption as one error.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
volume_id: contextvars.ContextVar[str] = contextvars.ContextVar("volume_id", default="")
rpc: contextvars.ContextVar[str] = contextvars.ContextVar("rpc", default="")
#: The authenticated Ferry identity of the caller (mTLS), e.g. ``controller``.
peer: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default="")

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render records as single-line JSON with the request context attached."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (
            ("request_id", request_id),
            ("rpc", rpc),
            ("volume_id", volume_id),
            ("peer", peer),
        ):
            value = var.get()
            if value:
                entry[key] = value
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-oriented rendering for terminals: context as key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            time.strftime("%H:%M:%S", time.localtime(record.created)),
            record.levelname[0],
            record.getMessage(),
        ]
        for key, var in (("req", request_id), ("vol", volume_id), ("peer", peer)):
            value = var.get()
            if value:
                parts.append(f"{key}={value}")
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                parts.append(f"{key}={value}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", fmt: str = "json") -> None:
    """Install Ferry's formatter on the root logger (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@contextmanager
def context(
    *, request: str = "", method: str = "", volume: str = "", caller: str = ""
) -> Iterator[None]:
    """Bind request context for the duration of a block."""
    tokens = []
    for var, value in ((request_id, request), (rpc, method), (volume_id, volume), (peer, caller)):
        if value:
            tokens.append((var, var.set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


#: A glog line as gRPC core writes it: severity, date, time, thread, source, text.
_GLOG = re.compile(r"([IWEF])\d{4} [\d:.]+ +\d+ ([\w.-]+:\d+)\] ?(.*)")
_GLOG_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
#: BoringSSL's reason, e.g. ``...:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: ...``.
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)")


def native_record(line: str) -> tuple[int, str, dict[str, str]]:
    """Level, message and fields for one line that native code wrote to stderr."""
    match = _GLOG.fullmatch(line)
    if match is None:
        return logging.WARNING, line, {}
    severity, source, text = match.groups()
    fields = {"source": source}
    if text.startswith("Handshake failed"):
        # The peer was refused (or refused us) before any RPC: gRPC says so at INFO,
        # but an unauthenticated peer is what an operator must see.
        reason = _SSL_REASON.search(text)
        fields["reason"] = reason.group(1) if reason else text
        fields["detail"] = text
        return logging.WARNING, "tls handshake failed", fields
    return _GLOG_LEVELS[severity], text, fields


#: BoringSSL's reason for an alert the peer sent (a refusal, not damaged data).
_ALERT = re.compile(r"(SSLV3|TLSV1)_ALERT_[A-Z_]+")
NativeRecord = tuple[int, str, dict[str, str]]


class NativeLines:
    """Records for the lines native code writes, read in order.

    gRPC reports a TLS record it could not read in three lines:
    ``Corruption detected.``, BoringSSL's reason, and ``Decryption error:
    TSI_DATA_CORRUPTED``. With TLS 1.3 a server refuses a client's certificate
    after the client finished its handshake, with an alert that reaches the
    client exactly this way. Those lines become one record: a warning, ``tls
    connection refused by the peer``, when the reason is an alert; an error,
    ``tls data corrupted``, otherwise.
    """

    def __init__(self) -> None:
        self._unread: str | None = None  # the source of a "Corruption detected." line
        self._refused = False

    def feed(self, line: str) -> list[NativeRecord]:
        match = _GLOG.fullmatch(line)
        text = match.group(3) if match else ""
        out: list[NativeRecord] = []
        if self._unread is not None:
            source, self._unread = self._unread, None
            reason = _SSL_REASON.search(text)
            if reason is None:
                out.append((logging.ERROR, "tls data corrupted", {"source": source}))
            else:
                fields = {"source": source, "reason": reason.group(1), "detail": text}
                if _ALERT.fullmatch(reason.group(1)):
                    self._refused = True
                    return [(logging.WARNING, "tls connection refused by the peer", fields)]
                return [(logging.ERROR, "tls data corrupted", fields)]
        if match is not None and text == "Corruption detected.":
            self._unread = match.group(2)
            return out
        if self._refused and text.startswith("Decryption error"):
            self._refused = False
            return [(logging.DEBUG, text, {"source": match.group(2) if match else ""})]
        self._refused = False
        return [*out, native_record(line)]


def _forward(lines: Any, logger: logging.Logger) -> None:
    records = NativeLines()
    for raw in lines:
        line = raw.rstrip("\n")
        if line:
            for level, message, fields in records.feed(line):
                logger.log(level, message, extra=fields)


def route_native_stderr() -> None:
    """Send what native code writes to fd 2 through logging; Python keeps the real stderr.

    Call before :func:`configure`. The real stderr moves to a duplicate
    descriptor (``sys.stderr`` writes there, so tracebacks never depend on
    the forwarding thread); fd 2 becomes a pipe read by a daemon thread.
    At exit fd 2 is restored, so late native writes cannot fill the pipe.
    """
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all (closed by a supervisor): nothing to route
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = open(real, "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    atexit.register(os.dup2, real, 2)
    lines = open(read_end, encoding="utf-8", errors="replace")  # noqa: SIM115
    threading.Thread(
        target=_forward,
        args=(lines, logging.getLogger("grpc.core")),
        name="native-stderr",
        daemon=True,
    ).start()
