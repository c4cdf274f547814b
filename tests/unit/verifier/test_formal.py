"""The formal verifier on ONNX graphs: the parsed graph computes what ONNX Runtime does; its
IBP and CROWN bounds hold every output sampled densely in the box (CROWN's never looser
than IBP's); a small CNN trained on digits gets certificates that PGD never breaks while
PGD flips most inputs at a large ε; and a graph with an operator that is not piecewise
linear (an int8 QDQ model, Sigmoid, Softmax) is refused with the operator named."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from kapi.core.errors import InvalidArgument
from kapi.optimizer.source import simplify
from kapi.trainer import models
from kapi.trainer.bundle import export_onnx
from kapi.trainer.data.sources import open_source
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.verifier import formal
from kapi.verifier.artifact import open_artifact, runner
from kapi.verifier.evidence import Holdout
from onnx import TensorProto, helper, numpy_helper
from torch import nn

PIXEL = 1 / 255


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: as fast on networks this small, and not slowed down many times
    over by OpenMP threads waiting on each other when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Builder:
    """A hand-built ONNX graph (opset 17) with random constants."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, value: Any, dtype: Any = np.float32) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def random(self, *shape: int, scale: float = 1.0) -> str:
        return self.constant(self.rng.standard_normal(shape) * scale)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attributes: Any) -> str:
        names = [f"t{len(self.nodes)}_{i}" for i in range(outputs)]
        node = helper.make_node(op_type, list(inputs), names, name=f"n{len(self.nodes)}")
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attributes.items())
        self.nodes.append(node)
        return names[0]

    def save(self, output: str, shape: list[int], path: Path, rank: int = 2) -> Path:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *shape])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None] * rank)],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return path


def _mlp(path: Path, features: int = 4, hidden: int = 6, seed: int = 0) -> Path:
    """Gemm, BatchNormalization, LeakyRelu, MatMul, arithmetic with constants, Clip with
    Constant bounds, Relu, Reshape, Identity, Flatten."""
    b = Builder(seed)
    t = b.op("Gemm", "input", b.random(hidden, features), b.random(hidden),
             transB=1, alpha=0.9, beta=1.1)  # fmt: skip
    t = b.op("BatchNormalization", t, b.random(hidden), b.random(hidden), b.random(hidden),
             b.constant(b.rng.uniform(0.5, 2, hidden)), epsilon=1e-3)  # fmt: skip
    t = b.op("LeakyRelu", t, alpha=0.1)
    t = b.op("MatMul", t, b.random(hidden, hidden, scale=0.5))
    t = b.op("Add", b.random(hidden), t)
    low = b.op("Constant", value=numpy_helper.from_array(np.array(-0.5, np.float32)))
    high = b.op("Constant", value=numpy_helper.from_array(np.array(1.5, np.float32)))
    t = b.op("Clip", t, low, high)
    t = b.op("Sub", b.constant(0.25), t)
    t = b.op("Mul", t, b.random(hidden))
    t = b.op("Div", t, b.constant(0.8))
    t = b.op("Relu", b.op("Sub", t, b.random(hidden)))
    t = b.op("Reshape", t, b.constant([0, 2, -1], np.int64))
    t = b.op("Flatten", b.op("Identity", t), axis=1)
    t = b.op("Gemm", t, b.random(hidden, 3))
    return b.save(t, [features], path)


