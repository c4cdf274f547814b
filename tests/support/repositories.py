"""The repository the integration suite's shared node serves: every model the tests need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support import models

BATCHING_DELAY_US = 20_000
BATCHING_MAX_BATCH = 16


def triton_config(name: str, version_policy: str) -> str:
    """A config.pbtxt as a Triton user writes it, with a section kapi skips (optimization)."""
    return f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
{version_policy}
input [
  {{
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }}
]
output [
  {{
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 100
  preferred_batch_size: [ 4, 8 ]
}}
instance_group [
  {{
    count: 2
    kind: KIND_CPU
  }}
]
parameters {{
  key: "intra_op_thread_count"
  value: {{ string_value: "1" }}
}}
optimization {{ graph {{ level: 1 }} }}
"""


BATCHING_CONFIG = f"""
name: "batching"
max_batch_size: {BATCHING_MAX_BATCH}
dynamic_batching {{ max_queue_delay_microseconds: {BATCHING_DELAY_US} }}
"""


BATCHING_BYTES_CONFIG = f"""
name: "batching_bytes"
max_batch_size: {BATCHING_MAX_BATCH}
dynamic_batching {{ max_queue_delay_microseconds: {BATCHING_DELAY_US} }}
"""


# A lone request waits this long for others to batch with: long enough to time out.
HELD_DELAY_US = 1_000_000
HELD_CONFIG = f"""
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: {HELD_DELAY_US} }}
"""


# Preferred sizes with a delay no request waits out: what runs, runs by Triton's rules.
LONG_DELAY_US = 60_000_000
PREFERRED_CONFIG = f"""
max_batch_size: 8
dynamic_batching {{
  preferred_batch_size: [ 2, 6 ]
  max_queue_delay_microseconds: {LONG_DELAY_US}
}}
"""


# Classification: five classes, four labels (the fifth class has none).
CLASSIFIER_LABELS = ["cat", "dog", "bird", "fish"]
CLASSIFIER_CONFIG = """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 5 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 5 ] label_filename: "labels.txt" } ]
"""
UNBATCHED_CLASSIFIER_CONFIG = """
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 2, 3 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 2, 3 ] } ]
"""


# Reshape: clients send and get [batch, 4]; the model takes and gives [batch, 2, 2].
RESHAPE_DATATYPES = tuple(models.DATATYPES)  # every datatype, as Triton QA builds them


def reshape_config(datatype: str) -> str:
    config_type = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    tensor = f"data_type: {config_type} dims: [ 4 ] reshape {{ shape: [ 2, 2 ] }}"
    return f"""
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: 20000 }}
input [ {{ name: "INPUT0" {tensor} }} ]
output [ {{ name: "OUTPUT0" {tensor} }} ]
"""


# A rank-0 model declared [1] without batching, as Triton's ONNX Runtime backend allows.
SCALAR_CONFIG = """
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""
SCALAR_RESHAPE_CONFIG = """
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] reshape { shape: [ ] } } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] reshape { shape: [ ] } } ]
"""


# Queue policies: a batch that waits a minute for company, requests that may not wait as
# long (their `timeout` may shorten the policy's), and two priority levels.
QUEUED_CONFIG = f"""
max_batch_size: 8
dynamic_batching {{
  max_queue_delay_microseconds: {LONG_DELAY_US}
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy {{
    default_timeout_microseconds: {LONG_DELAY_US}
    allow_timeout_override: true
  }}
}}
"""


# A config that asks to batch a model whose outputs do not keep the batch first.
TRANSPOSE_BATCHED_CONFIG = f"""
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: {BATCHING_DELAY_US} }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


@dataclass(frozen=True)
class MainRepository:
    path: Path
    cnn: models.TinyCnn


def build_main_repository(root: Path) -> models.TinyCnn:
    for datatype in models.DATATYPES:
        models.save_model(root, f"identity_{datatype.lower()}", models.identity_model(datatype))
    models.save_model(root, "identity_bf16", models.identity_bf16_model())
    models.save_model(root, "simple", models.add_sub_model())
    # Version v adds v, so a response shows which version answered.
    for version in (1, 2, 3):
        constant = models.add_constant_model(float(version))
        models.save_model(
            root,
            "triton_all",
            constant,
            version,
            triton_config("triton_all", "version_policy: { all: {} }"),
        )
        models.save_model(
            root,
            "triton_latest",
            constant,
            version,
            triton_config("triton_latest", "version_policy: { latest: { num_versions: 2 } }"),
        )
        models.save_model(
            root, "triton_default", constant, version, triton_config("triton_default", "")
        )
    models.save_model(root, "batching", models.add_constant_model(0.5), config=BATCHING_CONFIG)
    models.save_model(
        root, "batching_bytes", models.identity_model("BYTES"), config=BATCHING_BYTES_CONFIG
    )
    models.save_model(root, "held", models.add_constant_model(1.0), config=HELD_CONFIG)
    models.save_model(root, "preferred", models.add_constant_model(1.0), config=PREFERRED_CONFIG)
    models.save_model(
        root, "classifier", models.identity_model("FP32", ("batch", 5)), config=CLASSIFIER_CONFIG
    )
    (root / "classifier" / "labels.txt").write_text("\n".join(CLASSIFIER_LABELS) + "\n")
    models.save_model(
        root,
        "classifier_unbatched",
        models.identity_model("INT32", (2, 3)),
        config=UNBATCHED_CLASSIFIER_CONFIG,
    )
    for datatype in RESHAPE_DATATYPES:
        models.save_model(
            root,
            f"reshape_{datatype.lower()}",
            models.identity_model(datatype, ("batch", 2, 2)),
            config=reshape_config(datatype),
        )
    models.save_model(root, "scalar_batched", models.identity_model("FP32", ("batch",)))
    models.save_model(root, "scalar", models.identity_model("INT32", ()), config=SCALAR_CONFIG)
    models.save_model(root, "scalar_auto", models.identity_model("INT32", ()))
    models.save_model(
        root, "scalar_reshape", models.identity_model("FP32", ()), config=SCALAR_RESHAPE_CONFIG
    )
    models.save_model(root, "queued", models.add_constant_model(1.0), config=QUEUED_CONFIG)
    models.save_model(root, "counted", models.identity_model("FP32"))
    models.save_model(root, "identity_wide", models.identity_model("FP32", ["batch", "width"]))
    models.save_model(
        root, "identity_bytes_wide", models.identity_model("BYTES", ["batch", "width"])
    )
    models.save_model(root, "transpose", models.transpose_model())
    models.save_model(
        root, "transpose_batched", models.transpose_model(), config=TRANSPOSE_BATCHED_CONFIG
    )
    models.save_model(root, "gather", models.gather_model())
    models.save_model(root, "reshape", models.reshape_model())
    cnn = models.export_cnn(root / "cnn_onnx" / "1" / "model.onnx")
    models.convert_to_openvino(
        root / "cnn_onnx" / "1" / "model.onnx", root / "cnn_openvino" / "1" / "model.xml"
    )
    return cnn
