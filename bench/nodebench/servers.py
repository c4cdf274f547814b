"""The served contenders: a kapi node, NVIDIA Triton and MLServer, each given a repository it
understands that serves the same ONNX files with the same ONNX Runtime settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from tritonpeer import repository as tritonpeer

from nodebench.models import ModelSpec, TensorSpec
from nodebench.process import HOST, ServerCommand, free_ports

MLSERVER_VERSION = "1.7.1"
TRITON_VERSION = "2.51.0"  # the tritonserver that nvidia-pytriton 0.7.0 bundles
TRITON_DEFAULT_VENV = tritonpeer.DEFAULT_VENV
RUNTIME_SOURCE = Path(__file__).with_name("mlserver_onnx.py")
TRITON_SETUP = Path(tritonpeer.__file__).with_name("setup.sh")


@dataclass(frozen=True, slots=True)
class ServingSettings:
    """What every contender shares: ONNX Runtime threads and the batching policy."""

    intra_op_threads: int
    inter_op_threads: int
    max_batch_size: int
    max_queue_delay_us: int
    mlserver_workers: int


@dataclass(frozen=True, slots=True)
class Deployment:
    """One model as a server serves it: how many executions at once (kapi's and Triton's
    instance count, the MLServer runtime's thread pool), with or without the server's
    batching."""

    served_name: str
    spec: ModelSpec
    instances: int
    batching: bool


def kapi_command(
    root: Path, deployments: list[Deployment], settings: ServingSettings
) -> ServerCommand:
    for deployment in deployments:
        version_dir = root / deployment.served_name / "1"
        version_dir.mkdir(parents=True)
        shutil.copyfile(deployment.spec.path, version_dir / "model.onnx")
        config = _config(deployment, settings)
        (root / deployment.served_name / "config.pbtxt").write_text(config)
    ports = free_ports()
    argv = [sys.executable, "-m", "kapi.cli", "node", "--model-repository", str(root)]
    argv += ["--host", HOST, "--grpc-port", str(ports.grpc), "--http-port", str(ports.http)]
    argv += ["--metrics-port", str(ports.metrics), "--log-level", "WARNING"]
    return ServerCommand("kapi", argv, root, root.with_suffix(".log"), ports)


def _config(deployment: Deployment, settings: ServingSettings) -> str:
    """What kapi's and Triton's config.pbtxt share: batching, instances, ORT threads."""
    lines = [f"max_batch_size: {settings.max_batch_size}"]
    if deployment.batching:
        delay = settings.max_queue_delay_us
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {delay} }}")
    lines.append(f"instance_group [{{ count: {deployment.instances} kind: KIND_CPU }}]")
    for key, value in (
        ("intra_op_thread_count", settings.intra_op_threads),
        ("inter_op_thread_count", settings.inter_op_threads),
    ):
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def triton_command(
    root: Path, deployments: list[Deployment], settings: ServingSettings, venv: Path
) -> ServerCommand:
    """tritonserver with every model on its python backend, running the ONNX file with ONNX
    Runtime (`tritonpeer/model.py`). Unlike kapi, the python backend does not read the inputs
    and outputs from the ONNX file: the config declares them."""
    configs = {d.served_name: _triton_io(d.spec) + _config(d, settings) for d in deployments}
    files: dict[str, Path | bytes] = {d.served_name: d.spec.path for d in deployments}
    tritonpeer.write_python_repository(files, root, configs)
    ports = free_ports()
    argv, env = tritonpeer.triton_command(venv, root, ports.grpc, ports.http, ports.metrics)
    return ServerCommand("triton", argv, root, root.with_suffix(".log"), ports, env)


def _triton_io(spec: ModelSpec) -> str:
    def entries(tensors: tuple[TensorSpec, ...]) -> str:
        return ",\n".join(
            f'  {{ name: "{t.name}" data_type: TYPE_{t.datatype} '
            f"dims: [ {', '.join(str(d) for d in t.shape[1:])} ] }}"
            for t in tensors
        )

    return f"input [\n{entries(spec.inputs)}\n]\noutput [\n{entries(spec.outputs)}\n]\n"


def mlserver_command(
    root: Path, deployments: list[Deployment], settings: ServingSettings, venv: Path
) -> ServerCommand:
    root.mkdir(parents=True)
    shutil.copyfile(RUNTIME_SOURCE, root / RUNTIME_SOURCE.name)
    for deployment in deployments:
        model_dir = root / deployment.served_name
        model_dir.mkdir()
        shutil.copyfile(deployment.spec.path, model_dir / "model.onnx")
        model_settings = _mlserver_model_settings(deployment, settings)
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    ports = free_ports()
    server_settings = {
        "debug": False,
        "parallel_workers": settings.mlserver_workers,
        "host": HOST,
        "grpc_port": ports.grpc,
        "http_port": ports.http,
        "metrics_port": ports.metrics,
    }
    (root / "settings.json").write_text(json.dumps(server_settings, indent=2))
    argv = [str(venv / "bin" / "mlserver"), "start", "."]
    return ServerCommand("mlserver", argv, root, root.with_suffix(".log"), ports)


def _mlserver_model_settings(
    deployment: Deployment, settings: ServingSettings
) -> dict[str, object]:
    model_settings: dict[str, object] = {
        "name": deployment.served_name,
        "implementation": f"{RUNTIME_SOURCE.stem}.OnnxModel",
        "parameters": {
            "uri": "./model.onnx",
            "extra": {
                "intra_op_num_threads": settings.intra_op_threads,
                "inter_op_num_threads": settings.inter_op_threads,
                "instances": deployment.instances,
            },
        },
    }
    if deployment.batching:  # MLServer's adaptive batching: its dynamic batcher
        model_settings["max_batch_size"] = settings.max_batch_size
        model_settings["max_batch_time"] = settings.max_queue_delay_us / 1e6
    return model_settings


def ensure_mlserver(venv: Path) -> None:
    """MLServer in its own virtual environment (its pins clash with kapi's), with the same
    onnxruntime as the in-process contender. uvloop 0.22 breaks MLServer 1.7.1's start."""
    requirements = [
        f"mlserver=={MLSERVER_VERSION}",
        "uvloop<0.22",
        f"onnxruntime=={version('onnxruntime')}",
    ]
    marker = venv / ".bench-requirements"
    if marker.exists() and marker.read_text() == "\n".join(requirements):
        return
    print(f"installing {' '.join(requirements)} into {venv} ...", flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *requirements], check=True)
    marker.write_text("\n".join(requirements))


def ensure_triton(venv: Path) -> None:
    """Triton in its own virtual environment (`tritonpeer/setup.sh`: nvidia-pytriton, which
    bundles tritonserver, needs numpy<2), with the same onnxruntime as the in-process
    contender. A no-op, half a second, once installed."""
    env = {**os.environ, "KAPI_TRITON_VENV": str(venv)}
    env["KAPI_TRITON_ONNXRUNTIME"] = version("onnxruntime")
    subprocess.run(["bash", str(TRITON_SETUP)], check=True, env=env, stdout=subprocess.DEVNULL)
