"""The repository's commands as a user runs them (`kapi push`, `models`, `versions`,
`promote`, `pull`, `repository export`), against a real `kapi repository serve`; what they
write is served by a real node. Also the service on PostgreSQL and an S3-compatible server."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from kapi.repository.client import sha256_file

from tests.conftest import RepositoryFactory
from tests.support.models import add_constant_model
from tests.support.node import KAPI, NodeFactory
from tests.support.registry import RunningRepository
from tests.support.s3 import (
    ACCESS_KEY_ID,
    REGION,
    SECRET_ACCESS_KEY,
    create_bucket,
    running_s3_server,
)

SIGNATURE = {
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]}],
    "max_batch_size": 8,
}


def kapi(
    env: Mapping[str, str], *args: str | Path, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(KAPI), *map(str, args)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def env_of(repository: RunningRepository) -> dict[str, str]:
    return {"KAPI_REPOSITORY_URL": repository.url, "KAPI_TOKEN": repository.admin_token}


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for constant in (1.0, 2.0):
        path = tmp_path / f"add{int(constant)}.onnx"
        path.write_bytes(add_constant_model(constant).SerializeToString())
        files[f"add{int(constant)}"] = path
    signature = tmp_path / "signature.json"
    signature.write_text(json.dumps(SIGNATURE))
    files["signature"] = signature
    return files


@pytest.fixture
def repository(tmp_path: Path, start_kapi_repository: RepositoryFactory) -> RunningRepository:
    return start_kapi_repository(tmp_path / "data")


def push(
    env: Mapping[str, str], model: str, artifact: Path, *flags: str | Path
) -> dict[str, object]:
    done = kapi(env, "push", model, artifact, "--runtime", "onnxruntime", "--profile",
                "cpu-x86_64", "--json", *flags)  # fmt: skip
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_push_creates_the_model_and_numbers_versions(
    repository: RunningRepository, artifacts: dict[str, Path]
) -> None:
    env = env_of(repository)
    first = push(env, "addone", artifacts["add1"], "--signature", artifacts["signature"])
    second = push(env, "addone", artifacts["add2"])
    assert (first["version"], second["version"]) == (1, 2)
    assert first["digest"] != second["digest"]
    models = kapi(env, "models").stdout.splitlines()
    assert models[0].split() == ["MODEL", "LATEST", "ALIASES", "DESCRIPTION"]
    assert models[1].split()[:3] == ["addone", "2", "-"]
    listed = json.loads(kapi(env, "versions", "addone", "--json").stdout)
    assert [v["number"] for v in listed] == [1, 2]
    assert listed[0]["variants"][0]["runtime"] == "onnxruntime"
    table = kapi(env, "versions", "addone").stdout
    assert "onnxruntime/fp32/cpu-x86_64" in table


def test_a_directory_is_pushed_as_a_tar_variant(
    repository: RunningRepository, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    env = env_of(repository)
    push(env, "addone", artifacts["add1"])
    directory = tmp_path / "ir"
    (directory / "sub").mkdir(parents=True)
    (directory / "model.xml").write_text("<xml/>")
    (directory / "sub" / "weights.bin").write_bytes(b"\0" * 100)
    done = kapi(env, "push", "addone", directory, "--version", "1", "--runtime", "openvino",
                "--profile", "cpu-x86_64", "--json")  # fmt: skip
    assert json.loads(done.stdout)["format"] == "tar"


def test_promote_needs_verification_or_force(
    repository: RunningRepository, artifacts: dict[str, Path]
) -> None:
    env = env_of(repository)
    push(env, "addone", artifacts["add1"])
    refused = kapi(env, "promote", "addone", "1", ok=False)
    assert refused.returncode == 1
    assert "no variant with a passing verification report" in refused.stderr
    assert "Traceback" not in refused.stderr
    kapi(env, "promote", "addone", "1", "--force")
    push(env, "addone", artifacts["add2"])
    stale = kapi(env, "promote", "addone", "2", "--force", "--expected-version", "7", ok=False)
    assert "not at the version 7" in stale.stderr
    moved = kapi(env, "promote", "addone", "2", "--alias", "staging", "--json")
    assert json.loads(moved.stdout)["aliases"] == {"production": 1, "staging": 2}


def test_a_report_attached_with_push_lets_production_move(
    repository: RunningRepository, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    env = env_of(repository)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"passed": True, "digest": sha256_file(artifacts["add1"])}))
    pushed = push(env, "addone", artifacts["add1"], "--report", report)
    assert pushed["verified"] is True
    kapi(env, "promote", "addone", "1")


def test_without_a_token_push_is_refused(
    repository: RunningRepository, artifacts: dict[str, Path]
) -> None:
    done = kapi({"KAPI_REPOSITORY_URL": repository.url, "KAPI_TOKEN": ""}, "push", "addone",
                artifacts["add1"], "--runtime", "onnxruntime", "--profile", "cpu-x86_64",
                ok=False)  # fmt: skip
    assert done.returncode == 1
    assert "writes need a bearer token (HTTP 401)" in done.stderr


def test_pull_and_export_write_a_layout_a_node_serves(
    repository: RunningRepository,
    artifacts: dict[str, Path],
    tmp_path: Path,
    start_kapi_node: NodeFactory,
) -> None:
    env = env_of(repository)
    push(env, "addone", artifacts["add1"], "--signature", artifacts["signature"])
    push(env, "addtwo", artifacts["add2"])
    push(env, "addtwo", artifacts["add1"])
    kapi(env, "promote", "addone", "1", "--force")
    kapi(env, "promote", "addtwo", "1", "--force")  # production: not the latest

    exported = tmp_path / "export"
    rows = kapi(env, "repository", "export", "--alias", "production", exported).stdout
    assert "addone" in rows
    assert sorted(p.name for p in exported.iterdir()) == ["addone", "addtwo"]
    config = (exported / "addone" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config
    assert "max_batch_size: 8" in config
    assert (exported / "addtwo" / "1" / "model.onnx").is_file()

    pulled = tmp_path / "pulled"
    kapi(env, "pull", "addtwo@2", pulled, "--profile", "cpu-x86_64")
    assert (pulled / "addtwo" / "2" / "model.onnx").read_bytes() == artifacts["add1"].read_bytes()
    assert sorted(p.name for p in pulled.iterdir()) == ["addtwo"]  # no download leftovers

    node = start_kapi_node(exported)
    client = grpcclient.InferenceServerClient(node.grpc_url)
    row = np.ones((1, 4), dtype=np.float32)
    for model, constant in (("addone", 1.0), ("addtwo", 2.0)):
        tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(row)
        output = client.infer(model, [tensor]).as_numpy("OUTPUT0")
        assert output is not None
        np.testing.assert_allclose(output, row + constant)


def test_an_export_after_a_rollback_serves_the_rolled_back_version(
    repository: RunningRepository, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    env = env_of(repository)
    push(env, "addone", artifacts["add1"])
    push(env, "addone", artifacts["add2"])
    exported = tmp_path / "export"
    kapi(env, "promote", "addone", "2", "--force")
    kapi(env, "repository", "export", exported)
    kapi(env, "promote", "addone", "1", "--force")
    kapi(env, "repository", "export", exported)
    assert sorted(p.name for p in (exported / "addone").iterdir()) == ["1", "config.pbtxt"]


def test_a_bad_tokens_file_is_one_line_that_shows_no_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps([{"name": "ci", "token": "shortsecret1", "scope": "write"}]))
    done = kapi({}, "repository", "serve", "--data", tmp_path / "data", "--port", "0",
                "--tokens-file", tokens, ok=False)  # fmt: skip
    assert done.returncode == 1
    assert "at least 16 characters" in done.stderr
    assert "shortsecret1" not in done.stderr
    assert "Traceback" not in done.stderr
    env_tokens = kapi({"KAPI_REPOSITORY_TOKENS": '[{"name": "x", "token": "tiny-secret"}]'},
                      "repository", "serve", "--data", tmp_path / "data", ok=False)  # fmt: skip
    assert env_tokens.returncode == 2
    assert "tiny-secret" not in env_tokens.stderr


def test_a_push_repeats_what_a_model_is_and_never_changes_it(
    repository: RunningRepository, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    env = env_of(repository)
    push(env, "addone", artifacts["add1"], "--signature", artifacts["signature"])
    push(env, "addone", artifacts["add2"], "--signature", artifacts["signature"])  # the same
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**SIGNATURE, "max_batch_size": 2}))
    changed = kapi(env, "push", "addone", artifacts["add1"], "--runtime", "onnxruntime",
                   "--profile", "cpu-x86_64", "--signature", other, ok=False)  # fmt: skip
    assert changed.returncode == 1
    assert "exists with another signature" in changed.stderr
    lineage = tmp_path / "lineage.json"
    lineage.write_text("{}")
    joined = kapi(env, "push", "addone", artifacts["add1"], "--runtime", "openvino",
                  "--profile", "cpu-x86_64", "--version", "1", "--lineage", lineage,
                  ok=False)  # fmt: skip
    assert "with --version the variant joins a version" in joined.stderr
    assert [v["number"] for v in json.loads(kapi(env, "versions", "addone", "--json").stdout)] == [
        1,
        2,
    ]


def test_pull_of_an_unknown_model_is_one_clear_line(repository: RunningRepository) -> None:
    done = kapi(env_of(repository), "pull", "nosuch@production", "/tmp/x", ok=False)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "kapi pull: error: model 'nosuch' is not in the repository (HTTP 404)"
    )


def test_the_service_runs_on_postgresql_and_s3(
    tmp_path: Path,
    postgres_database: str,
    start_kapi_repository: RepositoryFactory,
    artifacts: dict[str, Path],
) -> None:
    aws = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }
    with running_s3_server(tmp_path / "s3.log") as endpoint:
        create_bucket(endpoint, "models")
        repository = start_kapi_repository(
            tmp_path / "data",
            database=postgres_database,
            blobs="s3://models/kapi",
            env={**aws, "AWS_ENDPOINT_URL": endpoint},
        )
        env = env_of(repository)
        pushed = push(env, "addone", artifacts["add1"])
        assert not (tmp_path / "data" / "blobs" / "sha256").exists()  # the bytes are in S3
        pulled = tmp_path / "pulled"
        kapi(env, "pull", "addone@1", pulled, "--profile", "cpu-x86_64")
        assert (pulled / "addone" / "1" / "model.onnx").read_bytes() == artifacts[
            "add1"
        ].read_bytes()
        assert str(pushed["digest"]).startswith("sha256:")
        assert "postgresql" in repository.log()
