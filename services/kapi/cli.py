"""The `kapi` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import NoReturn

import pydantic
from pydantic_settings import SettingsError

from kapi.core.errors import KapiError
from kapi.core.logging import configure_logging

# Exit status of a node that cannot start as configured, as for a usage error.
EXIT_CONFIG = 2


def _node(args: argparse.Namespace) -> None:
    from kapi.node.server import NodeServer
    from kapi.node.settings import NodeSettings

    try:
        settings = NodeSettings.from_args(args)
    except pydantic.ValidationError as exc:
        _fail(f"invalid settings: {_problems(exc)}")
    except SettingsError as exc:  # an environment value that does not parse (a list, say)
        _fail(f"invalid settings: {exc} (a list is JSON: KAPI_NODE_LOAD_MODELS='[\"a\"]')")
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(NodeServer(settings).run())
    except KapiError as exc:  # the node could not start: one line, not a traceback
        _fail(exc.message)


def _problems(error: pydantic.ValidationError) -> str:
    """Where and what, never the value given (it may be a token)."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
    )


def _fail(message: str) -> NoReturn:
    print(f"kapi node: error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _boolean(text: str) -> bool:
    """Triton's <boolean> flags: true/false, 1/0, yes/no, on/off."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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
    node.add_argument(
        "--strict-readiness",
        type=_boolean,
        metavar="BOOL",
        help="ready only while every model asked for is loaded (default true, as Triton)",
    )
    node.add_argument(
        "--reuse-grpc-port",
        type=_boolean,
        metavar="BOOL",
        help="share the gRPC port with other servers (SO_REUSEPORT; default false)",
    )
    node.add_argument("--repository", help="follow the model repository at this URL")
    node.add_argument(
        "--serve",
        action="append",
        help="with --repository: MODEL@ALIAS[,MODEL@ALIAS...] to serve; repeatable",
    )
    node.add_argument("--cache-dir", help="with --repository: where downloads are kept")
    node.add_argument("--repository-token", help="with --repository: a read token")
    node.add_argument("--register-with", help="a gateway's admin URL to register with (edge)")
    node.add_argument("--advertise-address", help="with --register-with: HOST:PORT to dial")
    node.add_argument("--gateway-token", help="with --register-with: its admin token")
    node.add_argument(
        "--registration-lease-s", type=float, help="with --register-with: the lease (15)"
    )
    node.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    node.add_argument("--log-format", choices=["text", "json"])
    node.set_defaults(handler=_node)
    from kapi.gateway.cli import add_commands as add_gateway_commands
    from kapi.optimizer.cli import add_commands as add_optimizer_commands
    from kapi.repository.cli import add_commands
    from kapi.trainer.cli import add_commands as add_data_commands
    from kapi.trainer.service.cli import add_commands as add_trainer_commands
    from kapi.verifier.cli import add_commands as add_verifier_commands

    add_gateway_commands(commands)
    add_commands(commands)
    add_data_commands(commands)
    add_trainer_commands(commands)
    add_optimizer_commands(commands)
    add_verifier_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "node":
        args.handler(args)
        return
    try:
        args.handler(args)
    except KapiError as exc:  # one line, not a traceback
        print(f"kapi {args.command}: error: {exc.message}", file=sys.stderr)
        sys.exit(1)
    except pydantic.ValidationError as exc:
        print(f"kapi {args.command}: error: invalid settings: {_problems(exc)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


if __name__ == "__main__":
    main()