def _convnet(path: Path, channels: int = 2, side: int = 9, seed: int = 0) -> Path:
    """Convolutions (asymmetric pads, strides, dilations, groups), residual Add and Sub of
    two tensors, MaxPool and AveragePool with ceil_mode and pads, ReLU6, global average
    pooling and a linear classifier."""
    b = Builder(seed)
    c = 4
    t = b.op("Conv", "input", b.random(c, channels, 3, 3, scale=0.5), b.random(c),
             pads=[1, 0, 1, 2])  # fmt: skip
    a = b.op("Relu", t)
    d = b.op("Conv", a, b.random(c, 1, 3, 3, scale=0.5), group=c, pads=[2, 2, 2, 2],
             dilations=[2, 2])  # fmt: skip
    d = b.op("BatchNormalization", d, b.random(c), b.random(c), b.random(c),
             b.constant(b.rng.uniform(0.5, 2, c)))  # fmt: skip
    t = b.op("Relu", b.op("Add", a, d))
    t = b.op("MaxPool", t, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    t = b.op("Clip", t, b.constant(0.0), b.constant(6.0))
    s = b.op("Conv", t, b.random(c, c, 2, 2, scale=0.5), strides=[2, 2], pads=[0, 0, 1, 1])
    t = b.op("AveragePool", t, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1],
             ceil_mode=1, count_include_pad=1)  # fmt: skip
    t = b.op("LeakyRelu", b.op("Sub", t, s), alpha=0.2)
    t = b.op("MaxPool", t, kernel_shape=[2, 2], strides=[1, 1], dilations=[1, 1], pads=[1, 1, 0, 0])
    t = b.op("Conv", t, b.random(c, c, 1, 1), b.random(c))
    t = b.op("Flatten", b.op("GlobalAveragePool", b.op("Relu", t)))
    t = b.op("Gemm", t, b.random(3, c), b.random(3), transB=1)
    return b.save(t, [channels, side, side], path)


def _calibrated(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """Batch norms with the statistics of `sample`, so that the export is not trivial."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(sample)
    return model.eval()


def _exported(model: nn.Module, shape: list[int], path: Path) -> Path:
    """The zoo's export, simplified as the optimizer does it."""
    raw = path.with_name(path.stem + ".raw.onnx")
    export_onnx(model, shape, raw)
    simplify(raw, path)
    return path


def _onnxruntime(path: Path) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.astype(np.float32)})[0]


# --- the parsed graph computes what ONNX Runtime does ---------------------------------


def test_small_cnn_export_runs_as_onnx_runtime_runs_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    model = _calibrated(models.build("small_cnn", in_channels=1, num_classes=10, width=0.25), x)
    path = _exported(model, [1, 28, 28], tmp_path / "model.onnx")
    graph = formal.load_graph(path)
    assert graph.sample_shape == (1, 28, 28)
    assert {node.kind for node in graph.nodes} == {
        "Conv", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm",
    }  # fmt: skip
    np.testing.assert_allclose(graph(x.numpy()), _onnxruntime(path)(x.numpy()), atol=1e-5)


@pytest.mark.parametrize("build", [_mlp, _convnet])
def test_hand_built_graphs_run_as_onnx_runtime_runs_them(tmp_path: Path, build: Any) -> None:
    path = build(tmp_path / "model.onnx")
    graph = formal.load_graph(path)
    assert graph.sample_shape is not None
    x = np.random.default_rng(1).standard_normal((32, *graph.sample_shape)).astype(np.float32)
    np.testing.assert_allclose(graph(x), _onnxruntime(path)(x), rtol=1e-4, atol=1e-5)


POOLS = {
    "max-pads-ceil": ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2],
                                  "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "max-ceil-cut": ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    "max-dilated": ("MaxPool", {"kernel_shape": [3, 2], "strides": [2, 3],
                                "pads": [1, 0, 0, 1], "dilations": [2, 1]}),
    # a last window that would start in the end padding is dropped, as ONNX Runtime does
    "max-ceil-dropped": ("MaxPool", {"kernel_shape": [2, 2], "strides": [3, 3],
                                     "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "average-ceil": ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2],
                                     "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "average-ceil-pads": ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2],
                                          "pads": [1, 1, 1, 1], "ceil_mode": 1,
                                          "count_include_pad": 1}),
    "average-asymmetric": ("AveragePool", {"kernel_shape": [2, 3], "strides": [1, 2],
                                           "pads": [0, 1, 1, 0], "count_include_pad": 1}),
}  # fmt: skip


