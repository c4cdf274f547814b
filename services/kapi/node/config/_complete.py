"""Completing a config from the model, and filling Triton's defaults into it, so that the
config a client reads back (ModelConfig) is the one Triton would report for the same model.

Triton's order, followed here: the instance groups are settled before the model loads
(their count is how many instances load); once the model is loaded its inputs and outputs
complete the rest, as Triton's auto-complete does, and the defaults are filled in last.
"""

from __future__ import annotations

from collections.abc import Sequence

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.core.tensors import DATATYPES
from kapi.node.config._datatypes import config_datatype, oip_datatype
from kapi.node.runtimes import TensorSpec

Group = mc.ModelInstanceGroup


def complete_instance_groups(
    config: mc.ModelConfig,
    default_kind: Group.Kind.ValueType,
    cpu_count: int,
    gpu_ids: Sequence[int] = (),
) -> None:
    """Triton's NormalizeInstanceGroup and ValidateInstanceGroup: no group is one named
    after the model; a group without a name is `<model>_<index>`; KIND_AUTO is the
    runtime's device; a count of 0 is `cpu_count` on the CPU (2 for ONNX Runtime in Triton)
    and 1 elsewhere; a GPU group without gpus runs on every GPU (`gpu_ids`), and one with
    none there, or naming one that is not, fails the load in Triton's words."""
    if not config.instance_group:
        config.instance_group.add(name=config.name, kind=default_kind)
    for index, group in enumerate(config.instance_group):
        group.name = group.name or f"{config.name}_{index}"
        if group.kind == Group.KIND_AUTO:
            group.kind = default_kind
        if group.count < 1:
            group.count = cpu_count if group.kind == Group.KIND_CPU else 1
        _check_devices(config.name, group, gpu_ids)


def instance_count(config: mc.ModelConfig) -> int:
    """How many instances the groups ask for: a GPU group's count is per GPU."""
    return sum(
        group.count * (len(group.gpus) if group.kind == Group.KIND_GPU else 1)
        for group in config.instance_group
    )


def _check_devices(model: str, group: mc.ModelInstanceGroup, gpu_ids: Sequence[int]) -> None:
    where = f"instance group {group.name} of model {model}"
    if group.kind != Group.KIND_GPU:
        if group.gpus:
            kind = Group.Kind.Name(group.kind)
            raise InvalidArgument(f"{where} has kind {kind} but specifies one or more GPUs")
        return
    if not group.gpus:
        if not gpu_ids:
            raise InvalidArgument(
                f"{where} has kind KIND_GPU but no GPUs are available; use KIND_CPU (or "
                "KIND_AUTO) to run it on the CPU"
            )
        group.gpus.extend(gpu_ids)
    for gpu in group.gpus:
        if gpu not in gpu_ids:
            raise InvalidArgument(
                f"{where} specifies invalid or unsupported gpu id {gpu}. GPUs available: "
                f"{', '.join(map(str, gpu_ids)) or 'none'}"
            )


