"""Shadow traffic: a share of a model's requests mirrored to another version or backend.

The client never waits for the shadow: the mirror is sent after the primary has answered,
from a task of its own, and its answer is dropped once compared. What is recorded per model:
the shadow's requests, errors and latency, and its agreement with the primary: top-1
agreement for classifier outputs (floating point, last dimension above 1), the largest
absolute difference for every other output. At most `max_in_flight` mirrors run at once;
beyond that a mirror is dropped (and counted), so a slow shadow cannot pile up work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.errors import KapiError
from kapi.core.tensors import from_raw
from kapi.gateway.backends import Backend
from kapi.gateway.metrics import GatewayMetrics
from kapi.gateway.router import Router
from kapi.gateway.routes import Shadow
from kapi.gateway.wire import RoutingFields, rewrite

log = logging.getLogger(__name__)
SHADOW_TIMEOUT_S = 30.0
_FLOATS = ("FP16", "BF16", "FP32", "FP64")


@dataclass
class ShadowStats:
    target: str
    requests: int = 0
    errors: int = 0
    dropped: int = 0
    compared_rows: int = 0
    agreeing_rows: int = 0
    max_abs_difference: float = 0.0
    latency_s_total: float = 0.0
    last_error: str = ""

    def describe(self) -> dict[str, Any]:
        answered = self.requests - self.errors
        return {
            "target": self.target,
            "requests": self.requests,
            "errors": self.errors,
            "dropped": self.dropped,
            "top1_agreement": (
                self.agreeing_rows / self.compared_rows if self.compared_rows else None
            ),
            "compared_rows": self.compared_rows,
            "max_abs_difference": self.max_abs_difference,
            "mean_latency_ms": (
                round(self.latency_s_total / answered * 1000, 3) if answered else None
            ),
            "last_error": self.last_error,
        }


class Shadowing:
    def __init__(
        self,
        router: Router,
        metrics: GatewayMetrics,
        rng: random.Random | None = None,
        max_in_flight: int = 64,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.max_in_flight = max_in_flight
        self.stats: dict[str, ShadowStats] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def maybe_mirror(
        self, fields: RoutingFields, payload: bytes, primary: bytes, backend: Backend
    ) -> None:
        entry = self.router.routes.get(fields.model_name)
        if entry is None or entry.route.shadow is None:
            return
        shadow = entry.route.shadow
        if self.rng.random() >= shadow.fraction:
            return
        stats = self._stats(fields.model_name, shadow)
        target = stats.target
        if len(self._tasks) >= self.max_in_flight:
            stats.dropped += 1
            self.metrics.shadow_requests.labels(fields.model_name, target, "dropped").inc()
            return
        task = asyncio.create_task(self._mirror(fields, payload, primary, shadow, stats))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stats(self, model: str, shadow: Shadow) -> ShadowStats:
        target = "/".join(
            part
            for part in (
                f"version {shadow.version}" if shadow.version else "",
                shadow.backend or "",
            )
            if part
        )
        stats = self.stats.get(model)
        if stats is None or stats.target != target:  # a new shadow starts its own record
            stats = self.stats[model] = ShadowStats(target)
        return stats

    async def _mirror(
        self,
        fields: RoutingFields,
        payload: bytes,
        primary: bytes,
        shadow: Shadow,
        stats: ShadowStats,
    ) -> None:
        model = fields.model_name
        stats.requests += 1
        started = time.perf_counter()
        try:
            backend = self._backend(model, shadow)
            data = rewrite(payload, RoutingFields(), shadow.version) if shadow.version else payload
            answer = await backend.unary("ModelInfer")(data, timeout=SHADOW_TIMEOUT_S)
        except (grpc.aio.AioRpcError, KapiError) as exc:
            stats.errors += 1
            stats.last_error = (
                exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc.message
            )
            self.metrics.shadow_requests.labels(model, stats.target, "error").inc()
            return
        elapsed = time.perf_counter() - started
        stats.latency_s_total += elapsed
        self.metrics.shadow_latency.labels(model, stats.target).observe(elapsed)
        self.metrics.shadow_requests.labels(model, stats.target, "ok").inc()
        try:
            # Decoding and comparing large outputs: off the event loop.
            rows, agreeing, difference = await asyncio.to_thread(compare, primary, answer)
        except (ValueError, KapiError) as exc:
            stats.last_error = f"answers not comparable: {exc}"
            return
        stats.compared_rows += rows
        stats.agreeing_rows += agreeing
        if np.isnan(difference) or np.isnan(stats.max_abs_difference):
            stats.max_abs_difference = float("nan")  # a NaN answer never reads as agreement
        else:
            stats.max_abs_difference = max(stats.max_abs_difference, difference)
        if stats.compared_rows:
            self.metrics.shadow_agreement.labels(model, stats.target).set(
                stats.agreeing_rows / stats.compared_rows
            )
        self.metrics.shadow_max_abs_diff.labels(model, stats.target).set(stats.max_abs_difference)

    def _backend(self, model: str, shadow: Shadow) -> Backend:
        if shadow.backend is not None:
            backend = self.router.pool.backends.get(shadow.backend)
            if backend is None:
                raise KapiError(f"the shadow backend {shadow.backend} is not known")
            return backend
        return self.router.choose(model, shadow.version, {})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def compare(primary: bytes, shadow: bytes) -> tuple[int, int, float]:
    """(rows compared for top-1, rows that agree, largest absolute difference elsewhere)."""
    first = pb.ModelInferResponse.FromString(primary)
    second = pb.ModelInferResponse.FromString(shadow)
    theirs = {
        output.name: (output, raw)
        for output, raw in zip(second.outputs, second.raw_output_contents, strict=False)
    }
    rows = agreeing = 0
    difference = 0.0
    for output, raw in zip(first.outputs, first.raw_output_contents, strict=False):
        if output.name not in theirs:
            raise ValueError(f"the shadow has no output '{output.name}'")
        other, other_raw = theirs[output.name]
        if other.datatype != output.datatype or list(other.shape) != list(output.shape):
            raise ValueError(
                f"output '{output.name}': {output.datatype}{list(output.shape)} against "
                f"{other.datatype}{list(other.shape)}"
            )
        if output.datatype == "BYTES":
            continue
        a = from_raw(output.name, output.datatype, tuple(output.shape), raw).data
        b = from_raw(other.name, other.datatype, tuple(other.shape), other_raw).data
        if output.datatype in _FLOATS and a.ndim >= 1 and a.shape[-1] > 1:
            top_a = np.argmax(a.reshape(-1, a.shape[-1]), axis=1)
            top_b = np.argmax(b.reshape(-1, b.shape[-1]), axis=1)
            rows += int(top_a.size)
            agreeing += int(np.count_nonzero(top_a == top_b))
        elif a.size:
            diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
            difference = diff if np.isnan(diff) else max(difference, diff)  # NaN is kept
            if np.isnan(difference):
                return rows, agreeing, difference
    return rows, agreeing, difference
