"""Hardware-aware multi-objective HPO: an Optuna study over the zoo's architectures and the
training hyper-parameters, scored on accuracy and on what the target hardware pays.

A trial:
1. samples an architecture (zoo model, width, depth) and hyper-parameters (lr, batch size);
2. exports the untrained model and costs it on every target of the requirements spec:
   measured on the target's runtime where the target runs here (latency at batch 1, peak
   memory, RAPL energy when readable), estimated by the cost model (kapi.trainer.hpo.cost)
   otherwise. The weights budget is checked from the parameter count;
3. when a hardware budget is already broken, stops there: the trial completes as infeasible
   with accuracy 0, untrained. The sampler learns where the infeasible region is, the front
   never shows it, and no time is spent training it;
4. otherwise trains on a subset, pruned after an epoch whose validation accuracy is below the
   median of the finished trials' at that epoch (Optuna's pruners need `trial.report`, which
   Optuna refuses for multi-objective studies, so the median rule is kept here);
5. writes the trial's bundle, with the study and trial in its lineage.

Constraints are Optuna's (`trial.set_constraint`, value <= 0 feasible), so the samplers'
constrained domination and `study.best_trials` leave infeasible trials off the front.
Several workers share one study through its storage (an SQLite file here; PostgreSQL for
Kubernetes Jobs); each runs its share of the trials.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.core.files import replace_text
from kapi.core.hardware import detect_profiles, is_known_profile, primary_profile
from kapi.core.requirements import Requirements
from kapi.trainer import models
from kapi.trainer.bundle import export_onnx, write_bundle
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.trainer.hpo import cost
from kapi.trainer.hpo.measure import Measurement, measure, runtime_present
from kapi.trainer.training import EpochMetrics, TrainConfig, build_model, train

OBJECTIVES: dict[str, tuple[Literal["maximize", "minimize"], str]] = {  # (direction, unit)
    "accuracy": ("maximize", ""),
    "latency": ("minimize", "ms"),
    "weights": ("minimize", "KB"),
    "memory": ("minimize", "MB"),
    "energy": ("minimize", "mJ"),
}
CHOICE_RULES = {  # the spec's rule for the one bundle: among the feasible front
    "most-accurate": lambda r: (-r["values"]["accuracy"], r["targets"][0]["latency_p95_ms"]),
    "fastest": lambda r: (r["targets"][0]["latency_p95_ms"], -r["values"]["accuracy"]),
    "smallest": lambda r: (r["targets"][0]["weights_kb"], -r["values"]["accuracy"]),
}
SQLITE_TIMEOUT_S = 60
LATENCY_TIE = 1.1  # within 10%, two latencies are the same for the pruning rule

PositiveInt = Annotated[int, Field(ge=1)]
Multiplier = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class HpoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    dataset_version: str | None = None
    study: str
    storage: str | None = None  # an Optuna storage URL; None: sqlite in the output folder
    trials: PositiveInt = 20
    requirements: Requirements
    profile: str | None = None  # the objectives' target; None: the spec's first target
    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    models: Annotated[list[str], Field(min_length=1)] = [
        "small_cnn",
        "mobilenet_v2",
        "efficientnet_b0",
        "resnet18",
    ]
    widths: Annotated[list[Multiplier], Field(min_length=1)] = [0.25, 0.5, 0.75, 1.0]
    depths: Annotated[list[Multiplier], Field(min_length=1)] = [0.5, 1.0]
    batch_sizes: Annotated[list[PositiveInt], Field(min_length=1)] = [64, 128, 256]
    lr_range: tuple[float, float] = (3e-4, 1e-2)
    epochs: PositiveInt = 3  # per trial
    train_samples: PositiveInt | None = 5000  # per trial; None: the whole training split
    objectives: list[str] | None = None  # None: accuracy, latency and what the spec budgets
    sampler: Literal["nsga2", "tpe"] = "nsga2"
    population: Annotated[int, Field(ge=2)] = 8  # NSGA-II's generation size
    seed: int = 0
    workers: PositiveInt = 1
    threads: PositiveInt | None = None  # torch threads per worker; None: cores / workers
    measure_threads: PositiveInt = 1
    measure_runs: PositiveInt = 500
    prune: bool = True
    prune_startup_trials: int = 4  # trained trials before the median rule applies
    prune_warmup_epochs: int = 1  # epochs a trial trains before the rule applies to it
    choose: Literal["most-accurate", "fastest", "smallest"] = "most-accurate"

    @model_validator(mode="after")
    def _check(self) -> HpoConfig:
        unknown = sorted(set(self.models) - set(models.names()))
        if unknown:
            raise ValueError(f"unknown architecture(s) {unknown}; the zoo has {models.names()}")
        if not self.requirements.targets and self.profile is None:
            raise ValueError("the requirements name no target: give one, or a profile")
        wrong = sorted(set(self.objectives or []) - set(OBJECTIVES))
        if wrong:
            raise ValueError(f"unknown objective(s) {wrong}; choose from {list(OBJECTIVES)}")
        if self.objectives is not None and self.objectives[:1] != ["accuracy"]:
            raise ValueError("the first objective must be accuracy")
        if self.objectives is not None and len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives repeat: {self.objectives}")
        if self.profile is not None and not is_known_profile(self.profile):
            raise ValueError(f"unknown hardware profile {self.profile!r}")
        low, high = self.lr_range
        if not 0 < low <= high:
            raise ValueError(f"lr_range {self.lr_range}: expected 0 < low <= high")
        return self

    def primary_profile(self) -> str:
        return self.profile or self.requirements.targets[0].profile

    def objective_names(self) -> list[str]:
        if self.objectives is not None:
            return list(self.objectives)
        names = ["accuracy", "latency"]
        primary = self._primary_target()
        if primary is not None and primary.max_weights_kb is not None:
            names.append("weights")
        if primary is not None and primary.max_memory_mb is not None:
            names.append("memory")
        return names

    def _primary_target(self) -> Any:
        return next(
            (t for t in self.requirements.targets if t.profile == self.primary_profile()), None
        )


@dataclass(frozen=True)
class HpoResult:
    out: Path
    front: list[dict[str, Any]]
    chosen: dict[str, Any]
    bundle: Path
    summary: dict[str, Any]


def run_hpo(
    config: HpoConfig,
    store: DatasetStore,
    out: Path,
    *,
    log: Callable[[str], None] = print,
) -> HpoResult:
    """Run `config.trials` trials (across `config.workers` processes), then write the front,
    the records and the chosen trial's bundle under `out`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dataset = store.get(config.dataset, config.dataset_version)
    out.mkdir(parents=True, exist_ok=True)
    storage = config.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    database = _storage(storage)
    try:
        study = _open_study(config, database, dataset.digest)  # agreed before any work
        return _run(config, store, dataset, out, storage, study, log)
    finally:
        _close(database)


