"""Data-parallel training in real processes: `kapi train` under torchrun (2 processes, gloo on
the CPU) and through `--nproc 2` reaches the test accuracy of one process on scikit-learn's
digits, stops early on every rank at once, reports once, writes one bundle of the plain
module, stops every process on a SIGTERM, resumes exactly where an uninterrupted run ends,
and refuses a global batch that does not split among the processes.

Each run is a few seconds, most of them starting processes: the --nproc run is also the
interrupted and resumed one, compared with the uninterrupted torchrun run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
from kapi.core.errors import InvalidArgument
from kapi.trainer.data.sources import open_source
from kapi.trainer.data.store import DatasetStore
from kapi.trainer.distributed import World
from kapi.trainer.training import TrainConfig, build_model, evaluate, train

from tests.support.node import KAPI

TORCHRUN = [str(KAPI.with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]
PLAIN = [str(KAPI), "train"]
UNDER_TORCHRUN = [*TORCHRUN, "-m", "kapi.cli", "train"]
WITH_NPROC = [str(KAPI), "train", "--nproc", "2"]
TIMEOUT_S = 180
# Digits stop early after about 7 epochs at 0.99 test accuracy, one process or two.
STOPPING = ("--epochs", "20", "--patience", "2")
EPOCH_LINE = re.compile(r"epoch +(\d+)/\d+  train loss ")


@dataclass
class Run:
    """A finished `kapi train`: its output and its --out folder."""

    out: Path
    stdout: str

    @cached_property
    def metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = json.loads((self.out / "bundle" / "metrics.json").read_text())
        return metrics

    def figures(self) -> list[dict[str, Any]]:
        """The history without its timings, which no two runs share."""
        return [
            {k: v for k, v in epoch.items() if k not in {"seconds", "samples_per_second"}}
            for epoch in self.metrics["history"]
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = torch.load(self.out / "bundle" / "state_dict.pt")
        return state


@dataclass
class Interrupted:
    """An `--nproc 2` run sent SIGTERM after its first epoch line, then resumed."""

    first_line: str
    returncode: int
    left_running: list[int]  # processes still naming its --out after it had exited
    bundle_written: bool
    epochs_done: int  # by its checkpoint
    resumed: Run


def _command(launcher: list[str], store: DatasetStore, out: Path, *flags: str) -> list[str]:
    command = [*launcher, "--dataset", "digits", "--model", "small_cnn", "--no-progress"]
    return [*command, "--root", str(store.root), "--out", str(out), *flags]


def _kapi_train(
    launcher: list[str], store: DatasetStore, out: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    command = _command(launcher, store, out, *flags)
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def _finished(launcher: list[str], store: DatasetStore, out: Path, *flags: str) -> Run:
    done = _kapi_train(launcher, store, out, *flags)
    assert done.returncode == 0, done.stderr
    return Run(out, done.stdout)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    store = DatasetStore(tmp_path_factory.mktemp("data"))
    store.ingest("digits", open_source("sklearn-digits").load())
    return store


@pytest.fixture(scope="module")
def plain(store: DatasetStore, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _finished(PLAIN, store, tmp_path_factory.mktemp("plain"), *STOPPING)


@pytest.fixture(scope="module")
def torchrun(store: DatasetStore, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("torchrun")
    return _finished(UNDER_TORCHRUN, store, out, *STOPPING)


@pytest.fixture(scope="module")
def interrupted(store: DatasetStore, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    out = tmp_path_factory.mktemp("nproc")
    command = _command(WITH_NPROC, store, out, *STOPPING)
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        first_line = process.stdout.readline()
        process.send_signal(signal.SIGTERM)  # as a job runner cancels the job it started
        returncode = process.wait(TIMEOUT_S)
    left_running = _processes_naming(out)
    bundle_written = (out / "bundle").exists()
    epochs_done = torch.load(out / ".checkpoint.pt")["epoch"]
    resumed = _finished(WITH_NPROC, store, out, *STOPPING, "--resume")
    return Interrupted(first_line, returncode, left_running, bundle_written, epochs_done, resumed)


def _processes_naming(out: Path, wait_s: float = 10.0) -> list[int]:
    """The processes with `out` as an argument (`--out=OUT` too), once none are left or
    after `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [pid for pid, arguments in _command_lines() if str(out) in arguments]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _command_lines() -> list[tuple[int, set[str]]]:
    lines = []
    for entry in Path("/proc").glob("[0-9]*"):  # one folder a process, named by its pid
        try:
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, or it has just gone
            continue
        lines.append((int(entry.name), {a.partition("=")[2] or a for a in arguments}))
    return lines


def _printed_epochs(run: Run) -> list[int]:
    return [int(match[1]) for line in run.stdout.splitlines() if (match := EPOCH_LINE.match(line))]


def test_two_processes_reach_the_accuracy_of_one(
    plain: Run, torchrun: Run, interrupted: Interrupted
) -> None:
    one = plain.metrics["test_accuracy"]
    for run in (torchrun, interrupted.resumed):
        two = run.metrics["test_accuracy"]
        assert abs(two - one) <= 0.01, (one, two)
        assert min(one, two) >= 0.95


def test_a_signal_stops_every_process_of_an_nproc_run(interrupted: Interrupted) -> None:
    """--nproc becomes torchrun, which passes a SIGTERM on to the processes it started."""
    assert EPOCH_LINE.match(interrupted.first_line)
    assert interrupted.returncode != 0
    assert interrupted.left_running == []
    assert not interrupted.bundle_written
    assert interrupted.epochs_done >= 1


def test_a_resumed_nproc_run_equals_an_uninterrupted_torchrun_run(
    plain: Run, torchrun: Run, interrupted: Interrupted
) -> None:
    """--nproc is torchrun with two processes (not one: the plain run differs), and a
    distributed run resumes exactly: the same history, the same weights."""
    resumed, epochs_run = interrupted.resumed, torchrun.metrics["epochs_run"]
    assert _printed_epochs(resumed) == list(range(interrupted.epochs_done + 1, epochs_run + 1))
    assert resumed.figures() == torchrun.figures()
    assert torchrun.figures() != plain.figures()
    weights, expected = resumed.state_dict(), torchrun.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in expected)


def test_only_rank_0_reports(torchrun: Run) -> None:
    lines = torchrun.stdout.splitlines()
    assert _printed_epochs(torchrun) == list(range(1, torchrun.metrics["epochs_run"] + 1))
    assert sum(line.startswith("test accuracy ") for line in lines) == 1
    assert lines[-1] == f"bundle {torchrun.out / 'bundle'}"
    assert sorted(p.name for p in torchrun.out.iterdir()) == [".checkpoint.pt", "bundle"]


def test_every_rank_stops_early_at_once(torchrun: Run) -> None:
    """A rank that stopped while another went on would leave it waiting in DDP for good."""
    assert torchrun.metrics["stopped_early"]
    assert torchrun.metrics["best_epoch"] == torchrun.metrics["epochs_run"] - 2 < 20


def test_the_bundle_holds_the_plain_module(torchrun: Run, store: DatasetStore) -> None:
    state = torchrun.state_dict()
    assert not [key for key in state if key.startswith("module.")]
    dataset = store.get("digits")
    model = build_model(TrainConfig(dataset="digits", model="small_cnn"), dataset)
    model.load_state_dict(state)  # strict: every key, no others
    x, y = dataset.split("test")
    inputs = torch.from_numpy(dataset.preprocessing.apply(x))
    _, accuracy = evaluate(model, inputs, torch.from_numpy(y.astype("int64")))
    assert accuracy == torchrun.metrics["test_accuracy"]


def test_a_batch_that_does_not_split_is_refused_in_one_line(
    store: DatasetStore, tmp_path: Path
) -> None:
    done = _kapi_train(WITH_NPROC, store, tmp_path / "run", "--batch-size", "3")
    assert done.returncode == 1
    assert done.stderr.startswith(
        "kapi train: error: batch_size 3 does not split evenly among 2 processes"
    )
    assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_train_refuses_a_batch_smaller_than_or_not_a_multiple_of_the_world(
    batch_size: int, store: DatasetStore, tmp_path: Path
) -> None:
    """Before it joins a process group, so a world of two needs no second process here."""
    config = TrainConfig(dataset="digits", model="small_cnn", batch_size=batch_size)
    with pytest.raises(InvalidArgument, match=f"batch_size {batch_size} does not split"):
        train(config, store, tmp_path, progress=False, world=World(size=2, local_size=2))


def test_torchrun_refuses_a_batch_that_does_not_split(store: DatasetStore, tmp_path: Path) -> None:
    done = _kapi_train(UNDER_TORCHRUN, store, tmp_path / "run", "--batch-size", "3")
    assert done.returncode == 1
    assert "kapi train: error: batch_size 3 does not split evenly among 2" in done.stderr
    assert not (tmp_path / "run" / "bundle").exists()
