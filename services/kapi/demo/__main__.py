"""`make demo`: build an example model repository, serve it with a kapi node, query it with
tritonclient exactly as a Triton user would (gRPC and REST; classification, an ensemble, a
stateful sequence, shared memory, a load with overrides), show the node holding up against
a broken model, a malformed request and SIGTERM under load; then push the CNN to a kapi
model repository, serve it from there through `digits@production` and move the alias under
traffic; ingest and analyze datasets, train the small CNN, run a short hardware-aware HPO
study and push its chosen model; optimize and verify it, catch a planted regression at the
promotion gate; route the demo's traffic through a gateway over two nodes with different
hardware profiles, with a 90/10 split; and leave the repository on disk.

Needs the dev extra (torch, onnx, openvino, tritonclient).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kapi.demo import _data, _gateway, _hardening, _parity, _registry, _repository, _serving

DEFAULT_ROOT = Path("demo-repository")


def main(argv: list[str] | None = None) -> None:
    import tritonclient.grpc as grpcclient

    parser = argparse.ArgumentParser(prog="python -m kapi.demo", description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where to build it")
    root: Path = parser.parse_args(argv).root.resolve()
    print(f"1. building an example model repository in {root}")
    _repository.build_repository(root)
    process, ports = _serving.start_node(root)
    url = f"{_serving.HOST}:{ports['grpc']}"
    try:
        with grpcclient.InferenceServerClient(url) as client:
            _serving.wait_ready(client, process)
            _serving.run_queries(client, url)
            _parity.triton_features(client, ports["http"])
            _hardening.broken_model(client, root)
        _hardening.malformed_request(url, ports["http"])
        _hardening.sigterm_under_load(url, process)
    finally:
        if process.poll() is None:
            process.kill()
    registry = root.parent / "demo-registry"
    _registry.model_repository(root, registry)
    print(f"   its data, the node's cache and log, and the export stay in {registry}")
    kapi = Path(sys.executable).with_name("kapi")
    _data.data_stage(root.parent / "demo-data", registry / "data")
    _gateway.gateway_stage(root, root.parent / "demo-gateway")
    print(f"14. the repository stays in {root}; serve it yourself with:")
    print(f"   {kapi} node --model-repository {root}")


if __name__ == "__main__":
    main()
