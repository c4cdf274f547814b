"""Checks a request against its model's config before any of its contents are decoded, and
a response against the message limit. Validation has this one home: a request that passes
it decodes to exactly the tensors the model takes."""

from __future__ import annotations

from dataclasses import dataclass, field

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, ResourceExhausted
from kapi.core.inference import EncodedTensor, InferenceRequest, RequestedOutput, RequestLimits
from kapi.core.tensors import Tensor, check_raw_size
from kapi.node.classification import CLASSIFIABLE
from kapi.node.config import oip_datatype
from kapi.node.parameters import (
    Scheduling,
    check_input_parameters,
    check_output_parameters,
    check_request_parameters,
)
from kapi.node.scheduler import Signature

# Room kept for the rest of a response message (names, shapes, parameters) around the
# outputs' raw bytes, so a response that passes the size check also fits the gRPC limit
# (at most half the limit, for a node configured with a tiny one).
RESPONSE_ENVELOPE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    """A request the model can run: its inputs (still encoded) and what to run them as."""

    inputs: list[EncodedTensor]
    outputs: list[str]
    classifications: dict[str, int]  # output -> top k to return as classes
    batch_size: int  # 0 for a model that does not batch
    signature: Signature  # requests merge only when their non-batch shapes agree
    scheduling: Scheduling = field(default_factory=Scheduling)


