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

import multiprocessing
from collections.abc import Callable
from pathlib import Path

import optuna

from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.trainer.hpo.config import OBJECTIVES, HpoConfig
from kapi.trainer.hpo.objective import Objective
from kapi.trainer.hpo.report import HpoResult, finish

SQLITE_TIMEOUT_S = 60


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
                    "quiet": log is silent,
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


def silent(line: str) -> None:
    """The log of a run that prints only its result (--json)."""


def print_line(line: str) -> None:
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
        config,
        Path(root),
        digest,
        Path(out),
        storage,
        index,
        trials,
        silent if quiet else print_line,
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
            Objective(config, store, dataset, out, log), n_trials=trials, catch=(Exception,)
        )
    finally:
        _close(database)
