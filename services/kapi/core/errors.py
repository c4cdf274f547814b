"""kapi's one error hierarchy: every error knows its gRPC status and its HTTP status."""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)


class KapiError(Exception):
    """Base of every error that may cross the wire; the message names what was wrong."""

    grpc_status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KapiError):
    """The caller sent something malformed: a tensor, a shape, a parameter."""

    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(KapiError):
    """An unknown model, version or resource."""

    grpc_status = grpc.StatusCode.NOT_FOUND
    http_status = 404


class AlreadyExists(KapiError):
    """Something of that name is there already (Triton answers it 400 over HTTP)."""

    grpc_status = grpc.StatusCode.ALREADY_EXISTS
    http_status = 400


class FailedPrecondition(KapiError):
    """The request is well formed but the system is not in a state to serve it."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400


class ResourceExhausted(KapiError):
    """A request or response too large for the node's limits."""

    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class Unavailable(KapiError):
    """A model or server that exists but is not ready (loading, draining, failed to load)."""

    grpc_status = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Unauthenticated(KapiError):
    """No credentials, or credentials that are not valid."""

    grpc_status = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(KapiError):
    """Valid credentials that do not allow this (a read-only token that writes, say)."""

    grpc_status = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Conflict(KapiError):
    """The request conflicts with the current state: a name taken, an alias that moved
    since the caller read it, a version an alias still points at."""

    grpc_status = grpc.StatusCode.ABORTED
    http_status = 409


class Unimplemented(KapiError):
    grpc_status = grpc.StatusCode.UNIMPLEMENTED
    http_status = 501


class InternalError(KapiError):
    """A failure inside kapi or a runtime; the message carries the runtime's own words."""


class MissingExtra(KapiError):
    """An optional dependency is not installed; the message names the extra to install."""

    grpc_status = grpc.StatusCode.UNAVAILABLE
    http_status = 503

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"{module} is not installed: pip install 'kapi[{extra}]'")


def as_kapi_error(error: Exception) -> KapiError:
    """The KapiError an exception crosses the wire as: itself, or an INTERNAL error naming
    it (logged with its traceback, as it is a bug or a runtime's failure)."""
    if isinstance(error, KapiError):
        return error
    log.exception("unexpected error", exc_info=error)
    return InternalError(f"{type(error).__name__}: {error}")
