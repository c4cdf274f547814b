"""The demo's data stage: real datasets that ship in packages ingested as content-addressed
versions with a stratified split and training-split statistics, then analyzed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from kapi.demo._optimize import optimize_stage
from kapi.trainer.data.analyze import analyze
from kapi.trainer.data.sources import FASHION_MNIST, open_source
from kapi.trainer.data.store import DatasetStore


def data_stage(root: Path, registry: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    store = DatasetStore(root)
    print(f"10. datasets in {root}: kapi data ingest, then kapi data analyze")
    sources = [("sklearn-digits", "digits"), ("mnist-subset", "mnist")]
    if FASHION_MNIST.is_dir():
        sources.append(("fashion-mnist", "fashion-mnist"))
    else:
        print(f"   (no {FASHION_MNIST}: apt-get install dataset-fashion-mnist adds Fashion-MNIST)")
    for source, name in sources:
        samples = open_source(source).load()
        dataset, _ = store.ingest(name, samples, seed=0)
        counts = {split: sum(c.values()) for split, c in dataset.meta["counts"].items()}
        mean = ", ".join(f"{m:.3f}" for m in dataset.preprocessing.mean)
        print(f"   {name}: {samples.description}, {dataset.digest[:19]}, {counts}, "
              f"training mean {mean}")  # fmt: skip
    again, new = store.ingest("digits", open_source("sklearn-digits").load(), seed=0)
    print(f"   digits ingested again: the same version ({again.digest[:19]}), new = {new}")
    for name in ("digits", sources[-1][1]):
        started = time.monotonic()
        report = analyze(store.get(name), root / f"{name}-report")
        print(f"   {name} analyzed in {time.monotonic() - started:.1f} s: {report.markdown_path}")
        for line in report.summary_lines():
            print(f"     {line}")
    train_stage(store, root)
    hpo_stage(root, sources[-1][1], registry)
    optimize_stage(root, sources[-1][1], registry)


def train_stage(store: DatasetStore, root: Path) -> None:
    """kapi train on digits: the small CNN, with early stopping, into a bundle."""
    from kapi.trainer.bundle import write_bundle
    from kapi.trainer.training import TrainConfig, train

    config = TrainConfig(dataset="digits", model="small_cnn", epochs=20, seed=0)
    print("   kapi train --dataset digits --model small_cnn (20 epochs at most, early stopping)")
    started = time.monotonic()
    result = train(config, store, root / "runs" / "digits", progress=False)
    bundle = write_bundle(result, store.get("digits"), config, root / "runs" / "digits" / "bundle")
    print(f"   {len(result.history)} epochs in {time.monotonic() - started:.1f} s (best at "
          f"epoch {result.best_epoch}), test accuracy {result.test_accuracy:.4f}")  # fmt: skip
    print(f"   bundle: {bundle} ({', '.join(sorted(p.name for p in bundle.iterdir()))})")


def hpo_stage(root: Path, dataset: str, registry: Path) -> None:
    """A short hardware-aware study with `kapi train --hpo`, and its chosen bundle pushed to
    the model repository with `kapi push`."""
    from kapi.core.hardware import detect_profiles
    from kapi.demo._registry import running_repository

    here = next(p for p in detect_profiles() if p.startswith("cpu-"))
    spec = root / "requirements.yaml"
    spec.write_text(
        f"model: {dataset}\ntask: classification\ntargets:\n"
        f"  - profile: {here}\n    latency_p95_ms: 0.5\n"
        "  - profile: mcu-cortex-m0\n    max_weights_kb: 250\n"
    )
    kapi = [sys.executable, "-m", "kapi.cli"]
    command = [
        "train", "--hpo", "--dataset", dataset, "--root", str(root), "--requirements", str(spec),
        "--trials", "8", "--epochs", "2", "--train-samples", "3000", "--models",
        "small_cnn,mobilenet_v2,efficientnet_b0", "--out", str(root / "hpo"),
    ]  # fmt: skip
    print(f"11. hardware-aware HPO, then the chosen model into the repository:\n"
          f"   kapi {' '.join(command)}")  # fmt: skip
    print(f"   (budgets: p95 under 0.5 ms on {here}, measured; weights under 250 KB on "
          "mcu-cortex-m0, int8, estimated)")  # fmt: skip
    started = time.monotonic()
    done = subprocess.run([*kapi, *command], capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        print(f"     {line}")
    print(f"   the study took {time.monotonic() - started:.0f} s")
    with running_repository(registry) as (_, env):
        pushed = subprocess.run(
            [*kapi, "push", dataset, str(root / "hpo" / "bundle")],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        print(f"   kapi push {dataset} {root / 'hpo' / 'bundle'}:")
        for line in pushed.stdout.splitlines():
            print(f"     {line}")
