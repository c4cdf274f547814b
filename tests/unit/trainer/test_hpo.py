"""Hardware-aware HPO on scikit-learn's digits: real Optuna studies on real storage (SQLite
files, and a real PostgreSQL), real training, each trial's model timed in a fresh process on
ONNX Runtime, and the cost model for the profiles that are not here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import onnx
import optuna
import pytest
import torch
from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.core.hardware import detect_profiles
from kapi.core.requirements import parse_requirements
from kapi.trainer import models
from kapi.trainer.bundle import export_onnx
from kapi.trainer.data.sources import open_source
from kapi.trainer.data.store import DatasetStore
from kapi.trainer.hpo import cost
from kapi.trainer.hpo.config import HpoConfig, load_config
from kapi.trainer.hpo.measure import measure, rapl_zones
from kapi.trainer.hpo.objective import below_median, redact
from kapi.trainer.hpo.study import run_hpo
from sqlalchemy.engine import make_url

from tests.support.node import KAPI

HERE = next(p for p in detect_profiles() if p.startswith("cpu-"))  # a profile this CPU runs
SMALL = {
    "models": ["small_cnn", "mobilenet_v2"],
    "widths": [0.25, 0.5],
    "depths": [1.0],
    "batch_sizes": [64],
    "epochs": 2,
    "train_samples": None,
    "measure_runs": 50,
    "population": 4,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    store = DatasetStore(tmp_path_factory.mktemp("data"))
    store.ingest("digits", open_source("sklearn-digits").load())
    return store


def _spec(**targets: Any) -> Any:
    return parse_requirements(
        {
            "model": "digits",
            "task": "classification",
            "targets": [{"profile": HERE, "latency_p95_ms": 50.0, **targets}],
        }
    )


def _config(**fields: Any) -> HpoConfig:
    return HpoConfig(
        **{"dataset": "digits", "study": "s", "requirements": _spec(), **SMALL, **fields}
    )


@pytest.fixture(scope="module")
def study_run(store: DatasetStore, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Six trials against a latency budget here and a weights budget on a microcontroller
    that every mobilenet_v2 breaks (250 K parameters at width 0.25: 245 KB in int8)."""
    requirements = parse_requirements(
        {
            "model": "digits",
            "task": "classification",
            "targets": [
                {"profile": HERE, "latency_p95_ms": 50.0},
                {"profile": "mcu-cortex-m0", "max_weights_kb": 30},
            ],
        }
    )
    out = tmp_path_factory.mktemp("hpo")
    config = _config(trials=6, requirements=requirements)
    lines: list[str] = []
    return run_hpo(config, store, out, log=lines.append), lines, out


def test_the_front_holds_only_feasible_trials_and_the_chosen_bundle(study_run: Any) -> None:
    result, lines, out = study_run
    records = json.loads((out / "trials.json").read_text())
    assert len(records) == 6
    assert len(lines) >= 6  # a line a trial
    front = json.loads((out / "front.json").read_text())
    assert front
    assert [r["number"] for r in front] == [r["number"] for r in result.front]
    for row in front:
        assert row["feasible"]
        assert row["params"]["model"] == "small_cnn"  # mobilenet_v2 breaks the mcu budget
        assert all(value <= 0 for value in row["constraints"].values())
    # The most accurate feasible trial is chosen, and its bundle is the one written.
    best = max(r["values"]["accuracy"] for r in front)
    assert result.chosen["values"]["accuracy"] == best
    lineage = json.loads((result.bundle / "lineage.json").read_text())
    assert lineage["hpo"] == {"study": "s", "trial": result.chosen["number"], "storage": None}
    assert lineage["config"]["model"] == result.chosen["params"]["model"]
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infeasible_architectures_are_not_trained_and_never_on_the_front(study_run: Any) -> None:
    _, _, out = study_run
    records = json.loads((out / "trials.json").read_text())
    weights = [next(t for t in r["targets"] if t["profile"] == "mcu-cortex-m0") for r in records]
    assert any(w["weights_kb"] > 30 for w in weights)  # both branches below are taken
    assert any(w["weights_kb"] <= 30 for w in weights)
    for record in records:
        mcu = next(t for t in record["targets"] if t["profile"] == "mcu-cortex-m0")
        over = mcu["weights_kb"] > 30
        assert record["constraints"]["max_weights_kb@mcu-cortex-m0"] == pytest.approx(
            mcu["weights_kb"] - 30
        )
        if over:
            assert not record["trained"]
            assert record["values"]["accuracy"] == 0.0
            assert "max_weights_kb@mcu-cortex-m0" in record["skipped"]
            assert not record["feasible"]
            assert not (out / "trials" / "s" / f"{record['number']:04d}" / "bundle").exists()
        else:  # trained, to the end or pruned on its accuracy
            assert record["state"] in {"complete", "pruned"}
            assert (record["state"] == "complete") == record["trained"]
            assert record["val_accuracy_curve"]


