"""A real NVIDIA Triton Inference Server 2.51.0 as a benchmark peer, on CPU, with ONNX models
served through Triton's python backend running ONNX Runtime (`model.py` beside this file).

Setup, once per machine (idempotent, needs only PyPI):

    bash bench/tritonpeer/setup.sh      # venv at $KAPI_TRITON_VENV, default /opt/kapi-triton/venv

It installs the `nvidia-pytriton` wheel, which bundles the `tritonserver` binary, its libraries
and the python backend, into a venv of its own (the wheel needs numpy<2), with `onnxruntime`,
and puts the venv's python backend stub where the backend looks for it.

Then, from any Python (this module needs only the standard library):

    root = write_python_repository({"m": onnx_path}, Path("/tmp/repo"), {"m": config_text})
    argv, env = triton_command(venv, root, grpc_port=8001, http_port=8000, metrics_port=8002)
    subprocess.Popen(argv, env=env)

`env` puts the venv interpreter's LIBDIR first on LD_LIBRARY_PATH (the stub links
libpython3.11.so, and would otherwise find the system's) and the venv's bin first on PATH: the
stub's embedded interpreter ignores PYTHONPATH and finds its prefix, so the venv's
site-packages, through the `python3` it finds on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

MODEL_PY = Path(__file__).with_name("model.py")
DEFAULT_VENV = Path(os.environ.get("KAPI_TRITON_VENV", "/opt/kapi-triton/venv"))


def write_python_repository(
    onnx_models: dict[str, Path | bytes], root: Path, configs: dict[str, str]
) -> Path:
    """Lay out `root/<name>/config.pbtxt`, `root/<name>/1/model.py` and `root/<name>/1/model.onnx`
    for each model. `configs[name]` is the config text past `name` and `backend` (inputs,
    outputs, max_batch_size, dynamic_batching, instance_group, parameters)."""
    for name, model in onnx_models.items():
        version = root / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        header = f'name: "{name}"\nbackend: "python"\n'
        (root / name / "config.pbtxt").write_text(header + configs[name])
        shutil.copyfile(MODEL_PY, version / "model.py")
        if isinstance(model, bytes):
            (version / "model.onnx").write_bytes(model)
        else:
            shutil.copyfile(model, version / "model.onnx")
    return root


def triton_command(
    venv: Path,
    repository: Path,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    extra_args: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start the venv's tritonserver on `repository`, listening on
    loopback only. The python backend's shared-memory regions (/dev/shm, one per instance) are
    named after the gRPC port, so that a crashed server's leftovers are easy to tell apart."""
    python = str(venv / "bin" / "python")
    script = (
        "import pathlib, sysconfig, pytriton;"
        "print(pathlib.Path(pytriton.__file__).parent / 'tritonserver');"
        "print(sysconfig.get_config_var('LIBDIR'))"
    )
    lines = subprocess.run([python, "-c", script], check=True, capture_output=True, text=True)
    dist, libdir = lines.stdout.splitlines()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(venv / "bin"), env.get("PATH")]))
    argv = [
        f"{dist}/bin/tritonserver",
        f"--model-repository={repository}",
        f"--backend-directory={dist}/backends",
        f"--cache-directory={dist}/caches",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        "--grpc-address=127.0.0.1",
        "--http-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--allow-gpu-metrics=false",
        f"--backend-config=python,shm-region-prefix-name=kapi-triton-{grpc_port}",
        *extra_args,
    ]
    return argv, env
