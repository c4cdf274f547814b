"""Settings shared by every service; each service subclasses with its own env prefix."""

from __future__ import annotations

import argparse
from typing import Literal, Self

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Read once from the environment (`KAPI_<SERVICE>_*`) and from keyword overrides."""

    model_config = SettingsConfigDict(env_prefix="KAPI_", extra="forbid")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The settings, with the flags given on the command line over the environment
        (the parser's own keys and the flags left out are not settings)."""
        given = {
            key: value
            for key, value in vars(args).items()
            if key not in {"command", "action", "handler"} and value is not None
        }
        return cls(**given)