@pytest.mark.parametrize("side", [10, 11])
@pytest.mark.parametrize("pool", POOLS)
def test_pools_run_as_onnx_runtime_runs_them_and_are_bounded(
    tmp_path: Path, pool: str, side: int
) -> None:
    op_type, attributes = POOLS[pool]
    b = Builder(side)
    t = b.op("Conv", "input", b.random(3, 2, 3, 3), b.random(3), pads=[1, 1, 1, 1])
    t = b.op(op_type, b.op("Relu", t) if op_type == "AveragePool" else t, **attributes)
    path = b.save(b.op("Flatten", t), [2, side, side], tmp_path / "pool.onnx")
    x = np.random.default_rng(side).standard_normal((8, 2, side, side)).astype(np.float32)
    graph = formal.load_graph(path)
    np.testing.assert_allclose(graph(x), _onnxruntime(path)(x), rtol=1e-4, atol=1e-5)
    _check_sound(graph, x[:1], 0.05)


def test_residual_zoo_models_run_as_onnx_runtime_runs_them(tmp_path: Path) -> None:
    """resnet18 (residual Adds) and mobilenet_v2 (ReLU6 as Clip) parse and agree with ONNX
    Runtime as closely as PyTorch itself does (their deep float32 sums differ in order)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for name, arguments in (("resnet18", {"input_size": 32}), ("mobilenet_v2", {})):
        model = models.build(name, in_channels=3, num_classes=10, width=0.25, **arguments)
        model = _calibrated(model, x)
        path = _exported(model, [3, 32, 32], tmp_path / f"{name}.onnx")
        expected = _onnxruntime(path)(x.numpy())
        with torch.no_grad():
            pytorch = np.abs(model(x).numpy() - expected).max()
        got = formal.load_graph(path)(x.numpy())
        assert np.abs(got - expected).max() <= 2 * pytorch + 1e-5 * np.abs(expected).max()


# --- soundness by dense sampling ------------------------------------------------------


def _samples(x: np.ndarray[Any, Any], low: np.ndarray[Any, Any], high: np.ndarray[Any, Any],
             count: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:  # fmt: skip
    """`count` points of the box [low, high] around one input: uniform ones, random
    corners, every corner where there are few, and the input itself."""
    dims = x.size
    if dims <= 12:
        corners = np.array(list(itertools.product([0.0, 1.0], repeat=dims)))
    else:
        corners = rng.integers(0, 2, (count // 2, dims)).astype(np.float64)
    unit = np.concatenate([corners, rng.uniform(0, 1, (count, dims))])
    points = low.ravel() + unit * (high - low).ravel()
    return np.concatenate([x.reshape(1, -1), points]).reshape(-1, *x.shape).astype(np.float32)


def _extremes(graph: formal.Graph, low: np.ndarray[Any, Any], high: np.ndarray[Any, Any],
              rng: np.random.Generator) -> np.ndarray[Any, Any]:  # fmt: skip
    """Points of the box pushed by signed gradient steps towards each output's largest and
    smallest values: near the extremes that uniform samples of many dimensions miss."""
    lo, hi = torch.from_numpy(low[None]), torch.from_numpy(high[None])
    outputs = graph.forward(lo).shape[1]
    starts = torch.from_numpy(rng.uniform(0, 1, (2 * outputs, *low.shape)).astype(np.float32))
    point = lo + starts * (hi - lo)
    direction = torch.cat([torch.eye(outputs), -torch.eye(outputs)])
    for _ in range(30):
        point.requires_grad_(True)
        (grad,) = torch.autograd.grad((graph.forward(point) * direction).sum(), point)
        point = torch.minimum(torch.maximum(point.detach() + grad.sign() * (hi - lo) / 10, lo), hi)
    return point.numpy()


def _check_sound(graph: formal.Graph, x: np.ndarray[Any, Any], eps: float,
                 domain: tuple[float, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every sampled output lies within each method's bounds; the bounds by method."""
    rng = np.random.default_rng(0)
    lower, upper = domain if domain is not None else (None, None)
    x = x if domain is None else np.clip(x, *domain)  # the valid inputs hold x
    found = {}
    for method in formal.METHODS:
        lo, hi = formal.bounds(graph, x, eps, method, lower=lower, upper=upper)
        for i in range(len(x)):
            low, high = x[i] - eps, x[i] + eps
            if domain is not None:
                low, high = np.maximum(low, domain[0]), np.minimum(high, domain[1])
            points = _samples(x[i], low, high, 3000, rng)
            points = np.concatenate([points, _extremes(graph, low, high, rng)])
            outputs = graph(points)
            slack = 1e-4 * (1 + np.abs(outputs).max())
            assert (outputs >= lo[i] - slack).all(), (method, i)
            assert (outputs <= hi[i] + slack).all(), (method, i)
        found[method] = (lo, hi)
    return found


