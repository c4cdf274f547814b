"""Training and its bundle: small_cnn learns scikit-learn's digits, seeded runs repeat
exactly, early stopping and resuming behave, and the bundle is whole (ONNX agreeing with
PyTorch) or not there at all."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from kapi.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from kapi.repository.entities import Signature
from kapi.trainer import training
from kapi.trainer.bundle import write_bundle
from kapi.trainer.data.sources import open_source
from kapi.trainer.data.store import DatasetStore
from kapi.trainer.training import Result, TrainConfig, train

from tests.support.node import KAPI

BUNDLE_FILES = {
    "model.onnx",
    "signature.json",
    "preprocessing.json",
    "labels.txt",
    "metrics.json",
    "lineage.json",
    "state_dict.pt",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    store = DatasetStore(tmp_path_factory.mktemp("data"))
    store.ingest("digits", open_source("sklearn-digits").load())
    return store


@pytest.fixture(scope="module")
def trained(store: DatasetStore, tmp_path_factory: pytest.TempPathFactory) -> Result:
    return train(_config(epochs=3), store, tmp_path_factory.mktemp("run"), progress=False)


def _config(**overrides: Any) -> TrainConfig:
    return TrainConfig(**{"dataset": "digits", "model": "small_cnn", "threads": 2, **overrides})


def _figures(result: Result) -> list[dict[str, float]]:
    """The history without its timings, which no two runs share."""
    return [m.model_dump(exclude={"seconds", "samples_per_second"}) for m in result.history]


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    one, two = first.state_dict(), second.state_dict()
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


# training


def test_small_cnn_learns_digits(trained: Result) -> None:
    assert len(trained.history) == 3
    assert trained.test_accuracy > 0.9  # chance is 0.1
    assert trained.best_val_accuracy == max(m.val_accuracy for m in trained.history)
    assert trained.history[-1].train_loss < trained.history[0].train_loss
    assert trained.input_shape == [1, 8, 8]
    assert trained.num_classes == 10


def test_the_same_seed_gives_the_same_run(store: DatasetStore, tmp_path: Path) -> None:
    first = train(_config(epochs=2), store, tmp_path / "a", progress=False)
    second = train(_config(epochs=2), store, tmp_path / "b", progress=False)
    other = train(_config(epochs=2, seed=1), store, tmp_path / "c", progress=False)
    assert _figures(first) == _figures(second)
    assert _same_weights(first.model, second.model)
    assert not _same_weights(first.model, other.model)


def test_training_stops_when_val_accuracy_stops_improving(
    store: DatasetStore, tmp_path: Path
) -> None:
    result = train(_config(epochs=20, lr=0.0, patience=2), store, tmp_path, progress=False)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2 < 20


def test_a_resumed_run_equals_an_uninterrupted_one(store: DatasetStore, tmp_path: Path) -> None:
    straight = train(_config(epochs=4), store, tmp_path / "straight", progress=False)
    train(_config(epochs=2), store, tmp_path / "resumed", progress=False)
    resumed = train(_config(epochs=4), store, tmp_path / "resumed", progress=False, resume=True)
    assert [m.epoch for m in resumed.history] == [1, 2, 3, 4]
    assert _figures(resumed) == _figures(straight)
    assert resumed.test_accuracy == straight.test_accuracy
    assert _same_weights(resumed.model, straight.model)


def test_resuming_needs_a_checkpoint_of_the_same_run(store: DatasetStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no checkpoint"):
        train(_config(epochs=1), store, tmp_path, progress=False, resume=True)
    train(_config(epochs=1), store, tmp_path, progress=False)
    with pytest.raises(FailedPrecondition, match="lr"):
        train(_config(epochs=2, lr=0.01), store, tmp_path, progress=False, resume=True)


def test_a_last_batch_of_one_does_not_stop_a_batch_norm_model(
    store: DatasetStore, tmp_path: Path
) -> None:
    """1,437 training digits in batches of 1,436 leave one: mobilenet_v2 on 8x8 reaches 1x1
    before a batch norm, which cannot train on one sample."""
    config = _config(model="mobilenet_v2", width=0.25, epochs=1, batch_size=1436)
    result = train(config, store, tmp_path / "run", progress=False)
    assert len(result.history) == 1


def test_an_unknown_architecture_is_refused_with_the_zoo(
    store: DatasetStore, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match="small_cnn"):
        train(_config(model="no_such_net"), store, tmp_path, progress=False)


# the bundle


def test_the_bundle_holds_everything(trained: Result, store: DatasetStore, tmp_path: Path) -> None:
    dataset = store.get("digits")
    bundle = write_bundle(trained, dataset, _config(epochs=3), tmp_path / "bundle")
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging left behind
    signature = Signature.model_validate_json((bundle / "signature.json").read_text())
    assert signature.inputs[0].shape == [-1, 1, 8, 8]
    assert signature.outputs[0].shape == [-1, 10]
    assert (bundle / "labels.txt").read_text().split() == dataset.classes
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["test_accuracy"] == trained.test_accuracy
    assert metrics["epochs_run"] == len(metrics["history"]) == 3
    lineage = json.loads((bundle / "lineage.json").read_text())
    assert lineage["dataset"] == {"name": "digits", "digest": dataset.digest}
    assert lineage["config"]["model"] == "small_cnn"
    assert lineage["hpo"] is None
    assert lineage["code_version"]
    preprocessing = json.loads((bundle / "preprocessing.json").read_text())
    assert preprocessing == dataset.preprocessing.model_dump(mode="json")


def test_onnxruntime_predicts_what_torch_does(
    trained: Result, store: DatasetStore, tmp_path: Path
) -> None:
    dataset = store.get("digits")
    bundle = write_bundle(trained, dataset, _config(epochs=3), tmp_path / "bundle")
    x, _ = dataset.split("test")
    inputs = dataset.preprocessing.apply(x)
    session = onnxruntime.InferenceSession(
        str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(["logits"], {"input": inputs})
    with torch.no_grad():
        expected = trained.model(torch.from_numpy(inputs)).numpy()
    assert logits.shape == (len(x), 10)
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))


def test_a_failed_write_leaves_nothing(
    trained: Result, store: DatasetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("export failed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="export failed"):
        write_bundle(trained, store.get("digits"), _config(), tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_is_written_once(trained: Result, store: DatasetStore, tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    with pytest.raises(AlreadyExists):
        write_bundle(trained, store.get("digits"), _config(), tmp_path / "bundle")


# the command


def test_kapi_train_end_to_end(store: DatasetStore, tmp_path: Path) -> None:
    command = [str(KAPI), "train", "--dataset", "digits", "--model", "small_cnn"]
    command += ["--root", str(store.root), "--out", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(
        [*command, "--epochs", "2"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("epoch   1/2")
    assert lines[-2].startswith("test accuracy ")
    assert lines[-1] == f"bundle {tmp_path / 'run' / 'bundle'}"
    assert {p.name for p in (tmp_path / "run" / "bundle").iterdir()} == BUNDLE_FILES


def test_kapi_train_errors_in_one_line(store: DatasetStore, tmp_path: Path) -> None:
    command = [str(KAPI), "train", "--dataset", "digits", "--model", "no_such_net"]
    command += ["--root", str(store.root), "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("kapi train: error: unknown model 'no_such_net'")
    assert len(done.stderr.splitlines()) == 1


def test_train_samples_trains_on_a_stratified_subset(store: DatasetStore, tmp_path: Path) -> None:
    dataset = store.get("digits")
    _, _, split = dataset.arrays()
    config = TrainConfig(dataset="digits", model="small_cnn", epochs=1, train_samples=200)
    splits = training._load_splits(dataset, torch.device("cpu"), 200, 0)
    assert len(splits.y["train"]) == 200
    assert len(splits.y["val"]) == int((split == "val").sum())  # val and test stay whole
    assert len(splits.y["test"]) == int((split == "test").sum())
    counts = np.bincount(splits.y["train"].numpy(), minlength=10)
    assert counts.min() >= 18  # every class in its share
    assert counts.max() <= 22
    again = training._load_splits(dataset, torch.device("cpu"), 200, 0)
    assert torch.equal(splits.x["train"], again.x["train"])  # seeded
    other = training._load_splits(dataset, torch.device("cpu"), 200, 1)
    assert not torch.equal(splits.x["train"], other.x["train"])
    result = train(config, store, tmp_path / "run", progress=False)
    assert result.history[0].samples_per_second > 0
    with pytest.raises(InvalidArgument, match="train_samples 3"):
        train(config.model_copy(update={"train_samples": 3}), store, tmp_path / "x", False)
