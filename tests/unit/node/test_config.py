"""config.pbtxt as a Triton user writes it: parsing, version policy and runtime choice."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import tritonclient.grpc.model_config_pb2 as triton_mc
from google.protobuf import text_format
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, NotFound
from kapi.core.tensors import DATATYPES
from kapi.node.config import (
    available_versions,
    check_config,
    choose_runtime,
    config_datatype,
    oip_datatype,
    parse_version,
    read_config,
    select_versions,
)
from kapi.node.runtimes import FILES, PLATFORMS, RUNTIMES

TRITON_CONFIG = """
# written for Triton, with the usual mix of list and block syntax
name: "resnet"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "image"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
    is_non_linear_format_io: false
  }
]
output [
  {
    name: "probs"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  },
  { name: "names", data_type: TYPE_STRING, dims: [ -1 ] }
]
version_policy: { latest: { num_versions: 2 } }
instance_group [ { count: 2, kind: KIND_GPU, gpus: [ 0, 1 ] }, { kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  priority_queue_policy { key: 1 value: { max_queue_size: 5 } }
  default_queue_policy { timeout_action: DELAY, default_timeout_microseconds: 1000 }
}
optimization {
  execution_accelerators {
    gpu_execution_accelerator : [ {
      name : "tensorrt"
      parameters { key: "precision_mode" value: "FP16" }
    } ]
  }
  cuda { graphs: true }
  input_pinned_memory { enable: false }
}
model_warmup: [ { name: "zeros", batch_size: 1 } ]
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters: { key: "enable_mem_arena" value: { string_value: "1" } }
response_cache { enable: true }
model_transaction_policy { decoupled: false }
cc_model_filenames { key: "7.5" value: "model_t4.onnx" }
metric_tags { key: "team" value: "vision" }
default_model_filename: "resnet.onnx"
"""


def _model_dir(tmp_path: Path, text: str | None = None, name: str = "resnet") -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    if text is not None:
        (model_dir / "config.pbtxt").write_text(text)
    return model_dir


def test_reads_what_kapi_models_and_skips_the_rest(tmp_path: Path) -> None:
    config = read_config(_model_dir(tmp_path, TRITON_CONFIG))
    assert (config.name, config.platform, config.max_batch_size) == (
        "resnet",
        "onnxruntime_onnx",
        8,
    )
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("image", mc.TYPE_FP32, [3, 224, 224])
    assert image.format == mc.ModelInput.FORMAT_NCHW
    assert list(image.reshape.shape) == [1, 3, 224, 224]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("probs", mc.TYPE_FP32, [1000]),
        ("names", mc.TYPE_STRING, [-1]),
    ]
    assert config.output[0].label_filename == "labels.txt"
    assert config.version_policy.latest.num_versions == 2
    assert [(g.count, g.kind, list(g.gpus)) for g in config.instance_group] == [
        (2, mc.ModelInstanceGroup.KIND_GPU, [0, 1]),
        (0, mc.ModelInstanceGroup.KIND_CPU, []),
    ]
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.max_queue_delay_microseconds == 100
    assert batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.DELAY
    assert {key: value.string_value for key, value in config.parameters.items()} == {
        "intra_op_thread_count": "2",
        "enable_mem_arena": "1",
    }
    assert dict(config.metric_tags) == {"team": "vision"}
    assert config.default_model_filename == "resnet.onnx"


@pytest.mark.parametrize(
    "section",
    [
        pytest.param('model_warmup { name: "z" batch_size: 1 }', id="warmup-block"),
        pytest.param("response_cache { enable: true }", id="response-cache"),
        # Triton's documented list form, `name [ {...} ]` without a colon, which protobuf's
        # unknown-field skipper cannot skip: kapi declares the whole ModelConfig for this.
        pytest.param(
            'model_warmup [ { name: "z" batch_size: 1 inputs { key: "x" '
            "value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } } } ]",
            id="warmup-list",
        ),
        pytest.param(
            'instance_group [ { count: 1 kind: KIND_GPU rate_limiter { resources [ { name: "R1" '
            "count: 4 } ] priority: 2 } } ]",
            id="rate-limiter",
        ),
        pytest.param(
            'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_FP32 '
            'source_input: "x" } ]',
            id="batch-input",
        ),
    ],
)
def test_sections_kapi_does_not_act_on_are_kept(tmp_path: Path, section: str) -> None:
    text = f'name: "resnet"\nmax_batch_size: 4\n{section}\n'
    triton = text_format.Parse(text, triton_mc.ModelConfig())  # what Triton itself accepts
    config = read_config(_model_dir(tmp_path, text))
    assert (config.name, config.max_batch_size) == ("resnet", 4)
    assert config.SerializeToString(deterministic=True) == triton.SerializeToString(
        deterministic=True
    )


@pytest.mark.parametrize(
    "section",
    [
        pytest.param("sequence_batching { iterative_sequence: true }", id="iterative-sequence"),
        pytest.param("model_transaction_policy { decoupled: true }", id="decoupled"),
    ],
)
def test_models_kapi_cannot_serve_are_refused(tmp_path: Path, section: str) -> None:
    text = f'name: "resnet"\nmax_batch_size: 4\n{section}\n'
    text_format.Parse(text, triton_mc.ModelConfig())  # a valid Triton config all the same
    with pytest.raises(InvalidArgument, match=r"model 'resnet': .*not supported by kapi"):
        check_config(read_config(_model_dir(tmp_path, text)))


@pytest.mark.parametrize(
    "section",
    ['ensemble_scheduling { step: [ { model_name: "a" } ] }', 'platform: "ensemble"'],
)
def test_ensemble_scheduling_and_the_ensemble_platform_come_together(
    tmp_path: Path, section: str
) -> None:
    text = f'name: "resnet"\n{section}\n'
    with pytest.raises(InvalidArgument, match="ensemble_scheduling is for platform"):
        check_config(read_config(_model_dir(tmp_path, text)))


def test_a_negative_instance_count_is_refused(tmp_path: Path) -> None:
    text = 'name: "resnet"\ninstance_group [ { count: -1 kind: KIND_CPU } ]\n'
    with pytest.raises(InvalidArgument, match=r"instance_group count is -1; it must be 1 or more"):
        check_config(read_config(_model_dir(tmp_path, text)))


def test_triton_config_parses_in_triton_too() -> None:
    """The sample above is a valid Triton config, so skipping its extra sections is required."""
    config = text_format.Parse(TRITON_CONFIG, triton_mc.ModelConfig())
    assert config.optimization.cuda.graphs


def test_skipped_sections_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kapi.node.config")
    check_config(read_config(_model_dir(tmp_path, "response_cache { enable: true }\n")))
    assert "response_cache" in caplog.text


def test_no_config_file_is_an_empty_config_named_after_the_directory(tmp_path: Path) -> None:
    config = read_config(_model_dir(tmp_path, None, name="digits"))
    assert config == mc.ModelConfig(name="digits")


def test_a_config_without_a_name_takes_the_directory_name(tmp_path: Path) -> None:
    assert read_config(_model_dir(tmp_path, "max_batch_size: 2")).name == "resnet"


def test_a_name_that_differs_from_the_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="name 'other' does not match its directory 'resnet'"):
        read_config(_model_dir(tmp_path, 'name: "other"'))


@pytest.mark.parametrize(
    "text",
    [
        "max_batch_size: eight",
        'input [ { name: "x" data_type: TYPE_FP128 } ]',
        "dynamic_batching {",
        'name: "resnet" name: "resnet"',
    ],
)
def test_invalid_text_is_rejected_with_its_path(tmp_path: Path, text: str) -> None:
    model_dir = _model_dir(tmp_path, text)
    with pytest.raises(InvalidArgument) as raised:
        read_config(model_dir)
    assert raised.value.message.startswith(f"{model_dir / 'config.pbtxt'}: not a valid model")
    assert isinstance(raised.value.__cause__, text_format.ParseError)


# --- versions ------------------------------------------------------------------------------


def _versions(tmp_path: Path, *names: str) -> Path:
    model_dir = _model_dir(tmp_path)
    for name in names:
        (model_dir / name).mkdir()
    (model_dir / "3.txt").write_text("a file, not a version")
    return model_dir


def _policy(text: str) -> mc.ModelConfig:
    return text_format.Parse(f'name: "resnet" {text}', mc.ModelConfig())


def test_available_versions_are_numeric_directories_in_numeric_order(tmp_path: Path) -> None:
    assert available_versions(_versions(tmp_path, "10", "2", "1", "latest", ".cache")) == [1, 2, 10]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", [10]),
        ("version_policy { latest { } }", [10]),
        ("version_policy { latest { num_versions: 2 } }", [2, 10]),
        ("version_policy { latest { num_versions: 9 } }", [1, 2, 10]),
        ("version_policy { all { } }", [1, 2, 10]),
        ("version_policy { specific { versions: [ 10, 1 ] } }", [1, 10]),
    ],
)
def test_select_versions(tmp_path: Path, policy: str, expected: list[int]) -> None:
    model_dir = _versions(tmp_path, "1", "2", "10", "draft")
    assert select_versions(model_dir, _policy(policy)) == expected


def test_specific_versions_missing_on_disk_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As Triton: the versions there load; the others are warned about."""
    model_dir = _versions(tmp_path, "1", "2")
    policy = _policy("version_policy { specific { versions: [1, 4, 3] } }")
    caplog.set_level(logging.WARNING, logger="kapi.node.config")
    assert select_versions(model_dir, policy) == [1]
    assert "versions [3, 4] of its specific version policy are not in" in caplog.text


def test_no_specific_version_on_disk(tmp_path: Path) -> None:
    model_dir = _versions(tmp_path, "1", "2")
    policy = _policy("version_policy { specific { versions: [3] } }")
    with pytest.raises(NotFound, match="at least one version must be available under the"):
        select_versions(model_dir, policy)


@pytest.mark.parametrize("policy", ["", "version_policy { all { } }"])
def test_no_version_directory(tmp_path: Path, policy: str) -> None:
    model_dir = _versions(tmp_path, "draft")
    with pytest.raises(NotFound, match="model 'resnet': no numeric version directory"):
        select_versions(model_dir, _policy(policy))


def test_version_directories_starting_with_zero_are_ignored(tmp_path: Path) -> None:
    model_dir = _versions(tmp_path, "0", "01", "1", "2")
    assert select_versions(model_dir, _policy("version_policy { all { } }")) == [1, 2]


# --- runtime -------------------------------------------------------------------------------


def _version_dir(tmp_path: Path, *files: str) -> Path:
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    for name in files:
        (version_dir / name).write_bytes(b"")
    return version_dir


@pytest.mark.parametrize("backend", sorted(RUNTIMES))
def test_backend_decides_first(tmp_path: Path, backend: str) -> None:
    config = mc.ModelConfig(name="m", backend=backend, platform="tensorrt_plan")
    assert choose_runtime(config, _version_dir(tmp_path, "model.onnx")) == backend


@pytest.mark.parametrize(("platform", "runtime"), sorted(PLATFORMS.items()))
def test_platform_decides_next(tmp_path: Path, platform: str, runtime: str) -> None:
    config = mc.ModelConfig(name="m", platform=platform)
    assert choose_runtime(config, _version_dir(tmp_path, "model.xml")) == runtime


@pytest.mark.parametrize(("filename", "runtime"), sorted(FILES.items()))
def test_model_file_decides_last(tmp_path: Path, filename: str, runtime: str) -> None:
    config = mc.ModelConfig(name="m")
    assert choose_runtime(config, _version_dir(tmp_path, "labels.txt", filename)) == runtime


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (mc.ModelConfig(name="m", backend="python"), "backend 'python' is not served by kapi"),
        (
            mc.ModelConfig(name="m", platform="tensorflow_savedmodel"),
            "platform 'tensorflow_savedmodel' is not served by kapi",
        ),
        (mc.ModelConfig(name="m"), "no backend or platform in config and no model file"),
    ],
)
def test_runtime_that_cannot_be_chosen(
    tmp_path: Path, config: mc.ModelConfig, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=f"model 'm': {message}"):
        choose_runtime(config, _version_dir(tmp_path, "model.pt"))