def test_each_trial_is_measured_here_and_estimated_for_the_absent_target(study_run: Any) -> None:
    result, _, out = study_run
    records = json.loads((out / "trials.json").read_text())
    for record in records:
        here, mcu = record["targets"]
        assert here["profile"] == HERE
        assert here["source"].startswith("measured (onnxruntime")
        assert 0 < here["latency_p50_ms"] <= here["latency_p95_ms"]
        assert here["memory_mb"] > 0
        assert here["energy_source"] in {"estimated"} | {f"rapl:{z.name}" for z in rapl_zones()}
        assert here["measured_on"] == HERE  # checked on the machine that was timed
        assert -1 < here["cost_model_error"] < 5  # the roofline within a factor of six
        assert mcu["source"] == "estimated (cost model)"
        assert mcu["weights_kb"] == pytest.approx(here["weights_kb"] / 4)  # int8 there
        assert mcu["latency_p95_ms"] > here["latency_p95_ms"]  # 133 MHz and no FPU
    summary = json.loads((out / "hpo.json").read_text())
    architectures = {(r["params"]["model"], r["params"]["width"]) for r in records}
    assert summary["cost_model"]["checked"] == len(architectures)  # each costed once
    assert summary["remeasured"]["study_latency_p95_ms"] == pytest.approx(
        result.chosen["targets"][0]["latency_p95_ms"]
    )
    assert summary["objectives"] == {"accuracy": "maximize", "latency": "minimize"}


def test_a_budget_no_trial_meets_is_named_and_leaves_no_bundle(
    store: DatasetStore, tmp_path: Path
) -> None:
    config = _config(trials=2, requirements=_spec(latency_p95_ms=1e-6))
    with pytest.raises(FailedPrecondition, match=rf"latency_p95_ms@{HERE}: 2 of 2 trials"):
        run_hpo(config, store, tmp_path, log=lambda line: None)
    summary = json.loads((tmp_path / "hpo.json").read_text())
    assert summary["unmet"][0].startswith(f"latency_p95_ms@{HERE}: 2 of 2")
    assert not (tmp_path / "bundle").exists()
    assert json.loads((tmp_path / "front.json").read_text()) == []


def test_a_throughput_no_trial_reaches_is_named(store: DatasetStore, tmp_path: Path) -> None:
    config = _config(trials=1, models=["small_cnn"], requirements=_spec(throughput_min_rps=1e9))
    with pytest.raises(FailedPrecondition, match=rf"throughput_min_rps@{HERE}: 1 of 1 trials"):
        run_hpo(config, store, tmp_path, log=lambda line: None)
    (record,) = json.loads((tmp_path / "trials.json").read_text())
    reached = 1000 / record["targets"][0]["latency_p50_ms"]  # one stream at batch 1
    assert record["constraints"][f"throughput_min_rps@{HERE}"] == pytest.approx(1e9 - reached)
    assert not record["trained"]


def test_an_accuracy_no_trial_reaches_is_named(store: DatasetStore, tmp_path: Path) -> None:
    requirements = parse_requirements(
        {
            "model": "digits",
            "task": "classification",
            "accuracy": {"min": 1.0},
            "targets": [{"profile": HERE, "latency_p95_ms": 50.0}],
        }
    )
    config = _config(trials=1, requirements=requirements, models=["small_cnn"], epochs=1)
    with pytest.raises(FailedPrecondition, match=r"accuracy\.min: 1 of 1 trials"):
        run_hpo(config, store, tmp_path, log=lambda line: None)


def test_two_workers_share_one_sqlite_study(store: DatasetStore, tmp_path: Path) -> None:
    config = _config(trials=4, workers=2, models=["small_cnn"], epochs=1)
    result = run_hpo(config, store, tmp_path, log=lambda line: None)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = study.get_trials()
    assert len(trials) == 4
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    assert result.summary["trials"]["complete"] == 4


