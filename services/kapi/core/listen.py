"""Listening sockets and HTTP servers for the services that own their signals (node,
gateway): every port is bound before anything starts, so a port in use is one clear error."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from kapi.core.errors import KapiError


class StartupError(KapiError):
    """A server cannot start as configured: a port in use, a bad configuration."""


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int, purpose: str) -> socket.socket:
    """A listening TCP socket of our own for uvicorn; StartupError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on sockets made as TCP
    # (with proto 0 each small REST response waited ~40 ms for a delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen for {purpose} on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def http_server(app: ASGIApp) -> uvicorn.Server:
    """uvicorn (httptools) for `app`, to serve on sockets from `bind`."""
    config = uvicorn.Config(app, log_level="warning", lifespan="off", http="httptools")
    return _QuietServer(config)
