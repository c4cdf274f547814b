"""Benchmark the model repository side by side in one run: artifact upload and download
against a plain file copy, and how long an alias move takes to reach a node's answers.

A `kapi repository serve` and a `kapi node` following it run as subprocesses on loopback,
their data, cache and every file of the bench in one temporary directory (one disk).

- Throughput: each round copies a SIZE MB artifact of random bytes (shutil.copyfile, then
  fsync of the file and its directory, as the repository's blob store does), uploads it to a
  new version with RepositoryClient.upload (which hashes it first; the repository hashes and
  fsyncs it) and downloads it to a new file with RepositoryClient.download (digest checked,
  not fsynced); the copy and the download are deleted at once. Its first bytes change every
  round, so every upload is a new blob. MB is 10^6 bytes.
- Alias moves: one node follows `small@production` (an Add, a few hundred bytes) and
  `large@production` (MatMul by a ~SIZE MB FP32 weight, then Add). Before each move the next
  version is pushed (its constant is its number, so the answer says which version it is);
  the clock starts just before set_alias is called and stops when a client polling the node
  every 5 ms over gRPC gets its first answer from the new version. The node's log and cache
  split that time: notice (the call, set_alias's own time included, until the node logs
  `switching model`: the watch stream's event and a resolve), then download, write and
  load as the node logs them with `model switched`. Every round moves both models,
  alternating which first.

Prints min / median / max over the rounds against the goals (upload and download at least
0.5x the copy in the median round; every move of the small model under 2 s, of the large
one under 10 s) and writes bench/results/repository-<time>.json.

    .venv/bin/python bench/repository.py [--rounds 5] [--size-mb 100] [--tmp-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from types import FrameType

import httpx
import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from kapi.repository import entities as ent
from kapi.repository.client import RepositoryClient
from nodebench.process import HOST, ServerCommand, free_ports, serving
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MB = 1_000_000
PROFILE = "cpu-arm64" if platform.machine() in ("aarch64", "arm64") else "cpu-x86_64"
KEY = ("onnxruntime", "fp32", PROFILE)
ALIAS = "production"
BLOB_MODEL = "artifact"
MOVE_MODELS = ("small", "large")
POLL_S = 0.005
SETTLE_S = 1.0  # after a push, for the node to handle its variant.uploaded event
MOVE_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# figure: (goal shown, the statistic it holds, test): throughput by its median round, a
# move by the slowest one.
GOALS: dict[str, tuple[str, str, Callable[[float], bool]]] = {
    "upload / copy": (">= 0.5", "median", lambda x: x >= 0.5),
    "download / copy": (">= 0.5", "median", lambda x: x >= 0.5),
    "move small s": ("< 2 s", "max", lambda x: x < 2.0),
    "move large s": ("< 10 s", "max", lambda x: x < 10.0),
}


@dataclass(frozen=True, slots=True)
class Move:
    """One alias move: seconds from the set_alias call to the first answer of the new
    version, and how that splits (None: a mark the log or cache did not show)."""

    model: str
    version: int
    total_s: float
    set_alias_s: float
    notice_s: float | None
    download_s: float | None
    write_s: float | None
    load_s: float | None
    polls: int
    failures: int


@dataclass(slots=True)
class Stat:
    """One figure over the rounds, and the goal it is held to (`held`: the statistic)."""

    min: float
    median: float
    max: float
    rounds: list[float]
    goal: str = "-"
    held: str = ""
    met: bool | None = None


@dataclass(slots=True)
class Figures:
    transfers: dict[str, list[float]] = field(
        default_factory=lambda: {"copy": [], "upload": [], "download": []}
    )
    moves: list[Move] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds, so the servers are stopped
    started, clock = datetime.now(), time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="kapi-bench-repo-", dir=args.tmp_dir) as tmp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(tmp)
        try:
            figures = _run(root, args.rounds, args.size_mb, stack)
        except BaseException:
            _print_logs(root / "logs")
            raise
    elapsed = time.perf_counter() - clock
    summary = _summary(figures)
    print(f"\n{_table(summary)}\n\n{_phase_table(figures.moves)}\n")
    path = RESULTS / f"repository-{started:%Y%m%d-%H%M%S}.json"
    _write_json(path, figures, summary, _meta(started, elapsed, args))
    print(f"{elapsed:.0f} s in all; results in {path.relative_to(REPO)}")
    return 0


def _run(root: Path, rounds: int, size_mb: int, stack: contextlib.ExitStack) -> Figures:
    """Start the repository and a node following it (stopped when `stack` closes), then
    measure the rounds."""
    repository = stack.enter_context(_repository(root / "repository", root / "logs"))
    client = stack.enter_context(RepositoryClient(repository, _token(root), timeout=120.0))
    print("building models ...", flush=True)
    models = Models(root / "models", size_mb)
    for name in (*MOVE_MODELS, BLOB_MODEL):
        client.create_model(ent.ModelCreate(name=name))
    for name in MOVE_MODELS:
        _push(client, models, name)
        client.set_alias(name, ALIAS, 1, force=True)
    print("starting the node ...", flush=True)
    node = stack.enter_context(serving(_node_command(root, repository)))
    triton = grpcclient.InferenceServerClient(node.ports.grpc_url)
    stack.callback(triton.close)
    for name in MOVE_MODELS:
        _check_answer(triton, models, name, 1)
    source = _random_file(root / "source.bin", size_mb * MB)
    figures = Figures()
    for round_number in range(1, rounds + 1):
        print(f"round {round_number} of {rounds}", flush=True)
        _transfer_round(client, source, root, round_number, figures)
        order = MOVE_MODELS if round_number % 2 else MOVE_MODELS[::-1]
        figures.moves += [_move(client, triton, models, root, name) for name in order]
    return figures


def _print_logs(logs: Path, lines: int = 20) -> None:
    """The servers' last lines, before the temporary directory holding them goes."""
    for log in sorted(logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {log.name}, last {len(tail)} lines:", *tail, sep="\n", file=sys.stderr)


# the processes


@contextlib.contextmanager
def _repository(data: Path, logs: Path) -> Iterator[str]:
    """A `kapi repository serve` on DATA for the block, answering /healthz; yields its URL."""
    port = free_ports().http
    url = f"http://{HOST}:{port}"
    argv = [sys.executable, "-m", "kapi.cli", "repository", "serve"]
    argv += ["--host", HOST, "--port", str(port), "--data", str(data)]
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "repository.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        _wait_healthy(process, url, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")
            raise RuntimeError(f"the repository exited with {process.returncode}:\n{log}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"the repository did not answer in {READY_TIMEOUT_S:.0f} s ({log_path})")


def _token(root: Path) -> str:
    return (root / "repository" / "admin-token").read_text().strip()


def _node_command(root: Path, repository: str) -> ServerCommand:
    """A node following small@production and large@production, logging at INFO (its
    `switching model` lines split each move)."""
    ports = free_ports()
    argv = [sys.executable, "-m", "kapi.cli", "node", "--repository", repository]
    argv += [f"--serve={name}@{ALIAS}" for name in MOVE_MODELS]
    argv += ["--cache-dir", str(root / "cache"), "--host", HOST]
    argv += ["--grpc-port", str(ports.grpc), "--http-port", str(ports.http)]
    argv += ["--metrics-port", str(ports.metrics), "--log-level", "INFO", "--log-format", "text"]
    return ServerCommand("kapi node", argv, root, root / "logs" / "node.log", ports)


# the models


class Models:
    """Serialized versions of the two moved models; version k adds the constant k."""

    def __init__(self, root: Path, size_mb: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.width = {"small": 4, "large": int((size_mb * MB / 4) ** 0.5)}
        weight = np.random.default_rng(0).standard_normal(
            (self.width["large"], self.width["large"]), dtype=np.float32
        )
        self._weight = numpy_helper.from_array(weight, "weight")
        self.checked: set[str] = set()

    def write(self, name: str, number: int) -> Path:
        path = self.root / f"{name}-{number}.onnx"
        model = self._model(name, float(number))
        if name not in self.checked:  # the same graph every version: checked once
            onnx.checker.check_model(model, full_check=True)
            self.checked.add(name)
        path.write_bytes(model.SerializeToString())
        return path

    def _model(self, name: str, constant: float) -> onnx.ModelProto:
        width = self.width[name]
        value = numpy_helper.from_array(np.array(constant, dtype=np.float32), "constant")
        if name == "small":
            nodes = [helper.make_node("Add", ["INPUT0", "constant"], ["OUTPUT0"])]
            initializers = [value]
        else:
            nodes = [
                helper.make_node("MatMul", ["INPUT0", "weight"], ["product"]),
                helper.make_node("Add", ["product", "constant"], ["OUTPUT0"]),
            ]
            initializers = [self._weight, value]
        graph = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
            [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
            initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def _push(client: RepositoryClient, models: Models, name: str) -> tuple[int, str]:
    """A new version of `name` with its ONNX variant; returns its number and digest."""
    number = client.create_version(name, ent.VersionCreate(lineage={"bench": True})).number
    path = models.write(name, number)
    try:
        variant = client.upload(name, number, KEY, path)
    finally:
        path.unlink()
    return number, variant.digest


def _infer(
    triton: grpcclient.InferenceServerClient, models: Models, name: str
) -> tuple[int, float]:
    """(the version that answered, the constant it added to zeros)."""
    row = np.zeros((1, models.width[name]), dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", list(row.shape), "FP32")
    tensor.set_data_from_numpy(row)
    result = triton.infer(name, [tensor])
    output = result.as_numpy("OUTPUT0")
    if output is None:
        raise RuntimeError(f"{name} answered without OUTPUT0")
    return int(result.get_response().model_version), float(output[0, 0])


def _check_answer(
    triton: grpcclient.InferenceServerClient, models: Models, name: str, number: int
) -> None:
    answered, constant = _infer(triton, models, name)
    if (answered, constant) != (number, float(number)):
        raise RuntimeError(f"{name}: version {answered} added {constant}, expected {number}")


# throughput


def _random_file(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        for start in range(0, size, 16 * MB):
            file.write(os.urandom(min(16 * MB, size - start)))
    return path


def _refresh(source: Path) -> None:
    """New first bytes (a new blob for the repository), written through to the disk, so
    that no measured fsync writes the source's pages."""
    with source.open("r+b") as file:
        file.write(os.urandom(16))
        file.flush()
        os.fsync(file.fileno())


def _transfer_round(
    client: RepositoryClient, source: Path, root: Path, round_number: int, figures: Figures
) -> None:
    _refresh(source)
    number = client.create_version(BLOB_MODEL, ent.VersionCreate()).number
    steps: list[tuple[str, Callable[[], float]]] = [
        ("copy", partial(_timed_copy, source, root / f"copy-{round_number}.bin")),
        ("upload", partial(_timed, partial(client.upload, BLOB_MODEL, number, KEY, source))),
        ("download", partial(_timed_download, client, number, root / "download.bin")),
    ]
    if round_number % 2 == 0:  # the copy last, every other round
        steps = steps[1:] + steps[:1]
    size_mb = source.stat().st_size / MB
    for name, step in steps:
        seconds = step()
        figures.transfers[name].append(size_mb / seconds)
        print(f"  {name:<8} {size_mb / seconds:8.1f} MB/s", flush=True)
    client.delete_version(BLOB_MODEL, number)  # its blob can go: disk use stays bounded


def _timed(call: Callable[[], object]) -> float:
    clock = time.perf_counter()
    call()
    return time.perf_counter() - clock


def _timed_copy(source: Path, target: Path) -> float:
    clock = time.perf_counter()
    shutil.copyfile(source, target)
    with target.open("rb") as file:
        os.fsync(file.fileno())
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    seconds = time.perf_counter() - clock
    target.unlink()
    return seconds


def _timed_download(client: RepositoryClient, number: int, target: Path) -> float:
    digest = client.version(BLOB_MODEL, number).variants[0].digest
    seconds = _timed(lambda: client.download(BLOB_MODEL, number, KEY, target, digest))
    target.unlink()
    return seconds


# alias moves


class Prober(threading.Thread):
    """Asks the node every POLL_S until the new version answers."""

    def __init__(
        self,
        triton: grpcclient.InferenceServerClient,
        models: Models,
        name: str,
        number: int,
    ) -> None:
        super().__init__(name=f"probe-{name}", daemon=True)
        self.triton, self.models, self.model, self.number = triton, models, name, number
        self.stop = threading.Event()
        self.answered = threading.Event()
        self.answered_at: float | None = None
        self.polls = self.failures = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set() and not self._poll():
                time.sleep(POLL_S)
        except Exception as exc:  # handed to the main thread, which raises it
            self.error = exc
            self.answered.set()

    def _poll(self) -> bool:
        self.polls += 1
        try:
            answered, constant = _infer(self.triton, self.models, self.model)
        except InferenceServerException:
            self.failures += 1
            return False
        if answered != self.number:
            return False
        self.answered_at = time.perf_counter()
        if constant != float(self.number):
            raise RuntimeError(f"{self.model} version {answered} added {constant}")
        self.answered.set()
        return True


def _move(
    client: RepositoryClient,
    triton: grpcclient.InferenceServerClient,
    models: Models,
    root: Path,
    name: str,
) -> Move:
    number, _ = _push(client, models, name)
    time.sleep(SETTLE_S)
    log_path = root / "logs" / "node.log"
    log_offset = log_path.stat().st_size
    prober = Prober(triton, models, name, number)
    prober.start()
    try:
        wall, clock = time.time(), time.perf_counter()
        client.set_alias(name, ALIAS, number, force=True)
        set_alias_s = time.perf_counter() - clock
        if not prober.answered.wait(MOVE_TIMEOUT_S):
            raise TimeoutError(f"{name} version {number} did not answer in {MOVE_TIMEOUT_S} s")
    finally:
        prober.stop.set()
        prober.join()
    if prober.error is not None or prober.answered_at is None:
        raise RuntimeError(f"probing {name} failed") from prober.error
    total_s = prober.answered_at - clock
    switching = _switching_at(log_path, log_offset, name, number)
    notice_s = None if switching is None else switching - wall
    phases = _switched_phases(log_path, log_offset, name, number)
    move = Move(
        model=name,
        version=number,
        total_s=total_s,
        set_alias_s=set_alias_s,
        notice_s=notice_s,
        download_s=phases.get("download_s"),
        write_s=phases.get("write_s"),
        load_s=phases.get("load_s"),
        polls=prober.polls,
        failures=prober.failures,
    )
    print(f"  move {name:<6} v{number:<3} {total_s:7.3f} s  {_phases(move)}", flush=True)
    return move


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def _switching_at(log_path: Path, offset: int, name: str, number: int) -> float | None:
    """When the node logged that it switches `name` to `number` (epoch seconds, to the ms);
    None when the log does not say."""
    with log_path.open("rb") as file:
        file.seek(offset)
        lines = file.read().decode(errors="replace").splitlines()
    marks = {f"target={name}@{ALIAS}", f"version={number}"}
    for line in lines:
        if "switching model" in line and marks <= set(line.split()):
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _switched_phases(log_path: Path, offset: int, name: str, number: int) -> dict[str, float]:
    """The phases the node logged with `model switched` for `name` version `number`."""
    with log_path.open("rb") as file:
        file.seek(offset)
        lines = file.read().decode(errors="replace").splitlines()
    marks = {f"target={name}@{ALIAS}", f"version={number}"}
    for line in lines:
        fields = set(line.split())
        if "model switched" in line and marks <= fields:
            pairs = (field.partition("=") for field in fields)
            return {k: float(v) for k, _, v in pairs if k.endswith("_s") and v}
    return {}


def _phases(move: Move) -> str:
    parts = [("set_alias", move.set_alias_s), ("notice", move.notice_s)]
    parts += [("download", move.download_s), ("write", move.write_s), ("load", move.load_s)]
    return " ".join(f"{label} {'-' if value is None else f'{value:.3f}'}" for label, value in parts)


# the report


def _summary(figures: Figures) -> dict[str, Stat]:
    rounds = dict(figures.transfers)
    rates = {f"{name} MB/s": values for name, values in rounds.items()}
    for name in ("upload", "download"):
        pairs = zip(rounds[name], rounds["copy"], strict=True)
        rates[f"{name} / copy"] = [value / copy for value, copy in pairs]
    for name in MOVE_MODELS:
        rates[f"move {name} s"] = [m.total_s for m in figures.moves if m.model == name]
    return {figure: _stat(figure, values) for figure, values in rates.items()}


def _stat(figure: str, values: list[float]) -> Stat:
    stat = Stat(min(values), statistics.median(values), max(values), values)
    if figure in GOALS:
        stat.goal, stat.held, test = GOALS[figure]
        stat.met = test(getattr(stat, stat.held))
    return stat


def _table(summary: dict[str, Stat]) -> str:
    lines = [f"{'figure':<18} {'min':>9} {'median':>9} {'max':>9}  {'goal':<8} {'of':<7} met"]
    for figure, row in summary.items():
        met = {None: "", True: "yes", False: "NO"}[row.met]
        digits = 1 if figure.endswith("MB/s") else 3
        cells = " ".join(f"{value:9.{digits}f}" for value in (row.min, row.median, row.max))
        lines.append(f"{figure:<18} {cells}  {row.goal:<8} {row.held:<7} {met}")
    return "\n".join(lines)


def _phase_table(moves: list[Move]) -> str:
    """Where a move's time goes, median seconds per model."""
    columns = ("set_alias_s", "notice_s", "download_s", "write_s", "load_s", "total_s")
    lines = [f"{'move (median s)':<16}" + "".join(f"{c.removesuffix('_s'):>11}" for c in columns)]
    lines[0] += f"{'failures':>10}"
    for name in MOVE_MODELS:
        rows = [asdict(m) for m in moves if m.model == name]
        cells = []
        for column in columns:
            values = [row[column] for row in rows if row[column] is not None]
            cells.append(f"{statistics.median(values):11.3f}" if values else f"{'-':>11}")
        failures = sum(row["failures"] for row in rows)
        lines.append(f"{name:<16}" + "".join(cells) + f"{failures:>10}")
    return "\n".join(lines)


def _write_json(
    path: Path, figures: Figures, summary: dict[str, Stat], meta: dict[str, object]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "meta": meta,
        "figures": {figure: asdict(stat) for figure, stat in summary.items()},
        "moves": [asdict(move) for move in figures.moves],
    }
    path.write_text(json.dumps(body, indent=2) + "\n")


def _meta(started: datetime, elapsed: float, args: argparse.Namespace) -> dict[str, object]:
    packages = ["kapi", "onnxruntime", "onnx", "tritonclient", "httpx", "grpcio", "numpy"]
    return {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "versions": {name: version(name) for name in packages},
        "plan": {
            "rounds": args.rounds,
            "size_mb": args.size_mb,
            "tmp_dir": str(args.tmp_dir or tempfile.gettempdir()),
            "poll_s": POLL_S,
            "settle_s": SETTLE_S,
            "variant": "/".join(KEY),
        },
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=_positive, default=5, help="measured rounds (default 5)")
    parser.add_argument(
        "--size-mb", type=_positive, default=100, help="artifact and large model size (default 100)"
    )
    parser.add_argument(
        "--tmp-dir", type=Path, help="where the bench's files live (default the system's)"
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