def test_a_study_continues_and_refuses_other_objectives(
    store: DatasetStore, tmp_path: Path
) -> None:
    config = _config(trials=1, models=["small_cnn"], epochs=1)
    run_hpo(config, store, tmp_path, log=lambda line: None)
    again = run_hpo(config, store, tmp_path, log=lambda line: None)
    assert again.summary["trials"]["complete"] == 2  # the second run added one
    other = _config(trials=1, models=["small_cnn"], epochs=1, objectives=["accuracy", "energy"])
    with pytest.raises(FailedPrecondition, match="exists with other objectives"):
        run_hpo(other, store, tmp_path, log=lambda line: None)
    tighter = _config(
        trials=1, models=["small_cnn"], epochs=1, requirements=_spec(latency_p95_ms=9)
    )
    with pytest.raises(FailedPrecondition, match="exists with other requirements"):
        run_hpo(tighter, store, tmp_path, log=lambda line: None)


def test_two_workers_on_a_real_postgresql(
    store: DatasetStore, tmp_path: Path, postgres_database: str
) -> None:
    config = _config(trials=2, workers=2, models=["small_cnn"], epochs=1, storage=postgres_database)
    result = run_hpo(config, store, tmp_path, log=lambda line: None)
    assert result.summary["trials"]["complete"] == 2
    assert result.summary["storage"] == redact(postgres_database)
    lineage = json.loads((result.bundle / "lineage.json").read_text())
    assert lineage["hpo"]["study"] == "s"
    assert not (tmp_path / "study.db").exists()  # the study lives in PostgreSQL


def test_a_target_that_is_not_here_is_estimated(store: DatasetStore, tmp_path: Path) -> None:
    requirements = parse_requirements(
        {
            "model": "digits",
            "task": "classification",
            "targets": [{"profile": "jetson-orin", "latency_p95_ms": 5.0}],
        }
    )
    config = _config(trials=1, requirements=requirements, models=["small_cnn"], epochs=1)
    result = run_hpo(config, store, tmp_path, log=lambda line: None)
    target = result.chosen["targets"][0]
    assert target["source"] == "estimated (cost model)"
    assert target["energy_source"] == "estimated"
    assert "remeasured" not in result.summary
    assert result.summary["cost_model"]["checked"] == 0


def test_the_median_rule_prunes_only_below_the_finished_trials_no_slower() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for curve, latency in (([0.5, 0.6], 1.0), ([0.7, 0.8], 1.0), ([0.9, 0.95], 1.0), ([0.2], 1.0)):
        study.add_trial(
            optuna.trial.create_trial(
                values=[curve[-1], latency],
                params={},
                distributions={},
                user_attrs={
                    "val_accuracy_curve": curve,
                    "targets": [{"latency_p95_ms": latency}],
                },
            )
        )
    trial = study.ask()
    assert not below_median(trial, 1, 0.1, startup=5, latency=1.0)  # fewer than 5: never
    assert below_median(trial, 1, 0.55, startup=4, latency=1.0)  # epoch 1: median 0.6
    assert not below_median(trial, 1, 0.6, startup=4, latency=1.0)
    assert below_median(trial, 2, 0.79, startup=3, latency=1.0)  # epoch 2: median 0.8
    assert not below_median(trial, 2, 0.79, startup=4, latency=1.0)
    # A faster trial is compared with none of them: each is slower by more than the tie.
    assert not below_median(trial, 1, 0.1, startup=1, latency=0.5)
    assert below_median(trial, 1, 0.1, startup=4, latency=0.95)  # within 10%: the same


def test_a_network_is_costed_once_a_study(study_run: Any) -> None:
    _, _, out = study_run
    records = json.loads((out / "trials.json").read_text())
    seen: dict[tuple[int, float], Any] = {}
    for record in records:
        here = record["targets"][0]
        key = (here["parameters"], here["flops"])
        if key in seen:
            assert record["targets"] == seen[key]
        seen[key] = record["targets"]
    assert len(seen) < len(records)  # 2 models x 2 widths: 6 trials repeat one at least


def test_the_cost_model_counts_a_convolution_exactly(tmp_path: Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)
    ).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, [1, 8, 8], path)
    graph = cost.graph_cost(path)
    conv = 2 * (8 * 8 * 8) * (1 * 3 * 3) + 8 * 8 * 8  # MACs twice, plus the bias
    gemm = 2 * 10 * 512
    kinds = {kind: flops for kind, flops, _ in graph.per_operator}
    assert kinds["Conv"] == conv
    assert kinds["Gemm"] == gemm
    assert graph.parameters == (8 * 9 + 8) + (512 * 10 + 10)
    fast, slow = cost.estimate(graph, "nvidia-sm90"), cost.estimate(graph, "mcu-cortex-m0")
    assert fast.latency_ms < slow.latency_ms
    assert slow.latency_ms > (conv + gemm) / 0.133e9 * 1e3  # at least its arithmetic
    assert cost.figures("nvidia-sm87") == cost.FIGURES["nvidia-sm86"]  # the nearest lower
    with pytest.raises(InvalidArgument, match="no figures"):
        cost.figures("nvidia-smx")
    onnx.checker.check_model(str(path))


