"""The floor of a Python gRPC proxy: every OIP call forwarded as bytes to one backend, with
nothing else (no routing, metrics, retries or health), on the gateway's own stack (grpc.aio
on uvloop, glibc's mmap threshold raised). Run by bench/gateway.py as the `python-floor`
contender, beside `kapi gateway`, to show what its features cost over the stack itself.

    python floor.py --backend HOST:PORT --grpc-port N --http-port N
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
import uvloop
from kapi.gateway.cli import keep_large_buffers

SERVICE = "inference.GRPCInferenceService"
LIMIT = 64 * 1024 * 1024
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def serve(backend: str, grpc_port: int, http_port: int) -> None:
    options = [
        ("grpc.max_receive_message_length", LIMIT),
        ("grpc.max_send_message_length", LIMIT),
    ]
    channels = [
        grpc.aio.insecure_channel(
            backend, options=[*options, ("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(2)
    ]
    turn = [0]

    def forward(method: str) -> Any:
        calls = [channel.unary_unary(f"/{SERVICE}/{method}") for channel in channels]

        async def handler(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            turn[0] += 1
            try:
                answer: bytes = await calls[turn[0] % len(calls)](
                    data, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            return answer

        return grpc.unary_unary_rpc_method_handler(handler)

    methods = ("ModelInfer", "ServerLive", "ServerReady", "ModelReady", "ModelMetadata")
    handlers = {method: forward(method) for method in methods}
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()

    async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        writer.close()

    http = await asyncio.start_server(health, "127.0.0.1", http_port)
    async with http:
        await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    keep_large_buffers()
    uvloop.run(serve(args.backend, args.grpc_port, args.http_port))


if __name__ == "__main__":
    main()
