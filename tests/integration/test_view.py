"""`kapi view`: Netron serving an artifact on a local port, from a path and from the
repository (MODEL:VERSION:VARIANT, downloaded with its digest checked)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kapi.trainer.bundle import export_onnx
from kapi.trainer.models import build

from tests.conftest import RepositoryFactory
from tests.support.node import KAPI, free_port


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    export_onnx(build("small_cnn", in_channels=1, num_classes=10, width=0.25), [1, 8, 8], path)
    return path


def _viewing(*args: str | Path, env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    command = [str(KAPI), "view", *map(str, args), "--port", str(port)]
    environment = {**os.environ, **(env or {})}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert f"http://127.0.0.1:{port}" in line, line
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=30)


def _shows(url: str, name: str, content: bytes) -> None:
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 200
    assert "netron" in page.text.lower()
    assert f'content="/data/{name}"' in page.text
    assert httpx.get(f"{url}/data/{name}", timeout=10).content == content


def test_a_file_is_shown_in_netron(model: Path) -> None:
    for url in _viewing(model):
        _shows(url, "model.onnx", model.read_bytes())


def test_a_repository_variant_is_downloaded_and_shown(
    model: Path, tmp_path: Path, start_kapi_repository: RepositoryFactory
) -> None:
    repository = start_kapi_repository(tmp_path / "registry")
    env = {"KAPI_REPOSITORY_URL": repository.url, "KAPI_TOKEN": repository.admin_token}
    signature = tmp_path / "signature.json"
    signature.write_text(
        '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],'
        ' "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],'
        ' "max_batch_size": 8}'
    )
    push = [str(KAPI), "push", "cnn", str(model), "--runtime", "onnxruntime"]
    push += ["--profile", "cpu-x86_64-avx2", "--signature", str(signature)]
    subprocess.run(push, check=True, capture_output=True, env={**os.environ, **env}, timeout=60)
    for url in _viewing("cnn:1:onnxruntime/fp32/cpu-x86_64-avx2", env=env):
        _shows(url, "model.onnx", model.read_bytes())
    missing = subprocess.run(
        [str(KAPI), "view", "cnn:1:openvino/int8/cpu-x86_64-avx2"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert missing.returncode == 1
    assert "has no variant 'openvino/int8/cpu-x86_64-avx2'" in missing.stderr
