"""Triton model configuration: parse config.pbtxt, pick the runtime, complete from the model.

A config.pbtxt is Triton's ModelConfig in protobuf text format. Sections kapi does not act on
(warmup, optimization hints, response cache, ...) are kept and reported back but logged as
ignored, so an existing Triton repository loads unchanged; models kapi cannot serve correctly
(sequence batching, ensembles, decoupled) are refused with a clear error. Without a
config.pbtxt, the config is completed from the model file, as Triton's auto-complete does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from google.protobuf import text_format

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, NotFound
from kapi.node.runtimes import FILES, PLATFORMS, RUNTIMES, TensorSpec

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
# The ModelConfig fields kapi acts on; any other field that is set is logged as ignored.
ACTED_ON = frozenset(
    {
        "name", "platform", "backend", "runtime", "version_policy", "max_batch_size", "input",
        "output", "dynamic_batching", "instance_group", "default_model_filename", "parameters",
        "metric_tags",
    }
)  # fmt: skip
# Triton's datatype enum names, and the OIP names they map to ("TYPE_STRING" is "BYTES").
_OIP_OF_CONFIG = {
    name: ("BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_"))
    for name in mc.DataType.keys()  # noqa: SIM118 - an enum wrapper, not a dict
    if name != "TYPE_INVALID"
}
_CONFIG_OF_OIP = {oip: name for name, oip in _OIP_OF_CONFIG.items()}


def oip_datatype(data_type: mc.DataType.ValueType) -> str:
    return _OIP_OF_CONFIG.get(mc.DataType.Name(data_type), "INVALID")


def config_datatype(datatype: str) -> mc.DataType.ValueType:
    return mc.DataType.Value(_CONFIG_OF_OIP[datatype])


def read_config(model_dir: Path) -> mc.ModelConfig:
    """The model's config.pbtxt, or an empty config named after the directory."""
    config = mc.ModelConfig()
    path = model_dir / CONFIG_FILE
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config, allow_unknown_field=True)
        except text_format.ParseError as exc:
            raise InvalidArgument(f"{path}: not a valid model configuration: {exc}") from exc
    if config.name and config.name != model_dir.name:
        raise InvalidArgument(
            f"{path}: name '{config.name}' does not match its directory '{model_dir.name}'"
        )
    config.name = model_dir.name
    _check_servable(config)
    ignored = sorted(field.name for field, _ in config.ListFields() if field.name not in ACTED_ON)
    if ignored:
        log.warning("model %r: kapi ignores config sections %s", config.name, ", ".join(ignored))
    return config


def _check_servable(config: mc.ModelConfig) -> None:
    scheduling = config.WhichOneof("scheduling_choice")
    if scheduling in ("sequence_batching", "ensemble_scheduling") or config.platform == "ensemble":
        raise InvalidArgument(
            f"model '{config.name}': {scheduling or 'ensemble'} is not supported by kapi; "
            "serve stateless models with dynamic_batching or no scheduler"
        )
    if config.model_transaction_policy.decoupled:
        raise InvalidArgument(f"model '{config.name}': decoupled models are not supported by kapi")
    for group in config.instance_group:
        if group.count < 0:
            raise InvalidArgument(
                f"model '{config.name}': instance_group count is {group.count}; it must be 1 "
                "or more (0 or none: 1)"
            )


def available_versions(model_dir: Path) -> list[int]:
    # As in Triton, a version directory is a positive number without leading zeros.
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    )


def select_versions(model_dir: Path, config: mc.ModelConfig) -> list[int]:
    """The versions the config's version_policy asks to serve (default: the latest one)."""
    versions = available_versions(model_dir)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        chosen = versions
    elif choice == "specific":
        missing = set(policy.specific.versions) - set(versions)
        if missing:
            raise NotFound(f"model '{config.name}': versions {sorted(missing)} not on disk")
        chosen = sorted(policy.specific.versions)
    else:
        count = policy.latest.num_versions if choice == "latest" else 1
        chosen = versions[-max(count, 1) :]
    if not chosen:
        raise NotFound(f"model '{config.name}': no numeric version directory in {model_dir}")
    return chosen


