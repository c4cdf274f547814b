"""What kapi does with each ModelConfig field a config.pbtxt sets, field by field.

Three answers, as Triton compatibility is exact or explicit:
- acted on: kapi does what Triton does with it;
- ignored, with a warning at load naming the field: hints and policies whose absence changes
  how a model runs, never what it answers (optimization, warmup);
- refused: the model fails to load with a clear error, because serving it without the field
  would give other answers than Triton (ragged batching, shape tensors).
A field this table does not name is refused, so a field nobody classified never passes unseen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal, Union

from google.protobuf.message import Message

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument

log = logging.getLogger("kapi.node.config")

Treatment = Literal["act", "ignore", "refuse"]
Rules = Mapping[str, Union[Treatment, "Rules"]]  # a nested table: act, and look inside

_QUEUE_POLICY: Rules = dict.fromkeys(
    ("max_queue_size", "timeout_action", "default_timeout_microseconds", "allow_timeout_override"),
    "act",
)
_RULES: Rules = {
    **dict.fromkeys(
        ("name", "platform", "backend", "version_policy", "max_batch_size", "parameters"), "act"
    ),
    "default_model_filename": "act",
    "model_transaction_policy": "act",  # decoupled: true is refused below, with its reason
    "ensemble_scheduling": "act",  # checked when the ensemble loads (kapi.node.ensemble)
    "sequence_batching": {
        **dict.fromkeys(
            ("max_sequence_idle_microseconds", "control_input", "direct", "oldest", "state"),
            "act",
        ),
        "iterative_sequence": "refuse",
    },
    "input": {
        **dict.fromkeys(("name", "data_type", "dims", "optional", "reshape"), "act"),
        "format": "ignore",  # Triton passes it to backends as a hint; ONNX models fix layout
        **dict.fromkeys(
            ("is_shape_tensor", "allow_ragged_batch", "is_non_linear_format_io"), "refuse"
        ),
    },
    "output": {
        **dict.fromkeys(("name", "data_type", "dims", "reshape"), "act"),
        "label_filename": "act",  # the labels of classification results
        **dict.fromkeys(("is_shape_tensor", "is_non_linear_format_io"), "refuse"),
    },
    "dynamic_batching": {
        "preferred_batch_size": "act",
        "max_queue_delay_microseconds": "act",
        "default_queue_policy": _QUEUE_POLICY,
        "priority_queue_policy": "act",  # every field of a queue policy is acted on
        **dict.fromkeys(("priority_levels", "default_priority_level"), "act"),
        # Requests already answer each in its own response and streams in their order.
        "preserve_ordering": "ignore",
    },
    "instance_group": {
        **dict.fromkeys(("name", "kind", "count", "gpus"), "act"),
        **dict.fromkeys(
            ("secondary_devices", "profile", "passive", "host_policy", "rate_limiter"), "ignore"
        ),
    },
    **dict.fromkeys(
        (
            "runtime",
            "metric_tags",
            "model_metrics",
            "optimization",
            "model_warmup",
            "response_cache",
        ),
        "ignore",
    ),
    # Everything else changes which file loads or what the model computes: refused.
}


def check_config(config: mc.ModelConfig) -> None:
    """Refuse a config kapi cannot serve as Triton would; warn about the fields it ignores."""
    _check_servable(config)
    found: dict[Treatment, list[str]] = {"act": [], "ignore": [], "refuse": []}
    _classify(config, _RULES, "", found)
    if found["refuse"]:
        raise InvalidArgument(
            f"model '{config.name}': config fields {', '.join(found['refuse'])} are not "
            "supported by kapi yet; serving the model without them would not give Triton's "
            "answers"
        )
    if found["ignore"]:
        log.warning(
            "model %r: kapi ignores config fields %s", config.name, ", ".join(found["ignore"])
        )


def _classify(message: Message, rules: Rules, path: str, found: dict[Treatment, list[str]]) -> None:
    for field, value in message.ListFields():
        rule = rules.get(field.name, "refuse")
        where = f"{path}{field.name}"
        if isinstance(rule, str):
            found[rule].append(where)
            continue
        items = list(value) if field.is_repeated else [value]
        for index, item in enumerate(items):
            label = f"{where}[{getattr(item, 'name', '') or index}]" if field.is_repeated else where
            _classify(item, rule, f"{label}.", found)


def _check_servable(config: mc.ModelConfig) -> None:
    scheduling = config.WhichOneof("scheduling_choice")
    if (scheduling == "ensemble_scheduling") != (config.platform == "ensemble"):
        raise InvalidArgument(  # Triton's rule: the one comes with the other
            f"model '{config.name}': ensemble_scheduling is for platform \"ensemble\", and "
            "an ensemble must have it"
        )
    if config.model_transaction_policy.decoupled:
        raise InvalidArgument(f"model '{config.name}': decoupled models are not supported by kapi")
    if config.max_batch_size < 0:
        raise InvalidArgument(
            f"model '{config.name}': max_batch_size is {config.max_batch_size}; it must be 0 "
            "(no batching) or more"
        )
    for kind, tensors in (("input", config.input), ("output", config.output)):
        names = [tensor.name for tensor in tensors]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InvalidArgument(f"model '{config.name}': {kind} '{twice[0]}' is declared twice")
        for tensor in tensors:
            if tensor.data_type == mc.TYPE_INVALID:  # Triton's rule: declared, so typed
                raise InvalidArgument(
                    f"model '{config.name}': config {kind} '{tensor.name}' must specify 'data_type'"
                )
    _check_priorities(config)
    for group in config.instance_group:
        if group.count < 0:
            raise InvalidArgument(
                f"model '{config.name}': instance_group count is {group.count}; it must be 1 "
                "or more (0 or none: Triton's default)"
            )


def _check_priorities(config: mc.ModelConfig) -> None:
    """Triton's rules for priority levels, in its words."""
    batching = config.dynamic_batching
    levels = batching.priority_levels
    if levels and not 1 <= batching.default_priority_level <= levels:
        raise InvalidArgument(
            f"default priority level must be in range [1, {levels}] for {config.name}"
        )
    for level in batching.priority_queue_policy:
        if not 1 <= level <= levels:
            raise InvalidArgument(
                f"priority queue policy must have priority level in range [1, {levels}] for "
                f"{config.name}"
            )