class RequestValidator:
    """One model version's rules for requests, from its completed config."""

    def __init__(self, config: mc.ModelConfig) -> None:
        self.model = config.name
        self.max_batch_size = config.max_batch_size
        self._inputs = {tensor.name: tensor for tensor in config.input}
        self._outputs = [tensor.name for tensor in config.output]
        self._output_types = {t.name: oip_datatype(t.data_type) for t in config.output}
        # Per input, read from the config once: its datatype and dims (protobuf fields cost
        # a conversion on every read).
        self._expected = {t.name: (oip_datatype(t.data_type), tuple(t.dims)) for t in config.input}
        # Past these counts a request is refused unread; below them, with room for a few
        # mistakes, check() names the input or output that is wrong.
        self.limits = RequestLimits(2 * len(self._inputs) + 8, 2 * len(self._outputs) + 8)

    def check(self, request: InferenceRequest) -> CheckedRequest:
        scheduling = check_request_parameters(request)
        given = {tensor.name: tensor for tensor in request.inputs}
        if len(given) != len(request.inputs):
            raise InvalidArgument(f"model '{self.model}': an input is given more than once")
        for name in given.keys() - self._inputs.keys():
            raise InvalidArgument(
                f"model '{self.model}' has no input '{name}', expected {sorted(self._inputs)}"
            )
        batch_sizes = set()
        for name, spec in self._inputs.items():
            tensor = given.get(name)
            if tensor is None:
                if spec.optional:
                    continue
                raise InvalidArgument(f"model '{self.model}': missing input '{name}'")
            batch_sizes.add(self._check_input(spec, tensor))
        if len(batch_sizes) > 1:
            raise InvalidArgument(
                f"model '{self.model}': inputs disagree on batch size {sorted(batch_sizes)}"
            )
        signature = tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in request.inputs))
        outputs, classifications = self._check_outputs(request.outputs)
        return CheckedRequest(
            inputs=list(given.values()),
            outputs=outputs,
            classifications=classifications,
            scheduling=scheduling,
            batch_size=batch_sizes.pop() if self.max_batch_size > 0 and batch_sizes else 0,
            signature=signature,
        )

    def check_response_size(self, outputs: list[Tensor], limit: int) -> None:
        """Outputs too large for a response of `limit` bytes fail the request with
        RESOURCE_EXHAUSTED: the response could not be sent."""
        size = sum(tensor.raw_size for tensor in outputs)
        if size > limit - min(RESPONSE_ENVELOPE_BYTES, limit // 2):
            raise ResourceExhausted(
                f"model '{self.model}': the response's outputs take {size} bytes; with the "
                f"message around them that is over the node's message limit of {limit} bytes "
                f"(KAPI_NODE_MAX_MESSAGE_BYTES); request fewer rows or fewer outputs"
            )

    def _check_outputs(self, requested: list[RequestedOutput]) -> tuple[list[str], dict[str, int]]:
        """The outputs to return, each once (as in Triton, an output requested twice comes
        back once, with its first parameters), and those to return as classes."""
        if not requested:
            return list(self._outputs), {}
        classifications: dict[str, int] = {}
        for output in requested:
            if output.name not in self._outputs:
                raise InvalidArgument(
                    f"model '{self.model}' has no output '{output.name}', expected {self._outputs}"
                )
            count = check_output_parameters(self.model, output)
            datatype = self._output_types[output.name]
            if count and datatype not in CLASSIFIABLE:  # Triton's words
                raise InvalidArgument(
                    f"class result not available for output '{output.name}' due to "
                    f"unsupported type '{datatype}'"
                )
            if count:
                classifications.setdefault(output.name, count)
        return list(dict.fromkeys(output.name for output in requested)), classifications

    def _check_input(self, spec: mc.ModelInput, tensor: EncodedTensor) -> int:
        expected_type, dims = self._expected[spec.name]
        if tensor.datatype != expected_type:
            raise InvalidArgument(
                f"model '{self.model}': input '{tensor.name}' has datatype {tensor.datatype}, "
                f"expected {expected_type}"
            )
        self._check_shape(dims, tensor)
        if tensor.parameters:
            check_input_parameters(self.model, tensor)
        _check_contents(self.model, tensor)
        return tensor.shape[0] if self.max_batch_size > 0 else 0

    def _check_shape(self, dims: tuple[int, ...], tensor: EncodedTensor) -> None:
        batching = self.max_batch_size > 0
        if batching and tensor.shape[1:] == dims and 1 <= tensor.shape[0] <= self.max_batch_size:
            return  # the common case: a batch of rows of the config's fixed dims
        if not batching and tensor.shape == dims:
            return
        shape = list(tensor.shape)
        if batching:
            if not shape or not 1 <= shape[0] <= self.max_batch_size:
                raise InvalidArgument(
                    f"model '{self.model}': input '{tensor.name}' has shape {shape}; its first "
                    f"dimension is the batch, 1 to {self.max_batch_size}"
                )
            shape = shape[1:]
        if len(shape) != len(dims) or any(
            d not in (-1, s) for d, s in zip(dims, shape, strict=True)
        ):
            expected = ["batch", *dims] if batching else list(dims)
            raise InvalidArgument(
                f"model '{self.model}': input '{tensor.name}' has shape {list(tensor.shape)}, "
                f"expected {expected} (-1: any size)"
            )


def bytes_count_error(model: str, name: str, expected: int, given: int | None) -> InvalidArgument:
    """Triton's words for BYTES contents that hold too few or too many elements (`given`
    None: more than expected, where the count stopped)."""
    if given is None:
        return InvalidArgument(
            f"unexpected number of string elements for inference input '{name}' for model "
            f"'{model}', expecting {expected}: the contents hold more"
        )
    return InvalidArgument(
        f"expected {expected} string elements for inference input '{name}' for model "
        f"'{model}', got {given}"
    )


def _check_contents(model: str, tensor: EncodedTensor) -> None:
    """The contents hold the shape's element count; BYTES raw contents are counted as they
    decode, which stops at that count."""
    if tensor.raw is None:
        given, expected = len(tensor.values), tensor.element_count
        if tensor.datatype == "BYTES" and given != expected:
            raise bytes_count_error(model, tensor.name, expected, given)
        if given != expected:
            raise InvalidArgument(
                f"input '{tensor.name}': {len(tensor.values)} elements in contents, expected "
                f"{tensor.element_count} for shape {list(tensor.shape)}"
            )
    elif tensor.datatype != "BYTES":
        check_raw_size(tensor.name, tensor.datatype, tensor.shape, len(tensor.raw))
