"""The served contenders: a kapi node and MLServer, each given a repository it understands
that serves the same ONNX files with the same ONNX Runtime settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from nodebench.models import ModelSpec
from nodebench.process import HOST, ServerCommand, free_ports

MLSERVER_VERSION = "1.7.1"
RUNTIME_SOURCE = Path(__file__).with_name("mlserver_onnx.py")


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
    """One model as a server serves it: how many executions at once (kapi's instance count,
    the MLServer runtime's thread pool), with or without the server's batching."""

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
        config = _kapi_config(deployment, settings)
        (root / deployment.served_name / "config.pbtxt").write_text(config)
    ports = free_ports()
    argv = [sys.executable, "-m", "kapi.cli", "node", "--model-repository", str(root)]
    argv += ["--host", HOST, "--grpc-port", str(ports.grpc), "--http-port", str(ports.http)]
    argv += ["--metrics-port", str(ports.metrics), "--log-level", "WARNING"]
    return ServerCommand("kapi", argv, root, root.with_suffix(".log"), ports)


def _kapi_config(deployment: Deployment, settings: ServingSettings) -> str:
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
