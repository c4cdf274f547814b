"""Settings shared by every service; each service subclasses with its own env prefix."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Read once from the environment (`KAPI_<SERVICE>_*`) and from keyword overrides."""

    model_config = SettingsConfigDict(env_prefix="KAPI_", extra="forbid")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
