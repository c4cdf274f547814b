"""The data plane's answers as OIP protobuf messages, shared by both transports: gRPC sends
them as they are, and REST as JSON (kapi.core.rest.message_to_json), as Triton does."""

from __future__ import annotations

from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.node.dataplane import DataPlane
from kapi.node.runtimes import TensorSpec
from kapi.node.stats import Duration, ModelStats


def model_metadata(dataplane: DataPlane, name: str, version: str) -> pb.ModelMetadataResponse:
    versions, platform, inputs, outputs = dataplane.model_metadata(name, version)
    return pb.ModelMetadataResponse(
        name=name,
        versions=versions,
        platform=platform,
        inputs=[_tensor_metadata(spec) for spec in inputs],
        outputs=[_tensor_metadata(spec) for spec in outputs],
    )


def model_config(dataplane: DataPlane, name: str, version: str) -> pb.ModelConfigResponse:
    response = pb.ModelConfigResponse()
    response.config.CopyFrom(dataplane.model_config(name, version))
    return response


def statistics(dataplane: DataPlane, name: str, version: str) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    for model, model_version, stats in dataplane.statistics(name, version):
        _fill_statistics(response.model_stats.add(name=model, version=model_version), stats)
    return response


def repository_index(dataplane: DataPlane, ready_only: bool) -> pb.RepositoryIndexResponse:
    response = pb.RepositoryIndexResponse()
    for row in dataplane.index(ready_only):
        response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
    return response


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=spec.shape
    )


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count, target.ns = source.count, source.ns


def _fill_statistics(target: pb.ModelStatistics, stats: ModelStats) -> None:
    target.last_inference = stats.last_inference_ms
    target.inference_count = stats.inference_count
    target.execution_count = stats.execution_count
    infer = target.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _duration(getattr(infer, field), getattr(stats, field))
    for size in sorted(stats.batches):
        durations = stats.batches[size]
        batch = target.batch_stats.add(batch_size=size)
        _duration(batch.compute_input, durations.compute_input)
        _duration(batch.compute_infer, durations.compute_infer)
        _duration(batch.compute_output, durations.compute_output)