def test_measure_times_a_model_in_a_fresh_process(tmp_path: Path) -> None:
    model = models.build("small_cnn", in_channels=1, num_classes=10, width=0.25).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, [1, 8, 8], path)
    for runtime in ("onnxruntime", "openvino"):
        got = measure(path, runtime, runs=30)
        assert got.runtime == runtime
        assert 0 < got.latency_p50_ms <= got.latency_p95_ms
        assert got.peak_memory_mb > 0
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(FailedPrecondition, match=r"timing bad\.onnx on onnxruntime failed"):
        measure(tmp_path / "bad.onnx")


def test_a_storage_url_is_recorded_without_its_password() -> None:
    url = "postgresql+psycopg://kapi:s3cret@db:5432/optuna?sslmode=require&password=other"
    redacted = redact(url)
    assert redacted is not None
    assert "s3cret" not in redacted
    assert "other" not in redacted
    assert redacted.startswith("postgresql+psycopg://kapi:***@db:5432/optuna?")
    sqlite = redact("sqlite:////tmp/a@b/study.db")  # an @ in a path is no password
    assert sqlite is not None
    assert make_url(sqlite).database == "/tmp/a@b/study.db"


def test_rapl_zones_are_the_readable_package_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for zone in ("intel-rapl:0", "intel-rapl:0:0", "intel-rapl:1"):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "energy_uj").write_text("1000\n")
    monkeypatch.setattr("kapi.trainer.hpo.measure.RAPL", tmp_path)
    assert [z.name for z in rapl_zones()] == ["intel-rapl:0", "intel-rapl:1"]


def test_bad_hpo_settings_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown architecture"):
        load_config(dataset="d", study="s", requirements=_spec(), models=["vgg"])
    with pytest.raises(InvalidArgument, match="first objective must be accuracy"):
        load_config(dataset="d", study="s", requirements=_spec(), objectives=["latency"])
    with pytest.raises(InvalidArgument, match="unknown objective"):
        load_config(dataset="d", study="s", requirements=_spec(), objectives=["accuracy", "x"])
    no_target = parse_requirements({"model": "d", "task": "classification"})
    with pytest.raises(InvalidArgument, match="name no target"):
        load_config(dataset="d", study="s", requirements=no_target)
    for fields, message in (
        ({"population": 1}, "population"),
        ({"profile": "nvidia-smx"}, "unknown hardware profile"),
        ({"widths": [0]}, "widths"),
        ({"models": []}, "models"),
        ({"objectives": ["accuracy", "latency", "latency"]}, "objectives repeat"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            load_config(dataset="d", study="s", requirements=_spec(), **fields)


def test_kapi_train_hpo_end_to_end(store: DatasetStore, tmp_path: Path) -> None:
    spec = tmp_path / "requirements.yaml"
    spec.write_text(
        f"model: digits\ntask: classification\ntargets:\n"
        f"  - profile: {HERE}\n    latency_p95_ms: 50\n"
    )
    base = [str(KAPI), "train", "--hpo", "--dataset", "digits", "--root", str(store.root)]
    options = ["--trials", "2", "--epochs", "1", "--models", "small_cnn", "--widths", "0.25"]
    done = subprocess.run(
        [*base, *options, "--requirements", str(spec), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Pareto front" in done.stdout
    assert "chosen (most-accurate): trial" in done.stdout
    assert (tmp_path / "o" / "bundle" / "model.onnx").is_file()
    for extra, message in (
        ([], "--hpo needs --requirements"),
        (["--requirements", str(spec), "--model", "small_cnn"], "drop --model"),
        (["--requirements", str(spec), "--models", "vgg"], "unknown architecture"),
        (["--requirements", str(spec), "--nproc", "2"], "drop --nproc"),
    ):
        done = subprocess.run(
            [*base, *extra, "--out", str(tmp_path / "x")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 1
        assert message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "bundle").exists()
    plain = [str(KAPI), "train", "--dataset", "digits", "--model", "small_cnn", "--root"]
    for extra, message in (
        (["--trials", "3"], "--trials: only with --hpo"),
        (["--requirements", str(spec)], "--requirements (without --hpo or --push)"),
    ):
        done = subprocess.run(
            [*plain, str(store.root), *extra], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1
        assert message in done.stderr
    done = subprocess.run(
        [*base, "--requirements", str(spec), "--lr", "0.1"], capture_output=True, text=True
    )
    assert "--hpo searches or fixes --lr itself" in done.stderr