def choose_runtime(config: mc.ModelConfig, version_dir: Path) -> str:
    """The runtime name: from backend, else platform, else the model file present."""
    if config.backend:
        if config.backend not in RUNTIMES:
            raise InvalidArgument(
                f"model '{config.name}': backend '{config.backend}' is not served by kapi, "
                f"expected one of {sorted(RUNTIMES)}"
            )
        return config.backend
    if config.platform:
        if config.platform not in PLATFORMS:
            raise InvalidArgument(
                f"model '{config.name}': platform '{config.platform}' is not served by kapi, "
                f"expected one of {sorted(PLATFORMS)}"
            )
        return PLATFORMS[config.platform]
    for filename, runtime in FILES.items():
        if (version_dir / filename).exists():
            return runtime
    raise InvalidArgument(
        f"model '{config.name}': no backend or platform in config and no model file "
        f"({', '.join(FILES)}) in {version_dir}"
    )


def complete_config(
    config: mc.ModelConfig,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    default_max_batch_size: int,
) -> None:
    """Fill what the config leaves out from the model's own metadata, as Triton does."""
    batchable = all(spec.shape[:1] == (-1,) for spec in [*inputs, *outputs])
    autocomplete = not config.input and not config.output and not config.max_batch_size
    if autocomplete and batchable and default_max_batch_size > 0:
        config.max_batch_size = default_max_batch_size
        if config.WhichOneof("scheduling_choice") is None:
            config.dynamic_batching.SetInParent()
    skip = 1 if config.max_batch_size > 0 else 0
    _complete_tensors(config.name, config.input, inputs, skip, "input")
    _complete_tensors(config.name, config.output, outputs, skip, "output")
    if not config.instance_group:
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)


def _complete_tensors(
    model: str, declared: object, specs: list[TensorSpec], skip: int, kind: str
) -> None:
    by_name = {spec.name: spec for spec in specs}
    present = {tensor.name for tensor in declared}  # type: ignore[attr-defined]
    unknown = present - by_name.keys()
    if unknown:
        raise InvalidArgument(
            f"model '{model}': config {kind}s {sorted(unknown)} are not in the model, "
            f"which has {sorted(by_name)}"
        )
    for tensor in declared:  # type: ignore[attr-defined]
        _check_declared(model, kind, tensor, by_name[tensor.name], skip)
    for spec in specs:
        if spec.name in present:
            continue
        if skip and spec.shape[:1] not in ((-1,),):
            raise InvalidArgument(
                f"model '{model}': max_batch_size > 0 but {kind} '{spec.name}' has a fixed "
                f"first dimension {spec.shape[0] if spec.shape else 'none'}"
            )
        declared.add(  # type: ignore[attr-defined]
            name=spec.name, data_type=config_datatype(spec.datatype), dims=spec.shape[skip:]
        )


def _check_declared(model: str, kind: str, tensor: object, spec: TensorSpec, skip: int) -> None:
    """A declared tensor must agree with the model: a config that claims a size the model
    cannot take would only fail later, on a request, as an INTERNAL runtime error."""
    dims = list(tensor.dims)  # type: ignore[attr-defined]
    if tensor.reshape.shape:  # type: ignore[attr-defined]
        return  # the config reshapes between the request and the model: sizes differ by design
    model_dims = list(spec.shape[skip:])
    if len(dims) != len(model_dims) or any(
        m != -1 and d != m for d, m in zip(dims, model_dims, strict=True)
    ):
        raise InvalidArgument(
            f"model '{model}': config {kind} '{spec.name}' has dims {dims}, but the model "
            f"takes {model_dims} (after the batch dimension, -1: any size)"
        )
    declared_type = oip_datatype(tensor.data_type)  # type: ignore[attr-defined]
    if tensor.data_type and declared_type != spec.datatype:  # type: ignore[attr-defined]
        raise InvalidArgument(
            f"model '{model}': config {kind} '{spec.name}' is {declared_type}, "
            f"but the model's is {spec.datatype}"
        )
