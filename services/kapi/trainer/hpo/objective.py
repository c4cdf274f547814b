"""One trial of a study: cost the architecture on every target, skip it when it is over
budget, train it with the median rule, and write its bundle."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from kapi.core.hardware import detect_profiles, primary_profile
from kapi.core.requirements import Requirements
from kapi.trainer.bundle import export_onnx, write_bundle
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.trainer.hpo import cost
from kapi.trainer.hpo.config import HpoConfig
from kapi.trainer.hpo.measure import Measurement, measure, runtime_present
from kapi.trainer.training import EpochMetrics, TrainConfig, build_model, train

LATENCY_TIE = 1.1  # within 10%, two latencies are the same for the pruning rule


class Objective:
    def __init__(
        self,
        config: HpoConfig,
        store: DatasetStore,
        dataset: Dataset,
        out: Path,
        log: Callable[[str], None],
    ) -> None:
        self.config = config
        self.store = store
        self.dataset = dataset
        self.out = out
        self.log = log
        # Timed here: ONNX Runtime's and OpenVINO's CPU devices, so only this machine's own
        # best CPU profile counts as measured. A GPU's or a weaker CPU's figures would be
        # this CPU's, and are estimated instead.
        self.machine = primary_profile([p for p in detect_profiles() if p.startswith("cpu-")])
        self.threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        config = self.config
        model: str = trial.suggest_categorical("model", config.models)
        width: float = trial.suggest_categorical("width", config.widths)
        depth: float = trial.suggest_categorical("depth", config.depths)
        batch_size: int = trial.suggest_categorical("batch_size", config.batch_sizes)
        lr = trial.suggest_float("lr", *config.lr_range, log=True)
        params: dict[str, Any] = {
            "model": model,
            "width": width,
            "depth": depth,
            "batch_size": batch_size,
            "lr": lr,
        }
        folder = self.out / "trials" / config.study / f"{trial.number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        train_config = TrainConfig(
            dataset=config.dataset,
            dataset_version=self.dataset.digest,
            model=model,
            width=width,
            depth=depth,
            batch_size=batch_size,
            lr=lr,
            epochs=config.epochs,
            patience=config.epochs,
            train_samples=config.train_samples,
            seed=config.seed + trial.number,
            threads=self.threads,
        )
        targets = self._cost(trial.study, train_config, folder)
        trial.set_user_attr("targets", targets)
        trial.set_user_attr("params", params)
        violations = _hardware_violations(config.requirements, targets)
        for key, value in violations.items():  # known before training, kept if it is pruned
            trial.set_constraint(key, value)
        broken = sorted(k for k, v in violations.items() if v > 0)
        if broken:
            accuracy = 0.0
            trial.set_user_attr("trained", False)
            trial.set_user_attr("skipped", f"over budget before training: {broken}")
        else:
            accuracy = self._train(trial, train_config, folder, targets[0]["latency_p95_ms"])
            trial.set_user_attr("trained", True)
        if (
            config.requirements.accuracy is not None
            and config.requirements.accuracy.min is not None
        ):
            violations["accuracy.min"] = config.requirements.accuracy.min - accuracy
            trial.set_constraint("accuracy.min", violations["accuracy.min"])
        values = _values(config.objective_names(), accuracy, targets[0])
        self.log(_trial_line(trial.number, params, values, violations, targets[0]))
        return values

    def _cost(
        self, study: optuna.Study, train_config: TrainConfig, folder: Path
    ) -> list[dict[str, Any]]:
        """Each target's costs, the primary target first. One network is costed once a
        study: its figures do not depend on the training settings, and timing it again only
        adds noise between equal trials (small_cnn's depth 0.5 and 1 are one network)."""
        model = build_model(train_config, self.dataset).eval()
        shape = self.dataset.preprocessing.input_shape(tuple(self.dataset.meta["sample_shape"]))
        onnx_path = folder / "architecture.onnx"
        export_onnx(model, shape, onnx_path)
        graph = cost.graph_cost(onnx_path)
        network = f"cost:{graph.parameters}:{graph.flops:.0f}:{graph.operators}"
        known: list[dict[str, Any]] | None = study.user_attrs.get(network)
        if known is not None:
            onnx_path.unlink()
            return known
        rows = self._cost_graph(onnx_path, graph)
        study.set_user_attr(network, rows)
        return rows

    def _cost_graph(self, onnx_path: Path, graph: cost.GraphCost) -> list[dict[str, Any]]:
        measured: Measurement | None = None
        profiles = [self.config.primary_profile()] + [
            t.profile
            for t in self.config.requirements.targets
            if t.profile != self.config.primary_profile()
        ]
        rows = []
        for profile in profiles:
            guess = cost.estimate(graph, profile)
            row: dict[str, Any] = {
                "profile": profile,
                "parameters": graph.parameters,
                "flops": graph.flops,
                "weights_kb": graph.parameters * cost.weight_bytes_per_element(profile) / 1024,
                "estimated_latency_ms": guess.latency_ms,
            }
            if self._runs_here(profile):
                measured = measured or measure(
                    onnx_path,
                    self.config.runtime,
                    threads=self.config.measure_threads,
                    runs=self.config.measure_runs,
                )
                row |= {
                    "source": f"measured ({measured.runtime}, {measured.threads} thread)",
                    "latency_p50_ms": measured.latency_p50_ms,
                    "latency_p95_ms": measured.latency_p95_ms,
                    "memory_mb": measured.peak_memory_mb,
                    "energy_mj": measured.energy_mj
                    if measured.energy_mj is not None
                    else guess.energy_mj,
                    "energy_source": measured.energy_source
                    if measured.energy_mj is not None
                    else "estimated",
                    # The model is checked on the machine that was timed, which may be a
                    # superset of the target (an avx512 machine timing an avx2 target).
                    "measured_on": self.machine,
                    "cost_model_error": cost.estimate(graph, self.machine).latency_ms
                    / measured.latency_p50_ms
                    - 1,
                }
            else:
                row |= {
                    "source": "estimated (cost model)",
                    "latency_p50_ms": guess.latency_ms,
                    "latency_p95_ms": guess.latency_ms,
                    "memory_mb": guess.memory_mb,
                    "energy_mj": guess.energy_mj,
                    "energy_source": "estimated",
                }
            rows.append(row)
        onnx_path.unlink()
        return rows

    def _runs_here(self, profile: str) -> bool:
        return profile == self.machine and runtime_present(self.config.runtime)

    def _train(
        self, trial: optuna.Trial, train_config: TrainConfig, folder: Path, latency: float
    ) -> float:
        curve: list[float] = []

        def on_epoch(metrics: EpochMetrics) -> None:
            curve.append(metrics.val_accuracy)
            trial.set_user_attr("val_accuracy_curve", curve)
            if (
                self.config.prune
                and self.config.prune_warmup_epochs < metrics.epoch < train_config.epochs
                and below_median(
                    trial,
                    metrics.epoch,
                    metrics.val_accuracy,
                    self.config.prune_startup_trials,
                    latency,
                )
            ):
                trial.set_user_attr("pruned_at_epoch", metrics.epoch)
                raise optuna.TrialPruned(
                    f"val accuracy {metrics.val_accuracy:.4f} after epoch {metrics.epoch} is "
                    "below the median of the finished trials no slower than it"
                )

        try:
            result = train(
                train_config, self.store, folder / "run", progress=False, on_epoch=on_epoch
            )
        except optuna.TrialPruned:
            shutil.rmtree(folder / "run", ignore_errors=True)
            self.log(
                f"trial {trial.number:>3} pruned after epoch {len(curve)} (val {curve[-1]:.4f})"
            )
            raise
        hpo = {
            "study": self.config.study,
            "trial": trial.number,
            "storage": redact(self.config.storage),
        }
        write_bundle(result, self.dataset, train_config, folder / "bundle", hpo=hpo)
        trial.set_user_attr("bundle", str((folder / "bundle").resolve()))
        shutil.rmtree(folder / "run", ignore_errors=True)  # the checkpoint: the bundle has it all
        trial.set_user_attr("test_accuracy", result.test_accuracy)
        return result.best_val_accuracy


def below_median(
    trial: optuna.Trial, epoch: int, accuracy: float, startup: int, latency: float
) -> bool:
    """Whether `accuracy` at `epoch` is below the median of the finished trials' that are no
    slower than this one (by LATENCY_TIE): only those could dominate it on the front, so a
    fast model is never pruned for being less accurate than slower ones."""
    finished = trial.study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    seen: list[float] = [
        t.user_attrs["val_accuracy_curve"][epoch - 1]
        for t in finished
        if len(t.user_attrs.get("val_accuracy_curve", [])) >= epoch
        and t.user_attrs["targets"][0]["latency_p95_ms"] <= latency * LATENCY_TIE
    ]
    if len(seen) < startup:
        return False
    seen.sort()
    middle = len(seen) // 2
    median = seen[middle] if len(seen) % 2 else (seen[middle - 1] + seen[middle]) / 2
    return accuracy < median


def _hardware_violations(
    requirements: Requirements, targets: list[dict[str, Any]]
) -> dict[str, float]:
    """Each hardware budget's excess (<= 0: met), named `<field>@<profile>`."""
    found: dict[str, float] = {}
    by_profile = {row["profile"]: row for row in targets}
    for target in requirements.targets:
        row = by_profile[target.profile]
        # One stream at batch 1: a floor under what batching would reach on the target.
        throughput = 1000.0 / row["latency_p50_ms"]
        budgets = (
            ("latency_p95_ms", target.latency_p95_ms, row["latency_p95_ms"]),
            ("throughput_min_rps", target.throughput_min_rps, -throughput),
            ("max_weights_kb", target.max_weights_kb, row["weights_kb"]),
            ("max_memory_mb", target.max_memory_mb, row["memory_mb"]),
        )
        for name, budget, value in budgets:
            if budget is None:
                continue
            # a maximum is exceeded by value - budget; a minimum (given negated) by the
            # budget less what was reached
            excess = budget + value if name == "throughput_min_rps" else value - budget
            found[f"{name}@{target.profile}"] = excess
    return found


def _values(names: list[str], accuracy: float, primary: dict[str, Any]) -> list[float]:
    pick = {
        "accuracy": accuracy,
        "latency": primary["latency_p95_ms"],
        "weights": primary["weights_kb"],
        "memory": primary["memory_mb"],
        "energy": primary["energy_mj"],
    }
    return [float(pick[name]) for name in names]


def _trial_line(
    number: int,
    params: dict[str, Any],
    values: list[float],
    violations: dict[str, float],
    primary: dict[str, Any],
) -> str:
    broken = [k for k, v in violations.items() if v > 0]
    state = "feasible" if not broken else "infeasible: " + ", ".join(broken)
    return (
        f"trial {number:>3} {params['model']:<16} width {params['width']:<4} depth "
        f"{params['depth']:<4} bs {params['batch_size']:<3} lr {params['lr']:.2e}  val "
        f"{values[0]:.4f}  p95 {primary['latency_p95_ms']:.3f} ms  {primary['weights_kb']:,.0f} "
        f"KB  {state}"
    )


def redact(url: str | None) -> str | None:
    """A storage URL without its password (in the authority or the query)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    query = {k: ("***" if "password" in k.lower() else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True)