def check_tensor_types(model: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Every input and output of the model must be a tensor of an OIP datatype."""
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if spec.datatype not in DATATYPES:
                raise InvalidArgument(
                    f"model '{model}': {kind} '{spec.name}' is of type {spec.datatype}, which "
                    f"kapi cannot serve; it serves tensors of {', '.join(sorted(DATATYPES))}"
                )


def complete_config(
    config: mc.ModelConfig,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    default_max_batch_size: int,
    merges: bool | None = None,
) -> None:
    """Fill what the config leaves out from the model's own metadata, as Triton does.
    `merges` False (the load-time probe saw outputs without the batch first) keeps an
    auto-completed config from batching."""
    batchable = merges is not False and all(spec.shape[:1] == (-1,) for spec in [*inputs, *outputs])
    if autocompletes_batching(config) and batchable and default_max_batch_size > 0:
        config.max_batch_size = default_max_batch_size
        if config.max_batch_size > 1 and config.WhichOneof("scheduling_choice") is None:
            config.dynamic_batching.SetInParent()
    skip = 1 if config.max_batch_size > 0 else 0
    hidden_in, hidden_out = _hidden(config)  # a sequence's controls and state: not a client's
    _check_hidden(config.name, hidden_in, inputs, "input")
    _check_hidden(config.name, hidden_out, outputs, "output")
    _complete_tensors(
        config.name, config.input, [s for s in inputs if s.name not in hidden_in], skip, "input"
    )
    _complete_tensors(
        config.name, config.output, [s for s in outputs if s.name not in hidden_out], skip,
        "output",
    )  # fmt: skip
    _fill_defaults(config)


def autocompletes_batching(config: mc.ModelConfig) -> bool:
    """Whether completion may give the model a max_batch_size: as in Triton's ONNX Runtime
    backend, not when the config declares both inputs and outputs, or a max_batch_size."""
    return not (config.input and config.output) and not config.max_batch_size


def _hidden(config: mc.ModelConfig) -> tuple[set[str], set[str]]:
    batching = config.sequence_batching
    controls = {control.name for control in batching.control_input}
    return (
        controls | {state.input_name for state in batching.state},
        {state.output_name for state in batching.state},
    )


def _check_hidden(model: str, names: set[str], specs: list[TensorSpec], kind: str) -> None:
    """A sequence's control and state tensors must be the model's, as Triton's ONNX Runtime
    backend checks at load."""
    missing = sorted(names - {spec.name for spec in specs})
    if missing:
        raise InvalidArgument(
            f"model '{model}': sequence_batching names {kind}s {missing} that the model does not "
            f"have; it has {sorted(spec.name for spec in specs)}"
        )


def _fill_defaults(config: mc.ModelConfig) -> None:
    """Triton's NormalizeModelConfig: the latest version, and a batcher that prefers full
    batches, unless the config says otherwise."""
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    batching = config.dynamic_batching
    unset = config.HasField("dynamic_batching") and not batching.preferred_batch_size
    if unset and config.max_batch_size > 0:
        batching.preferred_batch_size.append(config.max_batch_size)
    if config.HasField("sequence_batching"):
        sequences = config.sequence_batching
        if not sequences.max_sequence_idle_microseconds:
            sequences.max_sequence_idle_microseconds = 1_000_000  # Triton's default
        oldest = sequences.oldest
        unset = sequences.HasField("oldest") and not oldest.preferred_batch_size
        if unset and config.max_batch_size > 0:
            oldest.preferred_batch_size.append(config.max_batch_size)


def _complete_tensors(
    model: str, declared: Sequence[mc.ModelInput | mc.ModelOutput], specs: list[TensorSpec],
    skip: int, kind: str,
) -> None:  # fmt: skip
    by_name = {spec.name: spec for spec in specs}
    present = {tensor.name for tensor in declared}
    unknown = present - by_name.keys()
    if unknown:
        raise InvalidArgument(
            f"model '{model}': config {kind}s {sorted(unknown)} are not in the model, "
            f"which has {sorted(by_name)}"
        )
    for tensor in declared:
        _check_declared(model, kind, tensor, by_name[tensor.name], skip)
    for spec in specs:
        if spec.name in present:
            continue
        if skip and spec.shape[:1] != (-1,):
            raise InvalidArgument(
                f"model '{model}': max_batch_size > 0 but {kind} '{spec.name}' has a fixed "
                f"first dimension {spec.shape[0] if spec.shape else 'none'}"
            )
        dims = spec.shape[skip:]
        added = declared.add(  # type: ignore[attr-defined]
            name=spec.name, data_type=config_datatype(spec.datatype), dims=dims or [1]
        )
        if not dims and skip:  # Triton's ONNX Runtime backend: a scalar row is [1] reshaped
            added.reshape.SetInParent()


def model_shapes(
    config: mc.ModelConfig, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> tuple[Shapes, Shapes]:
    """The tensors whose shape the model sees differs from the one clients send and get:
    input name -> the shape to give the model, output name -> the shape to give the client
    (both after the batch dimension). From `reshape`, and from scalars declared [1]."""
    return (
        _shapes(config, config.input, inputs, True),
        _shapes(config, config.output, outputs, False),
    )


Shapes = dict[str, tuple[int, ...]]


def _shapes(
    config: mc.ModelConfig,
    tensors: Sequence[mc.ModelInput | mc.ModelOutput],
    specs: list[TensorSpec],
    to_model: bool,
) -> Shapes:
    model = {spec.name: spec.shape for spec in specs}
    shapes: Shapes = {}
    for tensor in tensors:
        if tensor.HasField("reshape"):
            shapes[tensor.name] = tuple(tensor.reshape.shape if to_model else tensor.dims)
        elif not config.max_batch_size and list(tensor.dims) == [1] and not model[tensor.name]:
            shapes[tensor.name] = () if to_model else (1,)
    return shapes


def _check_reshape(model: str, kind: str, tensor: mc.ModelInput | mc.ModelOutput) -> None:
    """A reshape keeps the element count, and numpy can make it (one variable dimension)."""
    dims, shape = list(tensor.dims), list(tensor.reshape.shape)
    for name, value in (("dims", dims), ("reshape", shape)):
        if sum(dim == -1 for dim in value) > 1:
            raise InvalidArgument(
                f"model '{model}': config {kind} '{tensor.name}' {name} {value} has more than "
                "one variable dimension, so its reshape is ambiguous"
            )
    if -1 not in dims + shape and _count(dims) != _count(shape):
        raise InvalidArgument(
            f"model '{model}': config {kind} '{tensor.name}' has dims {dims} ({_count(dims)} "
            f"elements) but reshape {shape} ({_count(shape)} elements)"
        )


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _check_declared(
    model: str, kind: str, tensor: mc.ModelInput | mc.ModelOutput, spec: TensorSpec, skip: int
) -> None:
    """A declared tensor must agree with the model: a config that claims a size the model
    cannot take would only fail later, on a request, as an INTERNAL runtime error. With a
    reshape, the reshaped shape is what the model takes."""
    dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    model_dims = list(spec.shape[skip:])
    if tensor.HasField("reshape"):
        _check_reshape(model, kind, tensor)
    elif not skip and list(tensor.dims) == [1] and not model_dims:
        dims = []  # a scalar declared [1], as Triton's ONNX Runtime backend allows
    if len(dims) != len(model_dims) or any(
        m != -1 and d != m for d, m in zip(dims, model_dims, strict=True)
    ):
        raise InvalidArgument(
            f"model '{model}': config {kind} '{spec.name}' has "
            f"{'reshape' if tensor.HasField('reshape') else 'dims'} {dims}, but the model "
            f"takes {model_dims} (after the batch dimension, -1: any size)"
        )
    declared_type = oip_datatype(tensor.data_type)
    if tensor.data_type and declared_type != spec.datatype:
        raise InvalidArgument(
            f"model '{model}': config {kind} '{spec.name}' is {declared_type}, "
            f"but the model's is {spec.datatype}"
        )
