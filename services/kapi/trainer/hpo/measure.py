"""Timing an ONNX model on a runtime that is here: latency at batch 1, peak memory and, where
the RAPL counters are readable, energy per inference.

Each measurement runs in a fresh Python process (`python -m kapi.trainer.hpo.measure`), so the
peak resident memory it reports is the model's and the runtime's alone (VmHWM after the run
less VmRSS before the session), and the trainer's threads and memory do not disturb it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kapi.core.errors import FailedPrecondition, InvalidArgument

RUNTIMES = ("onnxruntime", "openvino")
RAPL = Path("/sys/class/powercap")
TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Measurement:
    runtime: str
    threads: int
    runs: int
    latency_p50_ms: float
    latency_p95_ms: float
    peak_memory_mb: float
    energy_mj: float | None  # per inference, from RAPL; None where it is not readable
    energy_source: str  # "rapl:<zones>" or "unavailable"
    batch: int = 1  # samples per timed call


def runtime_present(runtime: str) -> bool:
    if runtime not in RUNTIMES:
        raise InvalidArgument(f"unknown runtime {runtime!r}; kapi times {list(RUNTIMES)}")
    import importlib.util

    return importlib.util.find_spec(runtime) is not None


def measure(
    model: Path,
    runtime: str = "onnxruntime",
    *,
    threads: int = 1,
    runs: int = 200,
    batch: int = 1,
) -> Measurement:
    """Time `model` (ONNX, or OpenVINO IR's model.xml; input "input", output "logits") at
    `batch` in a fresh process."""
    if not runtime_present(runtime):
        raise FailedPrecondition(f"runtime {runtime} is not installed here")
    command = [sys.executable, "-m", "kapi.trainer.hpo.measure", str(model)]
    command += ["--runtime", runtime, "--threads", str(threads), "--runs", str(runs)]
    command += ["--batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise FailedPrecondition(f"timing {model.name} on {runtime} failed: {tail[0]}")
    return Measurement(**json.loads(done.stdout))


def best_throughput(
    model: Path,
    runtime: str = "onnxruntime",
    *,
    runs: int = 200,
    batches: tuple[int, ...] = (1, 8, 32),
) -> tuple[float, int]:
    """(inferences per second, the batch that gave them): the best over `batches`, with every
    core, each in a fresh process."""
    best = (0.0, 0)
    threads = os.cpu_count() or 1
    for batch in batches:
        timed = measure(model, runtime, threads=threads, runs=max(20, runs // batch), batch=batch)
        best = max(best, (batch * 1e3 / timed.latency_p50_ms, batch))
    return best


def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rapl_zones() -> list[Path]:
    """The package-level energy counters that can be read (intel-rapl:N, not sub-zones)."""
    zones = []
    for zone in sorted(RAPL.glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and os.access(zone / "energy_uj", os.R_OK):
            zones.append(zone)
    return zones


def _energy_uj(zones: list[Path]) -> float:
    return sum(float((zone / "energy_uj").read_text()) for zone in zones)


def _session(model: Path, runtime: str, threads: int) -> Any:
    if runtime == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )
        return lambda x: session.run(["logits"], {"input": x})
    import openvino

    compiled = openvino.Core().compile_model(
        str(model),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",  # as the node serves it, not bf16 where it could
        },
    )
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def _input_shape(model: Path, batch: int) -> list[int]:
    if model.suffix == ".xml":  # OpenVINO IR
        import openvino

        shape = openvino.Core().read_model(str(model)).inputs[0].get_partial_shape()
        return [batch, *(dim.get_length() for dim in list(shape)[1:])]
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    return [batch, *(d.dim_value for d in dims[1:])]


def _run(model: Path, runtime: str, threads: int, runs: int, batch: int = 1) -> Measurement:
    import onnx  # noqa: F401 - imported before the baseline, as the runtime's own imports are

    if runtime == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        import openvino  # noqa: F401
    baseline_kb = _status_kb("VmRSS")
    x = np.random.default_rng(0).standard_normal(_input_shape(model, batch)).astype(np.float32)
    infer = _session(model, runtime, threads)
    for _ in range(max(10, runs // 10)):
        infer(x)
    zones = rapl_zones()
    energy_before = _energy_uj(zones) if zones else 0.0
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        infer(x)
        times.append(time.perf_counter() - started)
    energy = (_energy_uj(zones) - energy_before) / runs / 1e3 if zones else None
    if energy is not None and energy < 0:  # the counter wrapped
        energy = None
    peak_kb = _status_kb("VmHWM")
    return Measurement(
        runtime=runtime,
        threads=threads,
        runs=runs,
        latency_p50_ms=float(np.percentile(times, 50) * 1e3),
        latency_p95_ms=float(np.percentile(times, 95) * 1e3),
        peak_memory_mb=max(peak_kb - baseline_kb, 0.0) / 1024,
        energy_mj=energy,
        energy_source="rapl:" + ",".join(z.name for z in zones) if zones else "unavailable",
        batch=batch,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    measured = _run(args.model, args.runtime, args.threads, args.runs, args.batch)
    print(json.dumps(asdict(measured)))


if __name__ == "__main__":
    main()
