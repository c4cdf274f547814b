"""Triton's ensembles (`platform: "ensemble"`, `ensemble_scheduling`): a DAG of the node's
models run as one model. Each step maps ensemble tensors to a composing model's inputs
(`input_map`: model input -> ensemble tensor) and its outputs back to ensemble tensors
(`output_map`: model output -> ensemble tensor); a step runs once every tensor it needs is
there, steps that are ready together run at once, and each composing model schedules (and
batches) its part as it would any request.

The config is checked when the ensemble loads, as Triton's ValidateEnsembleConfig does:
every tensor a step takes is an ensemble input or some step's output, each is produced once,
every ensemble input is used and every output produced, and the composing models and their
tensors exist. Errors of a composing model reach the client with its status, prefixed
"in ensemble '<name>', " as in Triton.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, KapiError, as_kapi_error
from kapi.core.inference import EncodedTensor, InferenceRequest, RequestedOutput
from kapi.core.tensors import Tensor, datatype_of, to_raw
from kapi.node.config import oip_datatype
from kapi.node.runtimes import Arrays

ENSEMBLE = "ensemble"


@dataclass(frozen=True, slots=True)
class Step:
    model: str
    version: str  # "" for the latest
    inputs: dict[str, str]  # model input -> ensemble tensor
    outputs: dict[str, str]  # model output -> ensemble tensor


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == ENSEMBLE


def composing_models(config: mc.ModelConfig) -> list[str]:
    return list(dict.fromkeys(step.model_name for step in config.ensemble_scheduling.step))


def steps_of(config: mc.ModelConfig) -> list[Step]:
    """The ensemble's steps, its tensor graph checked."""
    name = config.name
    if config.WhichOneof("scheduling_choice") != "ensemble_scheduling" or not (
        config.ensemble_scheduling.step
    ):
        raise InvalidArgument(f"ensemble {name} must specify ensemble_scheduling with steps")
    steps = [
        Step(
            step.model_name,
            str(step.model_version) if step.model_version > 0 else "",
            dict(step.input_map),
            dict(step.output_map),
        )
        for step in config.ensemble_scheduling.step
    ]
    inputs = {tensor.name for tensor in config.input}
    for declared in config.input:
        if declared.optional:
            raise InvalidArgument(
                f"ensemble {name}: input '{declared.name}' is optional, which kapi's ensembles "
                "do not support: every step runs on every request"
            )
    produced: dict[str, str] = {}
    for step in steps:
        if not step.model:
            raise InvalidArgument(f"ensemble {name}: a step must name its model")
        if step.model == name:
            raise InvalidArgument(f"ensemble {name} cannot contain itself as a step")
        for tensor in step.outputs.values():
            if tensor in produced or tensor in inputs:  # Triton's words
                raise InvalidArgument(
                    f"ensemble tensor '{tensor}' can appear in an output map only once for "
                    f"ensemble {name}"
                )
            produced[tensor] = step.model
    used = {tensor for step in steps for tensor in step.inputs.values()}
    for tensor in sorted(used - inputs - produced.keys()):
        raise InvalidArgument(
            f"ensemble {name}: tensor '{tensor}' is taken by a step, but it is neither an "
            "ensemble input nor any step's output"
        )
    for tensor in sorted(inputs - used):
        raise InvalidArgument(f"ensemble input '{tensor}' for ensemble {name} is not used")
    for output in config.output:
        if output.name not in produced:
            raise InvalidArgument(
                f"ensemble output '{output.name}' for ensemble {name} is not produced by any step"
            )
    _check_acyclic(name, steps, inputs)
    return steps


def _check_acyclic(name: str, steps: list[Step], inputs: set[str]) -> None:
    available, remaining = set(inputs), list(steps)
    while remaining:
        ready = [s for s in remaining if set(s.inputs.values()) <= available]
        if not ready:
            raise InvalidArgument(
                f"ensemble {name}: steps {sorted({s.model for s in remaining})} wait on each "
                "other's outputs (a cycle)"
            )
        for step in ready:
            available |= set(step.outputs.values())
        remaining = [s for s in remaining if s not in ready]


