"""Structured logging: one JSON object per line, with request context.

The CSI layer sets the request id, RPC name and volume id in context
variables when a call arrives; every log line written while serving it
carries them, whichever module logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
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
