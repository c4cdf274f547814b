"""`kapi gateway`: the OIP front door."""

from __future__ import annotations

import argparse
import asyncio

from kapi.core.logging import configure_logging


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gateway = commands.add_parser(
        "gateway",
        help="route OIP requests across kapi nodes and Triton servers",
        description="One OIP front door (gRPC, as Triton's) over kapi nodes and Triton servers.",
    )
    gateway.add_argument(
        "--backend",
        action="append",
        metavar="HOST:PORT",
        help="a backend's OIP gRPC address; repeatable",
    )
    gateway.add_argument("--config", help="YAML: backends and routes (reloaded on SIGHUP)")
    gateway.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    gateway.add_argument("--grpc-port", type=int, help="OIP gRPC port (default 8001)")
    gateway.add_argument("--http-port", type=int, help="admin and health HTTP port (default 8000)")
    gateway.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002)")
    gateway.add_argument(
        "--channels-per-backend", type=int, help="connections per backend (default 2)"
    )
    gateway.add_argument("--health-interval-s", type=float, help="seconds between health checks")
    gateway.add_argument(
        "--health-check", choices=["server-ready", "grpc-health"], help="how backends are checked"
    )
    gateway.add_argument("--admin-token", help="bearer token the admin API's writes need")
    gateway.add_argument("--kubernetes-selector", help="watch EndpointSlices with these labels")
    gateway.add_argument("--kubernetes-namespace", help="their namespace (default 'default')")
    gateway.add_argument("--kubeconfig", help="a kubeconfig (default: in-cluster)")
    gateway.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    gateway.add_argument("--log-format", choices=["text", "json"])
    gateway.set_defaults(handler=_gateway)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_large_buffers() -> None:
    """Serve large messages from the heap instead of a fresh mmap each: by default glibc maps
    and unmaps every buffer over its (adaptive) threshold, and a 600 KB tensor pays page
    faults on both sides of the gateway. 32 MiB is glibc's largest mmap threshold."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):  # glibc; musl has none
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)


def _gateway(args: argparse.Namespace) -> None:
    from kapi.gateway.server import GatewayServer
    from kapi.gateway.settings import GatewaySettings

    settings = GatewaySettings.from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    keep_large_buffers()
    server = GatewayServer(settings)
    try:
        import uvloop
    except ImportError:  # the gateway's extra brings it; without it, asyncio's own loop
        asyncio.run(server.run())
    else:
        uvloop.run(server.run())
