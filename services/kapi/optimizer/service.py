"""`kapi optimizer serve`: the optimizer's job service, the trainer's job service
(kapi.trainer.service) running the optimizer's kinds of job: `optimize` and `verify`.

Its settings are `KAPI_OPTIMIZER_*` (kapi.trainer.service.settings.OptimizerServiceSettings),
its flags the trainer's. A job's model is a path in the service's datasets or jobs folders;
give it the trainer's data folder to optimize the bundles the trainer's jobs wrote.
"""

from __future__ import annotations

from typing import Any

OPTIMIZER_SETTINGS = "kapi.trainer.service.settings:OptimizerServiceSettings"


def add_commands(commands: Any) -> None:
    from kapi.trainer.service.cli import add_service

    add_service(commands, "optimizer", OPTIMIZER_SETTINGS)
