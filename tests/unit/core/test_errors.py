"""Each error carries the gRPC and HTTP status it crosses the wire with."""

from __future__ import annotations

import grpc
import pytest
from kapi.core import errors


@pytest.mark.parametrize(
    ("error", "grpc_status", "http_status"),
    [
        (errors.KapiError, grpc.StatusCode.INTERNAL, 500),
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND, 404),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 400),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, 400),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED, 501),
        (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
        (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403),
        (errors.Conflict, grpc.StatusCode.ABORTED, 409),
        (errors.InternalError, grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_status_codes(
    error: type[errors.KapiError], grpc_status: grpc.StatusCode, http_status: int
) -> None:
    raised = error("model 'digits': something named")
    assert issubclass(error, errors.KapiError)
    assert (raised.grpc_status, raised.http_status) == (grpc_status, http_status)
    assert raised.message == str(raised) == "model 'digits': something named"


def test_missing_extra_names_the_extra_to_install() -> None:
    raised = errors.MissingExtra("openvino", "openvino")
    assert isinstance(raised, errors.KapiError)
    assert (raised.grpc_status, raised.http_status) == (grpc.StatusCode.UNAVAILABLE, 503)
    assert raised.message == "openvino is not installed: pip install 'kapi[openvino]'"


def test_every_error_in_the_module_is_covered() -> None:
    """A new error class must be added to the table above, with its statuses."""
    classes = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.KapiError)
    }
    covered = {
        errors.KapiError,
        errors.InvalidArgument,
        errors.NotFound,
        errors.FailedPrecondition,
        errors.ResourceExhausted,
        errors.AlreadyExists,
        errors.Unavailable,
        errors.Unimplemented,
        errors.Unauthenticated,
        errors.PermissionDenied,
        errors.Conflict,
        errors.InternalError,
        errors.MissingExtra,
    }
    assert classes == covered
