"""`kapi trainer serve`: the trainer's job service; `add_service` makes any job service's
`kapi NAME serve` (the optimizer's is `kapi optimizer serve`)."""

from __future__ import annotations

import argparse
import functools
import importlib
from typing import Any

TRAINER_SETTINGS = "kapi.trainer.service.settings:TrainerServiceSettings"


def add_commands(commands: Any) -> None:
    add_service(commands, "trainer", TRAINER_SETTINGS)


def add_service(commands: Any, name: str, settings: str) -> None:
    """`kapi NAME serve`, the job service whose settings class is `settings` (MODULE:CLASS,
    imported only when it runs, so that the other commands start fast)."""
    service = commands.add_parser(name, help=f"the {name}'s job service")
    actions = service.add_subparsers(dest="action", required=True)
    serve = actions.add_parser("serve", help="serve the job API (REST; OpenAPI at /docs)")
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="default 8080")
    serve.add_argument("--data", help="job records, logs and outputs (DATA/jobs/ID)")
    serve.add_argument("--root", help="the datasets' root jobs use (default DATA/datasets)")
    serve.add_argument("--executor", choices=["local", "kubernetes"], help="default local")
    serve.add_argument("--concurrency", type=int, help="local: jobs that run at once (1)")
    serve.add_argument(
        "--cancel-grace", dest="cancel_grace_s", type=float, help="local: SIGTERM to SIGKILL, s"
    )
    serve.add_argument("--namespace", help="kubernetes: the Jobs' namespace")
    serve.add_argument("--image", help="kubernetes: the image jobs run (its `kapi` command)")
    serve.add_argument("--pvc", help="kubernetes: the volume claim mounted at DATA")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.set_defaults(handler=functools.partial(_serve, settings))


def _serve(settings_class: str, args: argparse.Namespace) -> None:
    from kapi.core.logging import configure_logging
    from kapi.trainer.service.server import serve
    from kapi.trainer.service.settings import JobServiceSettings

    module, _, name = settings_class.partition(":")
    loaded: type[JobServiceSettings] = getattr(importlib.import_module(module), name)
    settings = loaded.from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    serve(settings)
