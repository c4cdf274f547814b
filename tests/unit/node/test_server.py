"""The node's own listening sockets."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pydantic
import pytest
from kapi.core.listen import bind
from kapi.node.settings import NodeSettings


async def test_http_connections_send_without_waiting_for_nagle(tmp_path: Path) -> None:
    """asyncio turns Nagle's algorithm off only on sockets made as TCP (proto IPPROTO_TCP);
    on one made with proto 0, each small REST response waited ~40 ms for a delayed ACK."""
    listening = bind("127.0.0.1", 0, "HTTP")  # as the node and the gateway bind
    nodelay: list[int] = []
    connected = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = writer.get_extra_info("socket")
        nodelay.append(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        connected.set()
        writer.close()

    tcp = await asyncio.start_server(serve, sock=listening)
    try:
        _, writer = await asyncio.open_connection(*listening.getsockname())
        await asyncio.wait_for(connected.wait(), 10)
        writer.close()
        assert nodelay[0] != 0
    finally:
        tcp.close()
        await tcp.wait_closed()


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"serve": ["digits@production"]}, "serve needs repository"),
        ({"repository_token": "t" * 20}, "repository_token needs repository"),
        ({"repository": "http://127.0.0.1:1"}, "repository needs serve"),
        (
            {"repository": "http://r", "serve": ["d@p"], "model_repository": "/models"},
            "not both",
        ),
        (
            {"repository": "http://r", "serve": ["d@p"], "model_control_mode": "explicit"},
            "loads what --serve names",
        ),
    ],
)
def test_settings_that_would_go_unused_are_refused(settings: dict[str, object], words: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=words):
        NodeSettings(**settings)  # type: ignore[arg-type]