# --- datatypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_datatype_names_round_trip(datatype: str) -> None:
    assert oip_datatype(config_datatype(datatype)) == datatype


def test_string_is_bytes_and_invalid_stays_invalid() -> None:
    assert oip_datatype(mc.TYPE_STRING) == "BYTES"
    assert config_datatype("BYTES") == mc.TYPE_STRING
    assert oip_datatype(mc.TYPE_INVALID) == "INVALID"


# --- what kapi does with each field ---------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("input [ { name: 'x' dims: [ -1 ] allow_ragged_batch: true } ]", "input[x].allow_ragged"),
        ("input [ { name: 'x' dims: [ 2 ] is_shape_tensor: true } ]", "input[x].is_shape_tensor"),
        (
            'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_FP32 '
            'source_input: "x" } ]',
            "batch_input",
        ),
        ('cc_model_filenames { key: "7.5" value: "model_t4.plan" }', "cc_model_filenames"),
        ('model_repository_agents { agents [ { name: "checksum" } ] }', "model_repository"),
        ('model_operations { op_library_filename: [ "ops.so" ] }', "model_operations"),
    ],
)
def test_fields_that_change_the_answers_are_refused(
    tmp_path: Path, section: str, field: str
) -> None:
    """Serving without these would answer otherwise than Triton, so the model does not load."""
    typed = section.replace("dims:", "data_type: TYPE_FP32 dims:")
    config = read_config(_model_dir(tmp_path, f"max_batch_size: 4\n{typed}\n"))
    with pytest.raises(InvalidArgument, match="not supported by kapi yet") as raised:
        check_config(config)
    assert field in raised.value.message


