"""answer_stream: request order, a bounded window, and the drain, on a data plane whose
inference the test holds and releases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.inference import InferenceRequest, InferenceResponse, RequestLimits
from kapi.node.dataplane import DataPlane
from kapi.node.repository import ModelRepository
from kapi.node.stats import NodeMetrics
from kapi.node.streams import STREAM_WINDOW, answer_stream
from prometheus_client import CollectorRegistry

WAIT_S = 10.0


class HeldDataPlane(DataPlane):
    """Answers each request once the test releases it; counts how many run at once."""

    def __init__(self, tmp_path: Path) -> None:
        metrics = NodeMetrics(CollectorRegistry())
        super().__init__(ModelRepository(tmp_path, metrics, 4, 1.0), False)
        self.serving = True
        self.gates: dict[str, asyncio.Event] = {}
        self.running = 0
        self.most_at_once = 0

    def request_limits(self, name: str, version: str) -> RequestLimits:
        return RequestLimits(inputs=1, outputs=1)

    async def infer(self, request: InferenceRequest, admitted: bool = False) -> InferenceResponse:
        assert admitted, "a stream counts its requests in as it reads them"
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.gates.setdefault(request.id, asyncio.Event()).wait()
        finally:
            self.running -= 1
        return InferenceResponse(request.model_name, "1", request.id, [])

    def release_all(self) -> None:
        for event in self.gates.values():
            event.set()
        self.gates.setdefault("0", asyncio.Event()).set()


class Context:
    def __init__(self) -> None:
        self.aborted: tuple[Any, str] | None = None

    async def abort(self, code: Any, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


async def requests(count: int, pulled: list[int]) -> AsyncIterator[pb.ModelInferRequest]:
    for index in range(count):
        pulled.append(index)
        yield pb.ModelInferRequest(model_name="m", id=str(index))


async def until(condition: Any) -> None:
    """Let the stream's tasks run until `condition()` holds (or fail after WAIT_S)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


async def test_responses_go_out_in_request_order_whatever_order_they_finish(
    tmp_path: Path,
) -> None:
    dataplane = HeldDataPlane(tmp_path)
    pulled: list[int] = []
    answers = answer_stream(dataplane, requests(5, pulled), Context())
    first = asyncio.ensure_future(anext(answers))
    await until(lambda: dataplane.running == 5)
    for index in (4, 2, 3, 1):  # every later request finishes first
        dataplane.gates[str(index)].set()
    await asyncio.sleep(0.01)
    assert not first.done()
    dataplane.gates["0"].set()
    ids = [(await first).infer_response.id]
    ids += [message.infer_response.id async for message in answers]
    assert ids == ["0", "1", "2", "3", "4"]


async def test_a_stream_reads_no_further_than_its_window(tmp_path: Path) -> None:
    dataplane = HeldDataPlane(tmp_path)
    pulled: list[int] = []
    answers = answer_stream(dataplane, requests(3 * STREAM_WINDOW, pulled), Context())
    first = asyncio.ensure_future(anext(answers))
    await until(lambda: dataplane.running == STREAM_WINDOW)
    await asyncio.sleep(0.05)
    assert dataplane.running == STREAM_WINDOW
    assert len(pulled) <= STREAM_WINDOW + 1  # the one that waits for room
    for index in range(3 * STREAM_WINDOW):
        dataplane.gates.setdefault(str(index), asyncio.Event()).set()
    ids = [(await first).infer_response.id]
    ids += [message.infer_response.id async for message in answers]
    assert ids == [str(index) for index in range(3 * STREAM_WINDOW)]
    assert dataplane.most_at_once == STREAM_WINDOW


async def test_a_drain_answers_what_was_read_then_ends_the_stream_unavailable(
    tmp_path: Path,
) -> None:
    dataplane = HeldDataPlane(tmp_path)
    pulled: list[int] = []
    context = Context()

    async def forever() -> AsyncIterator[pb.ModelInferRequest]:
        async for request in requests(2, pulled):
            yield request
        await asyncio.Event().wait()  # the client keeps the stream open

    answers = answer_stream(dataplane, forever(), context)
    first = asyncio.ensure_future(anext(answers))
    await until(lambda: dataplane.running == 2)
    dataplane.draining.set()
    for index in ("0", "1"):
        dataplane.gates[index].set()
    ids = [(await first).infer_response.id, (await anext(answers)).infer_response.id]
    with pytest.raises(RuntimeError, match="aborted"):
        await anext(answers)
    assert ids == ["0", "1"]
    assert context.aborted is not None
    assert "draining" in context.aborted[1]


async def test_a_request_read_just_before_the_drain_is_answered_not_refused(
    tmp_path: Path,
) -> None:
    """The drain begins after the request is read but before its task first runs: it was
    counted in as it was read, so it runs, and the drain waits for it."""
    dataplane = HeldDataPlane(tmp_path)
    context = Context()
    read = asyncio.Event()

    async def one_then_drain() -> AsyncIterator[pb.ModelInferRequest]:
        yield pb.ModelInferRequest(model_name="m", id="0")
        dataplane.draining.set()  # the reader has the request; its task has not run yet
        read.set()
        await asyncio.Event().wait()

    answers = answer_stream(dataplane, one_then_drain(), context)
    first = asyncio.ensure_future(anext(answers))
    await read.wait()
    assert not await dataplane.wait_quiet(0.0, 0.05)  # it is in flight: the drain waits
    dataplane.release_all()
    assert (await first).infer_response.id == "0"
    with pytest.raises(RuntimeError, match="aborted"):
        await anext(answers)
    assert context.aborted is not None
    assert "draining" in context.aborted[1]
