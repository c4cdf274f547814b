"""How each contender is called: an ONNX Runtime session in this process, or a server
through tritonclient's gRPC client (the same client for kapi and MLServer)."""

from __future__ import annotations

import abc
import functools

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import tritonclient.grpc as grpcclient

from nodebench.load import Call
from nodebench.models import ModelSpec
from nodebench.servers import ServingSettings


def session(spec: ModelSpec, settings: ServingSettings) -> ort.InferenceSession:
    """The session the in-process contender calls: the servers' thread settings."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    return ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])


class Target(abc.ABC):
    """What the load threads call: `make_call` once per thread, `release` after the round."""

    @abc.abstractmethod
    def make_call(self) -> Call: ...

    def release(self) -> None:
        """Free what the round's calls held."""


class InProcessTarget(Target):
    """One session shared by every thread, as ONNX Runtime allows: concurrent runs."""

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec) -> None:
        self.session = session
        self.spec = spec

    def make_call(self) -> Call:
        feed = {self.spec.input_name: self.spec.sample()}
        return functools.partial(self.session.run, [self.spec.output_name], feed)


class TritonTarget(Target):
    """One served model; every `make_call` opens its own client (its own gRPC channel)."""

    def __init__(self, url: str, served_name: str, spec: ModelSpec) -> None:
        self.url = url
        self.served_name = served_name
        self.spec = spec
        self._clients: list[grpcclient.InferenceServerClient] = []

    def make_call(self) -> Call:
        client = grpcclient.InferenceServerClient(self.url)
        self._clients.append(client)
        inputs, outputs = self._request(self.spec.sample())
        return functools.partial(client.infer, self.served_name, inputs, outputs=outputs)

    def infer_once(self, array: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        client = grpcclient.InferenceServerClient(self.url)
        try:
            inputs, outputs = self._request(array)
            result = client.infer(self.served_name, inputs, outputs=outputs)
        finally:
            client.close()
        output: npt.NDArray[np.float32] = result.as_numpy(self.spec.output_name)
        return output

    def _request(
        self, array: npt.NDArray[np.float32]
    ) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
        tensor = grpcclient.InferInput(self.spec.input_name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        return [tensor], [grpcclient.InferRequestedOutput(self.spec.output_name)]

    def release(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
