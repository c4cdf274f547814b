"""A per-profile cost model: latency and energy per inference, estimated for hardware that is
not here, from an ONNX graph and a table of published figures.

Each operator is placed on a roofline: it takes the longer of its arithmetic at the profile's
peak FLOP/s and its memory traffic at the profile's bandwidth, plus a fixed dispatch overhead
(a kernel launch, an interpreter step). The model's latency is the sum over its operators at
batch 1. Energy is that latency times the profile's power under load.

A roofline is an optimistic bound: small convolutions at batch 1 reach a fraction of a
device's peak. So the table carries an `efficiency`, the share of peak that such models
typically reach on that class of device; kapi checks the estimate against a measurement on
every profile that is present, and reports the error with the study (docs/trainer.md).

The figures, and where they come from (vendors' data sheets unless said):

- x86-64 CPU cores, one thread: fp32 FLOP/cycle from the vector width and two FMA ports
  (AVX-512: 2 x 16 x 2 = 64; AVX2: 2 x 8 x 2 = 32; SSE baseline: 2 x 4 x 2 = 16) at 3.0 GHz;
  about 50 GB/s, a core's L2/L3 bandwidth, since a small model's activations stay in cache
  (DRAM gives one core about 15 GB/s); 10 W a core under load (a server part's TDP over its
  cores); 65% of peak for dense convolutions (MLAS's and oneDNN's GEMM kernels), 10% for
  depthwise ones, which do too little work per byte to fill the vector units (every row).
  The timing is per thread because kapi times CPU variants on one. These x86 figures were
  set after checks on the development machine: a first guess (a quarter of peak, DRAM
  bandwidth, depthwise like dense) overestimated dense models 2-3x and underestimated
  MobileNet V2. So the error kapi reports for x86 profiles is an in-sample figure; the other
  rows are untested against hardware.
- `cpu-arm64`: a Neoverse-N1/Cortex-A76 class core, 2 x 128-bit FMA (16 FLOP/cycle) at
  2.4 GHz, one thread.
- `rpi5`: four Cortex-A76 at 2.4 GHz (153.6 GFLOP/s), LPDDR4X-4267 on 32 bits (17 GB/s),
  about 7 W under load (Raspberry Pi 5 power measurements).
- `jetson-orin`: Jetson AGX Orin 64 GB, 5.32 TFLOP/s fp32 on the GPU, 204.8 GB/s, 60 W.
- `nvidia-sm75` T4: 8.1 TFLOP/s fp32, 320 GB/s, 70 W. `nvidia-sm80` A100 SXM: 19.5 TFLOP/s,
  2039 GB/s, 400 W. `nvidia-sm86` A10: 31.2 TFLOP/s, 600 GB/s, 150 W. `nvidia-sm89` L4:
  30.3 TFLOP/s, 300 GB/s, 72 W. `nvidia-sm90` H100 SXM: 66.9 TFLOP/s, 3350 GB/s, 700 W.
  Another `nvidia-smXY` takes the nearest lower entry.
- `edgetpu`: Coral's Edge TPU runs MobileNet V2 (about 0.6 GFLOP at 224x224) at "almost
  400 FPS" (coral.ai), so about 240 GFLOP/s achieved, at 2 W (0.5 W per TOPS, 4 TOPS).
  Its efficiency is therefore 1: the figure is already achieved, not peak.
- `intel-npu`: a Core Ultra (Meteor Lake) NPU, 11 TOPS int8, so about 5.5 TFLOP/s at fp16,
  LPDDR5X at 120 GB/s, about 5 W.
- `mcu-cortex-m0`: an RP2040 (Raspberry Pi Pico), two Cortex-M0+ at 133 MHz with no FPU;
  CMSIS-NN's int8 kernels reach about a MAC per two cycles, so about 0.13 GOP/s on both
  cores; SRAM at 32 bits a cycle (0.5 GB/s); about 0.08 W (25 mA at 3.3 V).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument


@dataclass(frozen=True)
class DeviceFigures:
    peak_gflops: float  # fp32 (int8 operations on the int8-only targets)
    bandwidth_gbs: float
    watts: float
    overhead_us: float  # per operator: a dispatch or a kernel launch
    efficiency: float  # the share of peak dense convolutions and GEMMs reach at batch 1
    source: str
    depthwise_efficiency: float = 0.1  # depthwise convolutions reuse too little to reach it


_X86_CORE = "one x86-64 core at 3.0 GHz, two FMA ports; 50 GB/s from cache; 10 W"
FIGURES: dict[str, DeviceFigures] = {
    "cpu-x86_64-avx512vnni": DeviceFigures(192.0, 50.0, 10.0, 2.0, 0.65, _X86_CORE),
    "cpu-x86_64-avx2": DeviceFigures(96.0, 50.0, 10.0, 2.0, 0.65, _X86_CORE),
    "cpu-x86_64": DeviceFigures(48.0, 50.0, 10.0, 2.0, 0.65, _X86_CORE),
    "cpu-arm64": DeviceFigures(38.4, 30.0, 3.0, 3.0, 0.5, "one Cortex-A76 class core"),
    "rpi5": DeviceFigures(153.6, 17.0, 7.0, 5.0, 0.2, "4x Cortex-A76 2.4 GHz, LPDDR4X"),
    "jetson-orin": DeviceFigures(5320.0, 204.8, 60.0, 10.0, 0.3, "Jetson AGX Orin 64 GB"),
    "nvidia-sm75": DeviceFigures(8100.0, 320.0, 70.0, 5.0, 0.3, "NVIDIA T4"),
    "nvidia-sm80": DeviceFigures(19500.0, 2039.0, 400.0, 5.0, 0.3, "NVIDIA A100 SXM"),
    "nvidia-sm86": DeviceFigures(31200.0, 600.0, 150.0, 5.0, 0.3, "NVIDIA A10"),
    "nvidia-sm89": DeviceFigures(30300.0, 300.0, 72.0, 5.0, 0.3, "NVIDIA L4"),
    "nvidia-sm90": DeviceFigures(66900.0, 3350.0, 700.0, 5.0, 0.3, "NVIDIA H100 SXM"),
    "edgetpu": DeviceFigures(240.0, 8.0, 2.0, 20.0, 1.0, "Coral: MobileNet V2 at ~400 FPS"),
    "intel-npu": DeviceFigures(5500.0, 120.0, 5.0, 10.0, 0.2, "Core Ultra NPU, 11 TOPS"),
    "mcu-cortex-m0": DeviceFigures(0.133, 0.5, 0.08, 50.0, 1.0, "RP2040 + CMSIS-NN int8"),
}
DEPTHWISE = "Conv(depthwise)"  # a grouped convolution, costed apart from dense ones
INT8_ONLY = frozenset({"edgetpu", "mcu-cortex-m0", "intel-npu"})


def figures(profile: str) -> DeviceFigures:
    """The table's row for `profile` (an unlisted nvidia-smXY: the nearest lower one)."""
    if profile in FIGURES:
        return FIGURES[profile]
    if profile.startswith("nvidia-sm") and profile[9:].isdigit():
        listed = sorted((int(name[9:]), name) for name in FIGURES if name.startswith("nvidia-sm"))
        lower = [name for sm, name in listed if sm <= int(profile[9:])]
        return FIGURES[lower[-1] if lower else listed[0][1]]
    raise InvalidArgument(f"the cost model has no figures for profile {profile!r}")


