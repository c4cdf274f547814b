"""The `kapi` command."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from kapi.core.logging import configure_logging


def _node(args: argparse.Namespace) -> None:
    from kapi.node.server import NodeServer
    from kapi.node.settings import NodeSettings

    overrides: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if key not in {"command", "handler"} and value is not None
    }
    settings = NodeSettings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(NodeServer(settings).run())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kapi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    node = commands.add_parser(
        "node", help="serve a Triton-layout model repository over the Open Inference Protocol"
    )
    node.add_argument("--model-repository", help="directory in Triton's model-repository layout")
    node.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    node.add_argument("--grpc-port", type=int, help="OIP gRPC port (default 8001)")
    node.add_argument("--http-port", type=int, help="health HTTP port (default 8000)")
    node.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002)")
    node.add_argument("--model-control-mode", choices=["none", "explicit"])
    node.add_argument(
        "--load-model",
        dest="load_models",
        action="append",
        help="with explicit model control: a model to load at start ('*': all); repeatable",
    )
    node.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    node.add_argument("--log-format", choices=["text", "json"])
    node.set_defaults(handler=_node)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