def test_fields_kapi_ignores_are_warned_about_one_by_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = """
    max_batch_size: 4
    input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] format: FORMAT_NCHW } ]
    output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
    dynamic_batching {
      max_queue_delay_microseconds: 100
      preserve_ordering: true
      default_queue_policy { max_queue_size: 4 default_timeout_microseconds: 10 }
    }
    instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]
    optimization { cuda { graphs: true } }
    """
    caplog.set_level(logging.WARNING, logger="kapi.node.config")
    check_config(read_config(_model_dir(tmp_path, text)))
    (record,) = caplog.records
    ignored = record.getMessage().split("kapi ignores config fields ")[1].split(", ")
    assert sorted(ignored) == sorted(
        [
            "input[x].format",
            "dynamic_batching.preserve_ordering",
            "optimization",
        ]
    )


def test_a_config_kapi_acts_on_entirely_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = """
    name: "resnet" platform: "onnxruntime_onnx" max_batch_size: 8
    input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]
    output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
    dynamic_batching { preferred_batch_size: [ 4 ] default_queue_policy { max_queue_size: 8 } }
    instance_group [ { name: "cpu" count: 2 kind: KIND_CPU } ]
    version_policy { latest { num_versions: 2 } }
    parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
    """
    caplog.set_level(logging.WARNING, logger="kapi.node.config")
    check_config(read_config(_model_dir(tmp_path, text)))
    assert caplog.records == []


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    (model_dir / "config.pbtxt").write_bytes(b'name: "resnet"\n\xff\xfe max_batch_size: 2\n')
    with pytest.raises(InvalidArgument, match=r"config.pbtxt: cannot be read as a text config"):
        read_config(model_dir)