def _run(
    config: HpoConfig,
    store: DatasetStore,
    dataset: Dataset,
    out: Path,
    storage: str,
    study: optuna.Study,
    log: Callable[[str], None],
) -> HpoResult:
    shares = [config.trials // config.workers] * config.workers
    for index in range(config.trials % config.workers):
        shares[index] += 1
    if config.workers == 1:
        _work(config, store.root, dataset.digest, out, storage, 0, shares[0], log)
    else:
        context = multiprocessing.get_context("spawn")  # torch and fork do not mix
        workers = [
            context.Process(
                target=_worker_main,
                args=(config.model_dump_json(), str(store.root), dataset.digest, str(out)),
                kwargs={
                    "storage": storage,
                    "index": index,
                    "trials": share,
                    "quiet": log is _silent,
                },
            )
            for index, share in enumerate(shares)
            if share
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [w.exitcode for w in workers if w.exitcode != 0]
        if failed:
            raise FailedPrecondition(f"{len(failed)} HPO worker(s) exited with {failed}")
    return finish(config, study, out, log=log)


def _silent(line: str) -> None:
    """The log of a run that prints only its result (--json)."""


def _print(line: str) -> None:
    print(line, flush=True)


def _worker_main(
    config_json: str,
    root: str,
    digest: str,
    out: str,
    *,
    storage: str,
    index: int,
    trials: int,
    quiet: bool,
) -> None:
    config = HpoConfig.model_validate_json(config_json)
    _work(
        config, Path(root), digest, Path(out), storage, index, trials, _silent if quiet else _print
    )


def _open_study(
    config: HpoConfig,
    storage: optuna.storages.RDBStorage,
    dataset_digest: str,
    seed_offset: int = 0,
) -> optuna.Study:
    names = config.objective_names()
    sampler: optuna.samplers.BaseSampler
    if config.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(
            population_size=config.population, seed=config.seed + seed_offset
        )
    else:
        sampler = optuna.samplers.TPESampler(seed=config.seed + seed_offset, multivariate=True)
    study = optuna.create_study(
        study_name=config.study,
        storage=storage,
        sampler=sampler,
        directions=[OBJECTIVES[name][0] for name in names],
        load_if_exists=True,
    )
    # What its trials' figures and constraints depend on: a run that continues the study
    # must agree on all of it, or old trials would be judged by budgets they never saw.
    identity = {
        "objectives": names,
        "profile": config.primary_profile(),
        "runtime": config.runtime,
        "dataset": dataset_digest,
        "requirements": config.requirements.model_dump(mode="json", exclude_none=True),
    }
    recorded = {key: study.user_attrs.get(key) for key in identity}
    if recorded["objectives"] is None:  # a new study
        for key, value in identity.items():
            study.set_user_attr(key, value)
    else:
        changed = sorted(key for key, value in identity.items() if recorded[key] != value)
        if changed:
            raise FailedPrecondition(
                f"study '{config.study}' exists with other {', '.join(changed)} "
                f"(objectives {recorded['objectives']}); choose another --study"
            )
    return study


def _storage(url: str) -> optuna.storages.RDBStorage:
    if url.startswith("sqlite"):  # workers queue on the file's lock rather than fail
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        )
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    raise InvalidArgument(
        "--storage: expected a database URL (sqlite:///FILE, postgresql+psycopg://HOST/DB)"
    )


def _close(storage: optuna.storages.RDBStorage) -> None:
    """Give the storage's connections back (RDBStorage keeps a pool)."""
    storage.remove_session()
    storage.engine.dispose()


def _work(
    config: HpoConfig,
    root: Path,
    digest: str,
    out: Path,
    storage: str,
    index: int,
    trials: int,
    log: Callable[[str], None],
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = DatasetStore(root)
    dataset = store.get(config.dataset, digest)
    database = _storage(storage)
    try:
        study = _open_study(config, database, digest, seed_offset=index)
        # A trial that fails (an export, a timing, a training error) is recorded FAIL with
        # its reason and the study goes on; `finish` reports how many did.
        study.optimize(
            _Objective(config, store, dataset, out, log), n_trials=trials, catch=(Exception,)
        )
    finally:
        _close(database)


class _Objective:
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
                and _below_median(
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
            "storage": _redact(self.config.storage),
        }
        write_bundle(result, self.dataset, train_config, folder / "bundle", hpo=hpo)
        trial.set_user_attr("bundle", str((folder / "bundle").resolve()))
        shutil.rmtree(folder / "run", ignore_errors=True)  # the checkpoint: the bundle has it all
        trial.set_user_attr("test_accuracy", result.test_accuracy)
        return result.best_val_accuracy


def _below_median(
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


def _redact(url: str | None) -> str | None:
    """A storage URL without its password (in the authority or the query)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    query = {k: ("***" if "password" in k.lower() else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True)


def _record(trial: optuna.trial.FrozenTrial, names: list[str]) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "params": trial.user_attrs.get("params", trial.params),
        "values": dict(zip(names, trial.values, strict=True)) if trial.values else None,
        "constraints": trial.constraints,
        "feasible": bool(trial.values) and all(v <= 0 for v in trial.constraints.values()),
        "trained": trial.user_attrs.get("trained", False),
        "skipped": trial.user_attrs.get("skipped"),
        "val_accuracy_curve": trial.user_attrs.get("val_accuracy_curve", []),
        "test_accuracy": trial.user_attrs.get("test_accuracy"),
        "bundle": trial.user_attrs.get("bundle"),
        "targets": trial.user_attrs.get("targets", []),
        "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start
        else None,
    }


def finish(
    config: HpoConfig, study: optuna.Study, out: Path, *, log: Callable[[str], None] = print
) -> HpoResult:
    """Write trials.json, front.json, front.png and hpo.json, and the chosen trial's bundle
    (FailedPrecondition, naming the constraints, when no trial is feasible)."""
    names = list(study.user_attrs.get("objectives") or config.objective_names())
    trials = study.get_trials(deepcopy=False)
    records = [_record(t, names) for t in trials]
    _write_json(out / "trials.json", records)
    front_numbers = {t.number for t in study.best_trials}
    front = [r for r in records if r["number"] in front_numbers and r["feasible"]]
    front.sort(key=lambda r: r["targets"][0]["latency_p95_ms"])
    _write_json(out / "front.json", front)
    summary: dict[str, Any] = {
        "study": config.study,
        "storage": _redact(config.storage) or str(out / "study.db"),
        "objectives": {name: OBJECTIVES[name][0] for name in names},
        "profile": config.primary_profile(),
        "trials": _count_states(records),
        "front": [r["number"] for r in front],
        "cost_model": _cost_model_error(records),
        "rule": config.choose,
    }
    if not front:
        summary["unmet"] = _unmet(records, config.requirements)
        _write_json(out / "hpo.json", summary)
        _plot(records, front, None, names, out / "front.png")
        detail = "; ".join(summary["unmet"]) or "no trial completed"
        raise FailedPrecondition(
            f"no trial met every constraint: {detail} (report {out / 'hpo.json'})"
        )
    chosen = sorted(front, key=CHOICE_RULES[config.choose])[0]
    source = Path(chosen["bundle"] or "")
    if not (source / "model.onnx").is_file():
        raise FailedPrecondition(
            f"the chosen trial {chosen['number']}'s bundle is not at {source}: a run with "
            "another --out trained it; run this study from that folder"
        )
    bundle = _replace_dir(source, out / "bundle")
    primary = chosen["targets"][0]
    summary["chosen"] = chosen
    if primary["source"].startswith("measured"):
        again = measure(
            bundle / "model.onnx",
            config.runtime,
            threads=config.measure_threads,
            runs=config.measure_runs * 5,
        )
        summary["remeasured"] = {
            "latency_p50_ms": again.latency_p50_ms,
            "latency_p95_ms": again.latency_p95_ms,
            "study_latency_p95_ms": primary["latency_p95_ms"],
            "ratio_p95": again.latency_p95_ms / primary["latency_p95_ms"],
            "ratio_p50": again.latency_p50_ms / primary["latency_p50_ms"],
        }
    _write_json(out / "hpo.json", summary)
    _plot(records, front, chosen, names, out / "front.png")
    return HpoResult(out=out, front=front, chosen=chosen, bundle=bundle, summary=summary)


def _count_states(records: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "feasible": 0, "untrained": 0}
    for r in records:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
        counts["feasible"] += r["feasible"]
        counts["untrained"] += r["state"] == "complete" and not r["trained"]
    return counts


def _cost_model_error(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimate against the measurement, once an architecture (costed once a study)."""
    by_architecture = {
        (row["flops"], row["parameters"]): row["cost_model_error"]
        for r in records
        for row in r["targets"]
        if "measured_on" in row
    }
    errors = list(by_architecture.values())
    if not errors:
        return {"checked": 0, "note": "no target profile runs here: every figure is estimated"}
    absolute = sorted(abs(e) for e in errors)
    return {
        "checked": len(errors),
        "profile": next(
            (row["measured_on"] for r in records for row in r["targets"] if "measured_on" in row),
            None,
        ),
        "mean_abs_error": sum(absolute) / len(absolute),
        "median_abs_error": absolute[len(absolute) // 2],
        "max_abs_error": absolute[-1],
        "compared": "estimated latency against the measured median (p50)",
    }


def _unmet(records: list[dict[str, Any]], requirements: Requirements) -> list[str]:
    """Each constraint that some completed trial broke: how many, and the best value seen."""
    done = [r for r in records if r["state"] == "complete"]
    lines = []
    keys = sorted({k for r in done for k in r["constraints"]})
    for key in keys:
        counted = [r for r in done if key in r["constraints"]]
        if key == "accuracy.min":  # an untrained trial's accuracy is no measurement
            counted = [r for r in counted if r["trained"]]
        over = [r["constraints"][key] for r in counted if r["constraints"][key] > 0]
        if over:
            lines.append(
                f"{key}: {len(over)} of {len(counted)} trials over budget (the closest by "
                f"{min(over):.4g})"
            )
    return lines


def _replace_dir(source: Path, target: Path) -> Path:
    """A copy of `source` at `target`, swapped in whole: a reader sees the old or the new."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        staging.chmod(0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _plot(
    records: list[dict[str, Any]],
    front: list[dict[str, Any]],
    chosen: dict[str, Any] | None,
    names: list[str],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    done = [r for r in records if r["values"]]
    infeasible = [r for r in done if not r["feasible"] and r["trained"]]
    untrained = [r for r in done if not r["trained"]]
    feasible = [r for r in done if r["feasible"]]
    for group, style, label in (
        (untrained, {"marker": "+", "color": "tab:orange"}, "over budget, not trained"),
        (infeasible, {"marker": "x", "color": "0.6"}, "infeasible"),
        (feasible, {"marker": "o", "color": "tab:blue", "alpha": 0.6}, "feasible"),
    ):
        if group:
            axes.scatter(
                [r["targets"][0]["latency_p95_ms"] for r in group],
                [r["values"]["accuracy"] for r in group],
                label=label,
                **style,
            )
    if front:
        axes.plot(
            [r["targets"][0]["latency_p95_ms"] for r in front],
            [r["values"]["accuracy"] for r in front],
            "-o",
            color="tab:red",
            label="Pareto front",
        )
    if chosen is not None:
        axes.scatter(
            [chosen["targets"][0]["latency_p95_ms"]],
            [chosen["values"]["accuracy"]],
            marker="*",
            s=300,
            color="gold",
            edgecolors="black",
            zorder=5,
            label=f"chosen (trial {chosen['number']})",
        )
    axes.set_xlabel("latency p95 (ms, batch 1)")
    axes.set_ylabel("validation accuracy")
    axes.set_xscale("log")
    axes.grid(True, alpha=0.3)
    if done:
        axes.legend(loc="lower right")
    axes.set_title(f"{len(done)} trials; objectives {', '.join(names)}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _write_json(path: Path, value: Any) -> None:
    replace_text(path, json.dumps(value, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON: {type(value)}")


def load_config(**fields: Any) -> HpoConfig:
    """An HpoConfig, its validation errors as one InvalidArgument."""
    from pydantic import ValidationError

    try:
        return HpoConfig(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'hpo'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArgument(f"invalid HPO settings: {problems}") from exc