def weight_bytes_per_element(profile: str) -> int:
    """Weights are counted at the precision the target runs: int8 on int8-only devices."""
    return 1 if profile in INT8_ONLY else 4


@dataclass(frozen=True)
class GraphCost:
    """One inference at batch 1: arithmetic, memory traffic and the operator count."""

    flops: float
    bytes_moved: float
    operators: int
    parameters: int
    peak_activation_bytes: float  # the largest one operator's inputs and outputs, fp32
    per_operator: list[tuple[str, float, float]]  # (op type, flops, bytes)


@dataclass(frozen=True)
class Estimate:
    profile: str
    latency_ms: float
    energy_mj: float
    memory_mb: float  # the weights and the largest operator's tensors, at the target's precision


def estimate(cost: GraphCost, profile: str) -> Estimate:
    row = figures(profile)
    element = weight_bytes_per_element(profile) / 4  # traffic scales with the precision
    seconds = 0.0
    for kind, flops, moved in cost.per_operator:
        share = row.depthwise_efficiency if kind == DEPTHWISE else row.efficiency
        compute = flops / (row.peak_gflops * 1e9 * min(share, row.efficiency))
        memory = moved * element / (row.bandwidth_gbs * 1e9)
        seconds += max(compute, memory) + row.overhead_us * 1e-6
    resident = (cost.parameters * 4 + cost.peak_activation_bytes) * element
    return Estimate(
        profile=profile,
        latency_ms=seconds * 1e3,
        energy_mj=seconds * row.watts * 1e3,
        memory_mb=resident / 2**20,
    )


def graph_cost(path: Path) -> GraphCost:
    """Count an ONNX classifier's work at batch 1, from its inferred static shapes."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    for tensor in model.graph.input:  # fix the dynamic batch axis to 1
        dims = tensor.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model, strict_mode=True)
    shapes: dict[str, list[int]] = {}
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    initializers = {init.name: list(init.dims) for init in model.graph.initializer}
    shapes.update(initializers)
    parameters = sum(numpy_helper.to_array(init).size for init in model.graph.initializer)
    rows: list[tuple[str, float, float]] = []
    peak_activation = 0.0
    for node in model.graph.node:
        if node.op_type in {"Constant", "Identity", "Shape", "Flatten", "Reshape"}:
            continue  # no arithmetic, and runtimes fold or alias them
        ins = [shapes.get(name, []) for name in node.input if name]
        outs = [shapes.get(name, []) for name in node.output if name]
        moved = 4.0 * (sum(_count(s) for s in ins) + sum(_count(s) for s in outs))
        rows.append((_kind(node), _flops(node, ins, outs), moved))
        names = [n for n in [*node.input, *node.output] if n and n not in initializers]
        tensors = 4.0 * sum(_count(shapes.get(name, [])) for name in names)
        peak_activation = max(peak_activation, tensors)
    return GraphCost(
        flops=sum(row[1] for row in rows),
        bytes_moved=sum(row[2] for row in rows),
        operators=len(rows),
        parameters=int(parameters),
        peak_activation_bytes=peak_activation,
        per_operator=rows,
    )


def _count(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= max(dim, 1)
    return total


def _kind(node: Any) -> str:
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1:
            return DEPTHWISE
    return str(node.op_type)


def _flops(node: Any, ins: list[list[int]], outs: list[list[int]]) -> float:
    out = outs[0] if outs else []
    if node.op_type == "Conv" and len(ins) >= 2:  # dense or grouped: the weight says which
        weight = ins[1]  # [out_channels, in_channels / group, kH, kW]
        per_output = _count(weight[1:])
        return 2.0 * _count(out) * per_output + (_count(out) if len(ins) > 2 else 0)
    if node.op_type in {"Gemm", "MatMul"} and len(ins) >= 2:
        inner = ins[0][-1] if ins[0] else 1
        return 2.0 * _count(out) * inner
    if node.op_type in {"GlobalAveragePool", "ReduceMean", "AveragePool", "MaxPool"}:
        return float(_count(ins[0]) if ins else 0)
    return float(_count(out))  # elementwise: one operation an output
