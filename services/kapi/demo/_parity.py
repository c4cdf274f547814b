"""The demo's Triton-parity stage: the same node over KServe v2 REST with binary tensors,
classification with the model's labels, an ensemble that preprocesses raw images, a
stateful sequence on a stream, inputs and outputs in system shared memory, and a model
loaded from a config and files sent with the load request."""

from __future__ import annotations

import json
import queue
import uuid
from typing import Any

import numpy as np

from kapi.demo._serving import HOST


def triton_features(client: Any, http_port: int) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    raw = np.random.default_rng(1).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    images = (raw.astype(np.float32) / 255.0)[:, None]
    image = grpcclient.InferInput("image", list(images.shape), "FP32")
    image.set_data_from_numpy(images)
    over_grpc = client.infer("digits_onnx", [image]).as_numpy("logits")

    with httpclient.InferenceServerClient(f"{HOST}:{http_port}") as rest:
        tensor = httpclient.InferInput("image", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)  # binary, Triton's extension
        over_rest = rest.infer("digits_onnx", [tensor]).as_numpy("logits")
        print(
            f"5. REST on port {http_port} (tritonclient.http, binary tensors) gives the gRPC "
            f"answer: {np.array_equal(over_rest, over_grpc)}"
        )
        top = [httpclient.InferRequestedOutput("logits", binary_data=False, class_count=3)]
        classes = rest.infer("digits_onnx", [tensor], outputs=top).as_numpy("logits")
        print(f"   classification, top 3 of the first image: {list(classes[0])}")

    pixels = grpcclient.InferInput("raw", list(raw.shape), "UINT8")
    pixels.set_data_from_numpy(raw)
    top1 = [grpcclient.InferRequestedOutput("logits", class_count=1)]
    piped = client.infer("digits_pipeline", [pixels]).as_numpy("logits")
    labels = client.infer("digits_pipeline", [pixels], outputs=top1).as_numpy("logits")
    top_class = [value.decode() for value in labels[:, 0]]
    print(
        f"   ensemble digits_pipeline (uint8 -> digits_preprocess -> digits_onnx) matches: "
        f"{np.allclose(piped, over_grpc, atol=1e-5)}; top class {top_class}"
    )
    _sequence(client)
    _shared_memory(client, images, over_grpc)
    _load_with_files(client)


def _sequence(client: Any) -> None:
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    chunks = [3, 1, 4, 1, 5]
    for index, chunk in enumerate(chunks):
        tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[chunk]], dtype=np.int32))
        client.async_stream_infer(
            "counter", [tensor], sequence_id=7, sequence_start=index == 0,
            sequence_end=index == len(chunks) - 1,
        )  # fmt: skip
    totals = []
    for _ in chunks:
        result, error = answers.get(timeout=30)
        if error is not None:
            raise SystemExit(f"the sequence failed: {error}")
        totals.append(int(result.as_numpy("OUTPUT")[0, 0]))
    client.stop_stream()
    print(f"   sequence 7 on a stream, chunks {chunks}: running totals {totals} (state kept)")


def _shared_memory(client: Any, images: np.ndarray, expected: np.ndarray) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    tag = uuid.uuid4().hex[:8]
    size_in, size_out = images.nbytes, expected.nbytes
    regions = [
        shm.create_shared_memory_region(f"in-{tag}", f"/kapi-demo-in-{tag}", size_in),
        shm.create_shared_memory_region(f"out-{tag}", f"/kapi-demo-out-{tag}", size_out),
    ]
    try:
        shm.set_shared_memory_region(regions[0], [images])
        client.register_system_shared_memory(f"in-{tag}", f"/kapi-demo-in-{tag}", size_in)
        client.register_system_shared_memory(f"out-{tag}", f"/kapi-demo-out-{tag}", size_out)
        tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
        tensor.set_shared_memory(f"in-{tag}", size_in)
        output = grpcclient.InferRequestedOutput("logits")
        output.set_shared_memory(f"out-{tag}", size_out)
        client.infer("digits_onnx", [tensor], outputs=[output])
        got = shm.get_contents_as_numpy(regions[1], np.float32, list(expected.shape))
        print(
            f"   system shared memory: {size_in} bytes in, {size_out} out, no tensor bytes on "
            f"the wire; same answer: {np.allclose(got, expected, atol=1e-6)}"
        )
    finally:
        client.unregister_system_shared_memory(f"in-{tag}")
        client.unregister_system_shared_memory(f"out-{tag}")
        for region in regions:
            shm.destroy_shared_memory_region(region)


def _load_with_files(client: Any) -> None:
    """A model the repository does not hold: its config and file sent with the load."""
    import tritonclient.grpc as grpcclient

    from kapi.demo._repository import _text_echo

    client.load_model(
        "uploaded_echo",
        config=json.dumps({"backend": "onnxruntime", "max_batch_size": 4}),
        files={"file:1/model.onnx": _text_echo().SerializeToString()},
    )
    words = np.array([[b"kapi", b"loads", b"from", b"files"]], dtype=np.object_)
    tensor = grpcclient.InferInput("text", [1, 4], "BYTES")
    tensor.set_data_from_numpy(words)
    echo = client.infer("uploaded_echo", [tensor]).as_numpy("echo")
    print(f"   loaded 'uploaded_echo' from a config and files in the request: {echo.tolist()}")
    client.unload_model("uploaded_echo")
