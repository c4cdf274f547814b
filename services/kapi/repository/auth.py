"""Bearer tokens: each with a scope (read or write) and optionally limited to some models.

Tokens are kept and compared as sha256 digests, in constant time and against every token
configured (no early exit), and are never logged: an error names the token's name, never its
value. A token's name is the actor the event log records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kapi.core.errors import InvalidArgument, PermissionDenied, Unauthenticated

ANONYMOUS = "anonymous"


class TokenSpec(BaseModel):
    """One configured token: its value, or the sha256 hex of its value."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # it holds secrets

    name: Annotated[str, Field(min_length=1, max_length=255)]
    token: Annotated[str, Field(min_length=16)] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    scope: Literal["read", "write"] = "read"
    models: list[str] | None = None  # None: every model

    @model_validator(mode="after")
    def _one_secret(self) -> TokenSpec:
        if (self.token is None) == (self.sha256 is None):
            raise ValueError(f"token {self.name!r}: give exactly one of 'token' and 'sha256'")
        return self

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.token is not None
        return hashlib.sha256(self.token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scope: Literal["read", "write"] | None  # None: no token, allowed only where reads are open
    models: frozenset[str] | None

    def may_see(self, model: str) -> bool:
        return self.models is None or model in self.models


class Authenticator:
    def __init__(self, tokens: list[TokenSpec], open_reads: bool) -> None:
        self._tokens = [(spec, spec.digest()) for spec in tokens]
        self.open_reads = open_reads

    def principal(self, authorization: str | None) -> Principal:
        """Who sent a request, from its Authorization header."""
        if not authorization:
            return Principal(ANONYMOUS, None, None)
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthenticated("the Authorization header is not 'Bearer <token>'")
        presented = hashlib.sha256(value.strip().encode()).digest()
        found = None
        for spec, digest in self._tokens:  # every one, whatever matches: constant time
            if hmac.compare_digest(presented, digest):
                found = spec
        if found is None:
            raise Unauthenticated("the bearer token is not valid")
        models = frozenset(found.models) if found.models is not None else None
        return Principal(found.name, found.scope, models)

    def check_read(self, who: Principal, model: str | None = None) -> None:
        if who.scope is None and not self.open_reads:
            raise Unauthenticated("reads need a bearer token")
        if model is not None and not who.may_see(model):
            raise PermissionDenied(f"token '{who.name}' is not allowed model '{model}'")

    def check_write_scope(self, who: Principal) -> None:
        if who.scope is None:
            raise Unauthenticated("writes need a bearer token")
        if who.scope != "write":
            raise PermissionDenied(f"token '{who.name}' has read scope; this is a write")

    def check_write(self, who: Principal, model: str) -> None:
        self.check_write_scope(who)
        if not who.may_see(model):
            raise PermissionDenied(f"token '{who.name}' is not allowed model '{model}'")


def load_tokens(path: Path) -> list[TokenSpec]:
    """Tokens from a JSON file: a list of {name, token | sha256, scope, models}."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError("expected a list of tokens")
        return [TokenSpec.model_validate(item) for item in data]
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"tokens file {path}: {exc}") from exc


def admin_token(data_dir: Path) -> TokenSpec:
    """The write token of a repository configured without tokens: made once, kept in
    DATA/admin-token (readable by its owner alone), so that writes still need a token."""
    path = data_dir / "admin-token"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
        temp.replace(path)
    return TokenSpec(name="admin", token=path.read_text().strip(), scope="write")
