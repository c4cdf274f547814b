"""complete_config fills what a config leaves out from the model, as Triton's auto-complete does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, KapiError
from kapi.node.config import (
    check_tensor_types,
    complete_config,
    complete_instance_groups,
    instance_count,
    model_shapes,
    read_config,
)
from kapi.node.runtimes import TensorSpec

BATCHED_IN = [TensorSpec("image", "FP32", (-1, 3, 8, 8)), TensorSpec("text", "BYTES", (-1,))]
BATCHED_OUT = [TensorSpec("probs", "FP16", (-1, 10))]
FIXED_IN = [TensorSpec("image", "FP32", (1, 3, 8, 8))]


def _config(text: str = "") -> mc.ModelConfig:
    return text_format.Parse(f'name: "m" {text}', mc.ModelConfig())


def _tensors(declared: Any) -> list[tuple[str, int, list[int]]]:
    return [(tensor.name, tensor.data_type, list(tensor.dims)) for tensor in declared]


def test_a_batchable_model_gets_batching() -> None:
    config = _config()
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    # Triton's normalization: a dynamic batcher without preferred sizes prefers full batches.
    assert config.dynamic_batching == mc.ModelDynamicBatching(preferred_batch_size=[4])
    # A scalar row is [1] reshaped to [], as Triton's ONNX Runtime backend completes it.
    assert _tensors(config.input) == [
        ("image", mc.TYPE_FP32, [3, 8, 8]),
        ("text", mc.TYPE_STRING, [1]),
    ]
    assert config.input[1].reshape == mc.ModelTensorReshape(shape=[])
    assert not config.input[0].HasField("reshape")
    assert _tensors(config.output) == [("probs", mc.TYPE_FP16, [10])]


def test_the_latest_version_is_the_default_policy() -> None:
    config = _config()
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)
    assert config.version_policy == mc.ModelVersionPolicy(
        latest=mc.ModelVersionPolicy.Latest(num_versions=1)
    )


def test_a_declared_version_policy_is_kept() -> None:
    config = _config("version_policy { all { } }")
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)
    assert config.version_policy.WhichOneof("policy_choice") == "all"


def test_a_max_batch_size_of_one_gets_no_dynamic_batcher() -> None:
    config = _config()
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=1)
    assert config.max_batch_size == 1
    assert not config.HasField("dynamic_batching")


def test_outputs_that_lose_the_batch_dimension_keep_the_model_unbatched() -> None:
    """The load-time probe (merges=False) saw outputs whose first dimension is not the
    batch: completion must not make such a model batch, whatever its shapes look like."""
    config = _config()
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4, merges=False)
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")


@pytest.mark.parametrize("datatype", ["seq(map(int64,tensor(float)))", "tensor(float8e4m3fn)"])
def test_a_tensor_of_a_type_kapi_cannot_serve_is_a_clear_error(datatype: str) -> None:
    outputs = [*BATCHED_OUT, TensorSpec("probabilities", datatype, ())]
    with pytest.raises(InvalidArgument) as raised:
        check_tensor_types("m", BATCHED_IN, outputs)
    assert raised.value.message.startswith(
        f"model 'm': output 'probabilities' is of type {datatype}, which kapi cannot serve"
    )


def test_batching_is_off_when_the_default_is_zero() -> None:
    config = _config()
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=0)
    assert config.max_batch_size == 0
    assert config.WhichOneof("scheduling_choice") is None
    assert _tensors(config.input)[0] == ("image", mc.TYPE_FP32, [-1, 3, 8, 8])


def test_a_model_with_a_fixed_first_dimension_is_not_batched() -> None:
    config = _config()
    complete_config(config, FIXED_IN, BATCHED_OUT, default_max_batch_size=4)
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert _tensors(config.input) == [("image", mc.TYPE_FP32, [1, 3, 8, 8])]
    assert _tensors(config.output) == [("probs", mc.TYPE_FP16, [-1, 10])]


def test_declared_tensors_are_kept_and_the_rest_added() -> None:
    """As Triton's ONNX Runtime backend: a config that declares only some tensors is still
    auto-completed, batching included."""
    config = _config('input [ { name: "image" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] } ]')
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)
    assert config.max_batch_size == 4
    # A scalar row is [1] reshaped to [], as Triton's ONNX Runtime backend completes it.
    assert _tensors(config.input) == [
        ("image", mc.TYPE_FP32, [3, 8, 8]),
        ("text", mc.TYPE_STRING, [1]),
    ]
    assert config.input[1].reshape == mc.ModelTensorReshape(shape=[])
    assert not config.input[0].HasField("reshape")
    assert _tensors(config.output) == [("probs", mc.TYPE_FP16, [10])]


def test_a_config_that_declares_inputs_and_outputs_is_not_auto_batched() -> None:
    config = _config(
        'input [ { name: "image" data_type: TYPE_FP32 dims: [ -1, 3, 8, 8 ] } ] '
        'output [ { name: "probs" data_type: TYPE_FP16 dims: [ -1, 10 ] } ]'
    )
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)
    assert config.max_batch_size == 0
    assert [tensor.name for tensor in config.input] == ["image", "text"]


def test_a_declared_max_batch_size_strips_the_batch_dimension() -> None:
    config = _config("max_batch_size: 16")
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)
    assert config.max_batch_size == 16
    assert _tensors(config.output) == [("probs", mc.TYPE_FP16, [10])]
    assert not config.HasField("dynamic_batching")


def test_declared_batching_and_instances_are_kept() -> None:
    config = _config(
        "dynamic_batching { preferred_batch_size: [ 2 ] } "
        "instance_group [ { count: 3 kind: KIND_GPU } ]"
    )
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=8)
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [2]
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (3, mc.ModelInstanceGroup.KIND_GPU)
    ]


def test_max_batch_size_with_a_fixed_first_dimension_is_rejected() -> None:
    config = _config("max_batch_size: 4")
    with pytest.raises(
        InvalidArgument,
        match="model 'm': max_batch_size > 0 but input 'image' has a fixed first dimension 1",
    ):
        complete_config(config, FIXED_IN, BATCHED_OUT, default_max_batch_size=4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 3 ] } ]',
            r"config inputs \['pixels'\] are not in the model, which has \['image', 'text'\]",
        ),
        (
            'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]',
            r"config outputs \['logits'\] are not in the model, which has \['probs'\]",
        ),
    ],
)
def test_tensors_the_model_lacks_are_rejected(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"model 'm': {message}"):
        complete_config(_config(text), BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)


def test_a_sequence_model_does_not_get_dynamic_batching(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nsequence_batching { max_sequence_idle_microseconds: 5000 }\n'
    )
    try:
        config = read_config(model_dir)
        complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)
    except KapiError:
        return  # refusing a sequence model is an acceptable fix
    assert not config.HasField("dynamic_batching")


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (
            "dims: [3, -1, -1] data_type: TYPE_FP32",
            r"has dims \[3, -1, -1\], but the model takes \[3, 8, 8\]",
        ),
        (
            "dims: [3, 8] data_type: TYPE_FP32",
            r"has dims \[3, 8\], but the model takes \[3, 8, 8\]",
        ),
        ("dims: [3, 8, 8] data_type: TYPE_INT8", r"is INT8, but the model's is FP32"),
    ],
)
def test_declared_inputs_that_disagree_with_the_model_are_refused(
    declared: str, message: str
) -> None:
    config = text_format.Parse(
        f'name: "m" max_batch_size: 4 input [{{ name: "image" {declared} }}]', mc.ModelConfig()
    )
    with pytest.raises(InvalidArgument, match=message):
        complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)


def test_declared_inputs_that_agree_with_the_model_are_kept() -> None:
    config = _config(
        'max_batch_size: 4 input [{ name: "image" data_type: TYPE_FP32 dims: [3, 8, 8] }]'
    )
    complete_config(config, BATCHED_IN, BATCHED_OUT, default_max_batch_size=4)
    assert [tensor.name for tensor in config.input] == ["image", "text"]


# --- instance groups, as Triton's NormalizeInstanceGroup ------------------------------------

Group = mc.ModelInstanceGroup


def test_no_instance_group_is_one_named_after_the_model() -> None:
    config = _config()
    complete_instance_groups(config, Group.KIND_CPU, cpu_count=2)
    assert [(g.name, g.kind, g.count) for g in config.instance_group] == [("m", Group.KIND_CPU, 2)]


def test_unnamed_groups_are_numbered_and_counts_defaulted() -> None:
    config = _config(
        'instance_group [ { kind: KIND_CPU }, { name: "fast" count: 3 kind: KIND_GPU }, '
        "{ kind: KIND_AUTO }, { kind: KIND_GPU } ]"
    )
    complete_instance_groups(config, Group.KIND_CPU, cpu_count=2, gpu_ids=[0, 1])
    assert [(g.name, g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [
        ("m_0", Group.KIND_CPU, 2, []),
        ("fast", Group.KIND_GPU, 3, [0, 1]),
        ("m_2", Group.KIND_CPU, 2, []),
        ("m_3", Group.KIND_GPU, 1, [0, 1]),
    ]
    assert instance_count(config) == 2 + 3 * 2 + 2 + 1 * 2  # a GPU group's count is per GPU


def test_a_gpu_runtime_gets_a_gpu_group() -> None:
    config = _config()
    complete_instance_groups(config, Group.KIND_GPU, cpu_count=1, gpu_ids=[0])
    assert [(g.name, g.kind, g.count) for g in config.instance_group] == [("m", Group.KIND_GPU, 1)]


@pytest.mark.parametrize(
    ("groups", "gpu_ids", "words"),
    [
        ("{ kind: KIND_GPU }", [], "instance group m_0 of model m has kind KIND_GPU but no GPUs "
         "are available"),
        ("{ kind: KIND_GPU gpus: [ 3 ] }", [0, 1], "instance group m_0 of model m specifies "
         "invalid or unsupported gpu id 3"),
        ("{ kind: KIND_CPU gpus: [ 0 ] }", [0], "instance group m_0 of model m has kind KIND_CPU "
         "but specifies one or more GPUs"),
    ],
)  # fmt: skip
def test_gpu_groups_the_machine_cannot_run_fail_in_tritons_words(
    groups: str, gpu_ids: list[int], words: str
) -> None:
    config = _config(f"instance_group [ {groups} ]")
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        complete_instance_groups(config, Group.KIND_CPU, cpu_count=2, gpu_ids=gpu_ids)


def test_kind_auto_runs_on_the_cpu_without_a_gpu() -> None:
    config = _config("instance_group [ { kind: KIND_AUTO } ]")
    complete_instance_groups(config, Group.KIND_CPU, cpu_count=2, gpu_ids=[])
    assert config.instance_group[0].kind == Group.KIND_CPU


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ("dims: [ 4 ] reshape { shape: [ 3, 3 ] }", "dims [4] (4 elements) but reshape [3, 3]"),
        ("dims: [ -1 ] reshape { shape: [ -1, -1 ] }", "more than one variable dimension"),
        ("dims: [ 6 ] reshape { shape: [ 2, 3 ] }", "has reshape [2, 3], but the model takes"),
    ],
)
def test_a_reshape_that_cannot_hold_is_refused(tensor: str, words: str) -> None:
    config = _config(f'max_batch_size: 2 input [ {{ name: "x" data_type: TYPE_FP32 {tensor} }} ]')
    model_in = [TensorSpec("x", "FP32", (-1, 2, 2))]
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        complete_config(config, model_in, [TensorSpec("y", "FP32", (-1, 4))], 4)


def test_model_shapes_name_what_a_reshape_changes() -> None:
    config = _config(
        'max_batch_size: 2 input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] '
        "reshape { shape: [ 2, 2 ] } } ]"
    )
    model_in = [TensorSpec("x", "FP32", (-1, 2, 2))]
    model_out = [TensorSpec("y", "FP32", (-1,))]
    complete_config(config, model_in, model_out, 4)
    assert model_shapes(config, model_in, model_out) == ({"x": (2, 2)}, {"y": (1,)})


def test_sequence_controls_and_state_must_be_the_models() -> None:
    """As Triton's ONNX Runtime backend checks at load: a control the model does not take
    fails the load, not every request."""
    config = _config(
        'max_batch_size: 4 sequence_batching { control_input [ { name: "CORRID" control [ '
        "{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] } ] }"
    )
    with pytest.raises(InvalidArgument, match=r"sequence_batching names inputs \['CORRID'\]"):
        complete_config(config, BATCHED_IN, BATCHED_OUT, 4)
