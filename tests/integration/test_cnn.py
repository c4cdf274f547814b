"""A small torch CNN exported to ONNX, and an OpenVINO IR converted from it, served by the
node: both answer what torch answers, at every batch size the autocompleted config allows."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
import tritonclient.grpc as grpcclient

from tests.support.repositories import MainRepository

PLATFORMS = {"cnn_onnx": "onnxruntime_onnx", "cnn_openvino": "openvino"}


def images(batch: int, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((batch, 1, 8, 8), dtype=np.float32)


def torch_logits(
    repository: MainRepository, batch: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    with torch.no_grad():
        logits: npt.NDArray[np.float32] = repository.cnn(torch.from_numpy(batch)).numpy()
    return logits


@pytest.mark.parametrize("model", sorted(PLATFORMS))
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_served_cnn_matches_torch(
    client: grpcclient.InferenceServerClient,
    main_repository: MainRepository,
    model: str,
    batch: int,
) -> None:
    data = images(batch, seed=batch)
    infer_input = grpcclient.InferInput("image", list(data.shape), "FP32")
    infer_input.set_data_from_numpy(data)

    logits = client.infer(model, [infer_input]).as_numpy("logits")

    expected = torch_logits(main_repository, data)
    assert logits is not None
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert (logits.argmax(axis=1) == expected.argmax(axis=1)).all()


@pytest.mark.parametrize("model", sorted(PLATFORMS))
def test_cnn_metadata_is_completed_from_the_model(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    metadata = client.get_model_metadata(model)
    config = client.get_model_config(model).config

    assert metadata.platform == PLATFORMS[model]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "FP32", [-1, 1, 8, 8])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, 10])
    ]
    # Triton's autocomplete: a model batchable in its first dimension gets a batch size.
    assert config.max_batch_size == 4
    assert list(config.input[0].dims) == [1, 8, 8]
    assert config.HasField("dynamic_batching")