def test_a_config_that_is_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    (model_dir / "config.pbtxt").mkdir()
    with pytest.raises(InvalidArgument, match=r"config.pbtxt: cannot be read as a text config"):
        read_config(model_dir)


@pytest.mark.parametrize("name", ["\u00b2", "\u0661", "\uff11", "1\u00b2"])
def test_version_directories_of_non_ascii_digits_are_not_versions(
    tmp_path: Path, name: str
) -> None:
    """str.isdigit() is true for these, and int() fails on some (a superscript two) or reads
    others as numbers (an Arabic-Indic one): neither is a version directory."""
    assert available_versions(_versions(tmp_path, name, "2")) == [2]


@pytest.mark.parametrize(
    ("text", "expected"), [("1", 1), ("12", 12), ("", None), ("\u00b2", None), ("\u0661", None)]
)
def test_parse_version_takes_ascii_digits_only(text: str, expected: int | None) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_batch_sise: 4", 'no field named "max_batch_sise"'),
        ("foo_bar { x: 1 }", 'no field named "foo_bar"'),
    ],
)
def test_a_field_triton_does_not_know_is_an_invalid_config(
    tmp_path: Path, text: str, words: str
) -> None:
    """Triton refuses a config with a field its ModelConfig does not have; a typo must not
    load as a model that silently lacks what was meant."""
    with pytest.raises(InvalidArgument, match="not a valid model configuration") as raised:
        read_config(_model_dir(tmp_path, text))
    assert words in raised.value.message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_batch_size: -1", "max_batch_size is -1"),
        (
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }, '
            '{ name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]',
            "input 'x' is declared twice",
        ),
        ('input [ { name: "x" dims: [ 1 ] } ]', "config input 'x' must specify 'data_type'"),
        (
            'output [ { name: "y" data_type: TYPE_INVALID dims: [ 1 ] } ]',
            "config output 'y' must specify 'data_type'",
        ),
    ],
)
def test_configs_triton_refuses_are_refused(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check_config(read_config(_model_dir(tmp_path, text)))


@pytest.mark.parametrize("text", ["9" * 5000, str(2**63), "0" + "9" * 19])
def test_a_version_too_large_for_int64_is_not_a_version(text: str) -> None:
    assert parse_version(text) is None


@pytest.mark.parametrize(
    ("batching", "words"),
    [
        ("priority_levels: 2", "default priority level must be in range [1, 2] for resnet"),
        (
            "priority_levels: 2 default_priority_level: 1 "
            "priority_queue_policy { key: 3 value {} }",
            "priority queue policy must have priority level in range [1, 2] for resnet",
        ),
    ],
)
def test_priority_levels_follow_tritons_rules(tmp_path: Path, batching: str, words: str) -> None:
    text = f"max_batch_size: 4 dynamic_batching {{ {batching} }}"
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        check_config(read_config(_model_dir(tmp_path, text)))