@pytest.mark.parametrize("features", [2, 3, 4])
def test_bounds_hold_every_sampled_output_of_small_mlps(tmp_path: Path, features: int) -> None:
    graph = formal.load_graph(_mlp(tmp_path / "mlp.onnx", features=features, seed=features))
    x = np.random.default_rng(features).standard_normal((3, features)).astype(np.float32)
    _check_sound(graph, x, 0.3)
    _check_sound(graph, x, 0.3, domain=(-0.5, 0.5))


def test_bounds_hold_every_sampled_output_of_a_conv_net(tmp_path: Path) -> None:
    graph = formal.load_graph(_convnet(tmp_path / "conv.onnx", side=7))
    x = np.random.default_rng(0).standard_normal((2, 2, 7, 7)).astype(np.float32)
    for eps in (0.01, 0.05):
        _check_sound(graph, x, eps)
    _check_sound(graph, x, 0.05, domain=(-1.0, 1.0))


def test_bounds_hold_on_a_small_cnn_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    model = _calibrated(models.build("small_cnn", in_channels=1, num_classes=10, width=0.25), x)
    graph = formal.load_graph(_exported(model, [1, 8, 8], tmp_path / "model.onnx"))
    _check_sound(graph, x.numpy()[:2], 0.05)


@pytest.mark.parametrize("seed", range(4))
def test_crown_is_never_looser_than_ibp(tmp_path: Path, seed: int) -> None:
    builds = (_mlp(tmp_path / "mlp.onnx", seed=seed), _convnet(tmp_path / "conv.onnx", seed=seed))
    for path in builds:
        graph = formal.load_graph(path)
        assert graph.sample_shape is not None
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((4, *graph.sample_shape)).astype(np.float32)
        widths = {}
        for method in formal.METHODS:
            lo, hi = formal.bounds(graph, x, 0.05, method)
            widths[method] = float((hi - lo).mean())
            if method != "ibp":
                ibp_lo, ibp_hi = formal.bounds(graph, x, 0.05, "ibp")
                assert (lo >= ibp_lo - 1e-6).all()
                assert (hi <= ibp_hi + 1e-6).all()
        assert widths["crown"] <= widths["crown-ibp"] + 1e-6 < widths["ibp"]
        labels = graph(x).argmax(1)
        ibp = formal.margins(graph, x, labels, 0.05, "ibp")
        assert (formal.margins(graph, x, labels, 0.05, "crown") >= ibp - 1e-6).all()


def test_windowed_back_substitution_matches_the_dense_one(tmp_path: Path) -> None:
    """Neurons' coefficients kept in their receptive fields give the bounds that full-size
    coefficients give."""
    graph = formal.load_graph(_convnet(tmp_path / "conv.onnx"))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 2, 9, 9)).astype("f"))
    bounder = formal._Bounder(graph, x - 0.05, x + 0.05, "crown")
    for node in graph.nodes:
        shape = bounder.shapes[node.output]
        if len(shape) != 3:
            continue
        elements = torch.arange(0, int(np.prod(shape)), 7)
        rows = formal._one_hot(elements, shape, torch.float32)
        owner = torch.zeros(2 * len(elements), dtype=torch.int64)
        windowed = bounder.lower_bound(node.output, rows, owner)
        dense = formal.Coefficients(rows.dense(shape))
        assert rows.origin is not None
        expected = bounder.lower_bound(node.output, dense, owner)
        torch.testing.assert_close(windowed, expected, rtol=1e-4, atol=1e-5)