def check_composing(config: mc.ModelConfig, steps: list[Step], lookup: ModelLookup) -> None:
    """The composing models are loaded, with the tensors and datatypes the steps use."""
    declared = {t.name: oip_datatype(t.data_type) for t in config.input}
    declared.update({t.name: oip_datatype(t.data_type) for t in config.output})
    for step in steps:
        model_config = lookup(step.model, step.version).config
        model_inputs = {t.name: oip_datatype(t.data_type) for t in model_config.input}
        model_outputs = {t.name: oip_datatype(t.data_type) for t in model_config.output}
        for kind, mapping, tensors in (
            ("input", step.inputs, model_inputs),
            ("output", step.outputs, model_outputs),
        ):
            for model_tensor, ensemble_tensor in sorted(mapping.items()):
                if model_tensor not in tensors:
                    raise InvalidArgument(
                        f"in ensemble {config.name}, step of model '{step.model}': the model "
                        f"has no {kind} '{model_tensor}', it has {sorted(tensors)}"
                    )
                expected = declared.get(ensemble_tensor)
                if expected is not None and expected != tensors[model_tensor]:
                    raise InvalidArgument(
                        f"in ensemble {config.name}, {kind} '{model_tensor}' of model "
                        f"'{step.model}' is {tensors[model_tensor]}, but ensemble tensor "
                        f"'{ensemble_tensor}' is {expected}"
                    )


ModelLookup = Callable[[str, str], Any]


class EnsembleScheduler:
    """Runs a request of the ensemble through its steps; `lookup` finds the composing
    model version serving now, so a reloaded model serves the ensemble at once."""

    def __init__(self, name: str, steps: list[Step], lookup: ModelLookup) -> None:
        self.model = name
        self.steps = steps
        self._lookup = lookup
        self.merges = False

    async def submit(self, job: Any) -> Arrays:
        tensors: Arrays = dict(job.inputs)
        remaining = list(self.steps)
        while remaining:
            ready = [s for s in remaining if set(s.inputs.values()) <= tensors.keys()]
            if not ready:  # a tensor no request gave and no step makes
                missing = sorted({t for s in remaining for t in s.inputs.values()} - tensors.keys())
                raise InvalidArgument(
                    f"in ensemble '{self.model}', steps of {sorted({s.model for s in remaining})} "
                    f"cannot run: no tensor {missing} was given or made"
                )
            results = await asyncio.gather(*(self._run(step, tensors) for step in ready))
            for outputs in results:
                tensors.update(outputs)
            remaining = [s for s in remaining if s not in ready]
        return {name: tensors[name] for name in job.outputs}

    async def close(self) -> None:
        """Nothing runs here: each composing model drains its own requests."""

    async def _run(self, step: Step, tensors: Arrays) -> Arrays:
        request = InferenceRequest(
            model_name=step.model,
            model_version=step.version,
            inputs=[
                _encoded(model_input, tensors[ensemble_tensor])
                for model_input, ensemble_tensor in step.inputs.items()
            ],
            outputs=[RequestedOutput(output) for output in step.outputs],
        )
        try:
            response = await self._lookup(step.model, step.version).infer(request)
        except Exception as exc:
            raise _in_ensemble(self.model, as_kapi_error(exc)) from exc
        return {step.outputs[tensor.name]: tensor.data for tensor in response.outputs}


def _encoded(name: str, array: Any) -> EncodedTensor:
    """A tensor as a composing model takes it: raw, viewed without copying where it can."""
    datatype = datatype_of(array)
    tensor = Tensor(name, datatype, tuple(array.shape), array)
    if datatype == "BYTES":
        raw: bytes | memoryview = to_raw(tensor)
    else:
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
    return EncodedTensor(name, datatype, tuple(array.shape), raw)


def _in_ensemble(name: str, error: KapiError) -> KapiError:
    wrapped = type(error).__new__(type(error))
    KapiError.__init__(wrapped, f"in ensemble '{name}', {error.message}")
    return wrapped
