"""A `kapi train` bundle pushed into a real `kapi repository serve` with `kapi push MODEL
BUNDLE`: a new version with the bundle's lineage and metrics, and its ONNX model as the
baseline CPU variant, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kapi.repository import entities as ent
from kapi.repository.client import RepositoryClient, sha256_file
from kapi.trainer.data.sources import open_source
from kapi.trainer.data.store import DatasetStore

from tests.conftest import RepositoryFactory
from tests.support.node import KAPI
from tests.support.registry import RunningRepository


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    DatasetStore(root).ingest("digits", open_source("sklearn-digits").load())
    return root


@pytest.fixture(scope="module")
def bundle(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    command = [str(KAPI), "train", "--dataset", "digits", "--model", "small_cnn", "--width"]
    command += ["0.25", "--epochs", "1", "--root", str(root), "--out", str(out), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return out / "bundle"


@pytest.fixture
def repository(tmp_path: Path, start_kapi_repository: RepositoryFactory) -> RunningRepository:
    return start_kapi_repository(tmp_path / "registry")


def push(repository: RunningRepository, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAPI_REPOSITORY_URL": repository.url,
        "KAPI_TOKEN": repository.admin_token,
    }
    return subprocess.run(
        [str(KAPI), "push", *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_bundle_becomes_a_version_with_its_lineage(
    bundle: Path, repository: RunningRepository, tmp_path: Path
) -> None:
    for number in (1, 2):
        done = push(repository, "digits", bundle, "--json")
        assert done.returncode == 0, done.stderr
        pushed = json.loads(done.stdout)
        assert pushed["version"] == number
        assert (pushed["runtime"], pushed["precision"], pushed["profile"]) == (
            "onnxruntime",
            "fp32",
            "cpu-x86_64",
        )
        assert pushed["digest"] == sha256_file(bundle / "model.onnx")
    with RepositoryClient(repository.url, repository.admin_token) as client:
        model = client.model("digits")
        signature = json.loads((bundle / "signature.json").read_text())
        assert model.signature is not None
        assert model.signature.model_dump(mode="json", exclude_none=True) == signature
        assert model.description == "small_cnn trained on digits by kapi train"
        version = client.version("digits", 1)
        lineage = json.loads((bundle / "lineage.json").read_text())
        assert version.lineage["dataset"] == lineage["dataset"]
        assert version.lineage["config"] == lineage["config"]
        assert version.lineage["code_version"] == lineage["code_version"]
        preprocessing = json.loads((bundle / "preprocessing.json").read_text())
        assert version.lineage["preprocessing"] == preprocessing
        assert version.lineage["labels"] == (bundle / "labels.txt").read_text().splitlines()
        metrics = json.loads((bundle / "metrics.json").read_text())
        assert version.metrics["test_accuracy"] == metrics["test_accuracy"]
        assert "history" not in version.metrics
        pulled = tmp_path / "pulled.onnx"
        key = ("onnxruntime", "fp32", "cpu-x86_64")
        client.download("digits", 1, key, pulled, sha256_file(bundle / "model.onnx"))
        assert pulled.read_bytes() == (bundle / "model.onnx").read_bytes()


def test_what_is_not_a_bundle_or_does_not_fit_is_refused(
    bundle: Path, repository: RunningRepository, tmp_path: Path
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "lineage.json").write_text("{}")
    done = push(repository, "digits", folder)
    assert done.returncode == 1
    assert "is not a kapi bundle: it lacks ['model.onnx', 'signature.json'" in done.stderr
    done = push(repository, "digits", tmp_path)  # a folder, no --runtime, no lineage
    assert done.returncode == 1
    assert "--runtime and --profile are required" in done.stderr
    done = push(repository, "digits", bundle, "--version", "1")
    assert done.returncode == 1
    assert "drop --version" in done.stderr
    other = dict(json.loads((bundle / "signature.json").read_text()))
    other["outputs"] = [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    with RepositoryClient(repository.url, repository.admin_token) as client:
        client.create_model(ent.ModelCreate(name="taken", signature=ent.Signature(**other)))
    done = push(repository, "taken", bundle)
    assert done.returncode == 1
    assert "exists with another signature" in done.stderr
    spec = tmp_path / "requirements.yaml"
    spec.write_text("model: digits\ntask: classification\n")
    assert push(repository, "digits", bundle).returncode == 0  # no requirements: it joins
    done = push(repository, "digits", bundle, "--requirements", spec)
    assert done.returncode == 1
    assert "exists with other requirements" in done.stderr
    with RepositoryClient(repository.url, repository.admin_token) as client:
        assert client.versions("taken") == []  # nothing was created


def test_kapi_train_push_trains_and_pushes_in_one_command(
    root: Path, repository: RunningRepository, tmp_path: Path
) -> None:
    env = {**os.environ, "KAPI_TOKEN": repository.admin_token}
    command = [str(KAPI), "train", "--dataset", "digits", "--model", "small_cnn", "--width"]
    command += ["0.25", "--epochs", "1", "--root", str(root), "--out", str(tmp_path / "run")]
    command += ["--no-progress", "--push", "trained", "--repository", repository.url, "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["pushed"]["model"] == "trained"
    assert printed["pushed"]["version"] == 1
    assert printed["pushed"]["digest"] == sha256_file(tmp_path / "run" / "bundle" / "model.onnx")
    with RepositoryClient(repository.url, repository.admin_token) as client:
        version = client.version("trained", 1)
        assert version.metrics["test_accuracy"] == printed["test_accuracy"]


def test_a_push_that_cannot_happen_is_refused_before_training(
    root: Path, tmp_path: Path, unused_port: Any
) -> None:
    command = [str(KAPI), "train", "--dataset", "digits", "--model", "small_cnn", "--root"]
    command += [str(root), "--out", str(tmp_path / "run"), "--push", "m", "--repository"]
    command += [f"http://127.0.0.1:{unused_port()}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "cannot be reached" in done.stderr
    assert "epoch" not in done.stdout  # refused before the first epoch
    assert not (tmp_path / "run" / "bundle").exists()
