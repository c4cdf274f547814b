"""The repository's settings: environment `KAPI_REPOSITORY_*`, overridden by flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kapi.core.settings import ServiceSettings
from kapi.repository.auth import TokenSpec


class RepositorySettings(ServiceSettings):
    # Errors never echo what was given: tokens are among the settings.
    model_config = SettingsConfigDict(
        env_prefix="KAPI_REPOSITORY_", extra="forbid", hide_input_in_errors=True
    )

    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # Where SQLite and the local blob store live by default, and the admin token.
    data: Path = Path("/var/lib/kapi/repository")
    # A SQLAlchemy URL (postgresql+psycopg://…); default: SQLite in DATA.
    database: str | None = None
    # file:///PATH or s3://BUCKET[/PREFIX]; default: DATA/blobs.
    blobs: str | None = None
    # Tokens: a JSON file of [{name, token | sha256, scope, models}], or the list itself
    # (KAPI_REPOSITORY_TOKENS as JSON). Without either, an admin write token is made once
    # in DATA/admin-token: writes always need a token.
    tokens_file: Path | None = None
    tokens: list[TokenSpec] = []
    # Reads without a token; false: every read needs a token of read or write scope.
    open_reads: bool = True
