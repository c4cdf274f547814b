"""Triton model configuration: read config.pbtxt, judge its fields, pick the runtime, and
complete it from the model as Triton's auto-complete and normalization do."""

from kapi.node.config._complete import (
    Shapes,
    autocompletes_batching,
    check_tensor_types,
    complete_config,
    complete_instance_groups,
    instance_count,
    model_shapes,
)
from kapi.node.config._datatypes import config_datatype, oip_datatype
from kapi.node.config._fields import check_config
from kapi.node.config._read import (
    CONFIG_FILE,
    available_versions,
    choose_runtime,
    config_from_json,
    parse_version,
    read_config,
    select_versions,
)

__all__ = [
    "CONFIG_FILE",
    "Shapes",
    "autocompletes_batching",
    "available_versions",
    "check_config",
    "check_tensor_types",
    "choose_runtime",
    "complete_config",
    "complete_instance_groups",
    "config_datatype",
    "config_from_json",
    "instance_count",
    "model_shapes",
    "oip_datatype",
    "parse_version",
    "read_config",
    "select_versions",
]
