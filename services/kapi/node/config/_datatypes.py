"""Triton's config datatypes (TYPE_FP32, TYPE_STRING, ...) and the OIP names they map to."""

from __future__ import annotations

from kapi.core._generated.inference import model_config_pb2 as mc

# "TYPE_STRING" is "BYTES"; every other name drops its "TYPE_" prefix.
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
