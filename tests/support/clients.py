"""Client-side helpers: build tritonclient inputs, expect an error with its exact status."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def infer_input(name: str, data: npt.NDArray[np.generic], datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def simple_inputs(batch: int = 1, columns: int = 16) -> list[grpcclient.InferInput]:
    """All-ones INT32 inputs for the `simple` add/sub model (16 columns, when right)."""
    data = np.ones((batch, columns), dtype=np.int32)
    return [infer_input("INPUT0", data, "INT32"), infer_input("INPUT1", data, "INT32")]


def expect_error(call: Callable[[], object], status: str, *words: str) -> InferenceServerException:
    """`call` raises tritonclient's error with `status` (e.g. "StatusCode.NOT_FOUND") and a
    message that holds every one of `words`."""
    with pytest.raises(InferenceServerException) as raised:
        call()
    assert raised.value.status() == status, raised.value.message()
    for word in words:
        assert word in raised.value.message()
    return raised.value


def expect_rpc_error(call: Callable[[], object], code: grpc.StatusCode, *words: str) -> None:
    """As expect_error, for calls made with the raw gRPC stub."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() == code, raised.value.details()
    for word in words:
        assert word in raised.value.details()
