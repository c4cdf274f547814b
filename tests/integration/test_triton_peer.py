"""The `start_triton` fixture: a real NVIDIA Triton 2.51 serves a tiny ONNX model through its
python backend, and answers tritonclient as Triton does (one server for the whole check)."""

from __future__ import annotations

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper

from tests.support.clients import infer_input
from tests.support.triton import TritonFactory

COLUMNS = 4
CONFIG = f"""max_batch_size: 8
input [
  {{ name: "A" data_type: TYPE_FP32 dims: [ {COLUMNS} ] }},
  {{ name: "B" data_type: TYPE_FP32 dims: [ {COLUMNS} ] }}
]
output [ {{ name: "SUM" data_type: TYPE_FP32 dims: [ {COLUMNS} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def add_model() -> bytes:
    """SUM = A + B, FP32, on [batch, COLUMNS] with the batch dimension dynamic."""

    def tensor(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", COLUMNS])

    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["SUM"])],
        "add",
        [tensor("A"), tensor("B")],
        [tensor("SUM")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_triton_serves_an_onnx_model(start_triton: TritonFactory) -> None:
    triton = start_triton({"add": (add_model(), CONFIG)})
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        server = client.get_server_metadata()
        assert server.name == "triton"
        assert server.version == "2.51.0"

        index = client.get_model_repository_index()
        assert [(m.name, m.version, m.state) for m in index.models] == [("add", "1", "READY")]

        metadata = client.get_model_metadata("add")
        assert metadata.platform == "python"
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("A", "FP32", [-1, COLUMNS]),
            ("B", "FP32", [-1, COLUMNS]),
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("SUM", "FP32", [-1, COLUMNS])
        ]

        rng = np.random.default_rng(0)
        for rows in (1, 3):
            a, b = (rng.standard_normal((rows, COLUMNS), dtype=np.float32) for _ in range(2))
            result = client.infer("add", [infer_input("A", a, "FP32"), infer_input("B", b, "FP32")])
            np.testing.assert_array_equal(result.as_numpy("SUM"), a + b)
    assert triton.terminate() == 0, triton.log_tail()