# --- certificates, and PGD against them -----------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """A small CNN trained for a few seconds on scikit-learn's 8x8 digits, exported and
    simplified as the optimizer serves it."""
    root = tmp_path_factory.mktemp("digits")
    dataset, _ = DatasetStore(root).ingest("digits", open_source("sklearn-digits").load())
    images, labels = dataset.split("train")
    x = torch.from_numpy(dataset.preprocessing.apply(images))
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = models.build("small_cnn", in_channels=1, num_classes=10, width=0.25)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(15):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    path = _exported(model.eval(), [1, 8, 8], root / "model.onnx")
    return path, dataset


def test_certificates_on_trained_digits_are_never_broken_by_pgd(
    digits: tuple[Path, Dataset],
) -> None:
    path, dataset = digits
    tests = Holdout.from_dataset(dataset, samples=120)
    assert tests.labels is not None
    result = formal.certify_test_set(path, tests, [PIXEL, 2 * PIXEL])
    assert list(result) == [f"{PIXEL:g}", f"{2 * PIXEL:g}"]
    row = result[f"{PIXEL:g}"]
    assert row["method"] == formal.DEFAULT_METHOD
    assert row["samples"] == 120
    assert row["correct"] >= 0.85 * 120
    assert 0 < row["certified"] <= row["correct"]
    assert row["certified_fraction"] == row["certified"] / 120

    graph, served = formal.load_graph(path), runner(open_artifact(path))
    x, y = tests.inputs(), tests.labels
    np.testing.assert_allclose(graph(x), served(x), atol=1e-4)
    domain = formal.input_domain(dataset.preprocessing)
    for eps in (PIXEL, 2 * PIXEL):
        box = {"lower": domain.lower, "upper": domain.upper}
        certified = formal.certify(graph, x, y, domain.epsilon(eps), **box)
        assert int(certified.sum()) == result[f"{eps:g}"]["certified"]
        attack = formal.pgd_attack(graph, x[certified], y[certified], domain.epsilon(eps),
                                   steps=30, restarts=2, judge=served, **box)  # fmt: skip
        assert not attack.flipped.any()
        step = domain.epsilon(eps) + 1e-6
        assert (np.abs(attack.adversarial - x[certified]) <= step).all()

    correct = graph(x).argmax(1) == y
    attack = formal.pgd_attack(graph, x[correct], y[correct], domain.epsilon(0.3),
                               lower=domain.lower, upper=domain.upper, judge=served)  # fmt: skip
    assert attack.flipped.mean() > 0.5
    wide = formal.certify(graph, x[correct], y[correct], domain.epsilon(0.3),
                          lower=domain.lower, upper=domain.upper)  # fmt: skip
    assert not wide[attack.flipped].any()


def test_certified_fraction_counts_only_correct_inputs(digits: tuple[Path, Dataset]) -> None:
    path, dataset = digits
    x, y = dataset.split("test")
    inputs = dataset.preprocessing.apply(x[:40])
    wrong = (y[:40] + 1) % 10  # every label wrong: nothing is certified, even at ε = 0
    result = formal.certified_fraction(path, inputs, wrong, [0.0, PIXEL], "crown-ibp")
    assert result["0"]["correct"] <= 2
    assert result["0"]["certified"] == 0
    assert result[f"{PIXEL:g}"]["certified_fraction"] == 0.0
    exact = formal.certified_fraction(path, inputs, y[:40], [0.0], "ibp")["0"]
    assert exact["certified"] == exact["correct"]  # a box of one point: certified if correct


def test_a_pixel_eps_is_read_in_input_units(digits: tuple[Path, Dataset]) -> None:
    _, dataset = digits
    preprocessing = dataset.preprocessing
    domain = formal.input_domain(preprocessing)
    std, mean = preprocessing.std[0], preprocessing.mean[0]
    assert domain.epsilon(PIXEL).ravel() == pytest.approx([PIXEL / std])
    assert domain.lower.ravel() == pytest.approx([-mean / std])
    assert domain.upper.ravel() == pytest.approx([(1 - mean) / std])


# --- not verifiable -------------------------------------------------------------------


def _quantized(source: Path, samples: np.ndarray[Any, Any], target: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"input": samples[i : i + 1]} for i in range(len(samples))])

        def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
            return next(self.batches, None)

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ)
    return target


def test_an_int8_qdq_model_is_not_verifiable(digits: tuple[Path, Dataset]) -> None:
    path, dataset = digits
    x, y = dataset.split("test")
    samples = dataset.preprocessing.apply(x[:16])
    quantized = _quantized(path, samples, path.with_name("int8.onnx"))
    with pytest.raises(formal.NotVerifiable) as refused:
        formal.load_graph(quantized)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(refused.value.operators)
    assert isinstance(refused.value, InvalidArgument)
    assert "is not verifiable" in refused.value.message
    tests = Holdout("digits", x[:8], y[:8], dataset.preprocessing)
    with pytest.raises(InvalidArgument, match=r"not verifiable.*QuantizeLinear"):
        formal.certify_test_set(quantized, tests, [PIXEL])


def _refused(
    tmp_path: Path, build: Callable[[Builder, str], str], rank: int = 2
) -> formal.NotVerifiable:
    b = Builder()
    t = b.op("Gemm", "input", b.random(4, 3), transB=1)
    output = build(b, t)
    path = b.save(output, [3], tmp_path / "model.onnx", rank)
    with pytest.raises(formal.NotVerifiable) as refused:
        formal.load_graph(path)
    return refused.value


def test_sigmoid_silu_softmax_and_resize_are_not_verifiable(tmp_path: Path) -> None:
    silu = _refused(tmp_path, lambda b, t: b.op("Mul", t, b.op("Sigmoid", t)))
    assert silu.operators == ["Sigmoid"]
    assert silu.nodes == ["n1"]
    assert "Sigmoid (node 'n1')" in silu.message
    softmax = _refused(tmp_path, lambda b, t: b.op("Softmax", b.op("Relu", t), axis=1))
    assert softmax.operators == ["Softmax"]
    resize = _refused(tmp_path, lambda b, t: b.op(
        "Resize", b.op("Reshape", t, b.constant([0, 1, 2, 2], np.int64)), "",
        b.constant([1, 1, 2, 2]),
    ), rank=4)  # fmt: skip
    assert resize.operators == ["Resize"]


def test_products_of_tensors_are_not_verifiable(tmp_path: Path) -> None:
    square = _refused(tmp_path, lambda b, t: b.op("Mul", t, t))
    assert square.operators == ["Mul"]
    assert "two tensors" in square.message
    inverse = _refused(tmp_path, lambda b, t: b.op("Div", b.constant(1.0), t))
    assert inverse.operators == ["Div"]
    product = _refused(tmp_path, lambda b, t: b.op("MatMul", t, b.op("Relu", t)))
    assert product.operators == ["MatMul"]


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    graph = formal.load_graph(_mlp(tmp_path / "mlp.onnx"))
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(InvalidArgument, match="unknown bounding method"):
        formal.bounds(graph, x, 0.1, "deeppoly")
    with pytest.raises(InvalidArgument, match="must not be negative"):
        formal.certify(graph, x, np.zeros(2), -0.1)
    with pytest.raises(InvalidArgument, match="labels must lie in"):
        formal.certify(graph, x, np.array([7, 7]), 0.1)
    with pytest.raises(InvalidArgument, match="steps >= 1"):
        formal.pgd_attack(graph, x, np.zeros(2), 0.1, steps=0)
    with pytest.raises(InvalidArgument, match="not an ONNX model"):
        formal.load_graph(tmp_path / "missing.onnx")
    assert formal.certify(graph, x[:0], np.zeros(0), 0.1).shape == (0,)
    assert formal.pgd_attack(graph, x[:0], np.zeros(0), 0.1).flipped.shape == (0,)
