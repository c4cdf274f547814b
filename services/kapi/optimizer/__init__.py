"""The optimizer: ONNX packaging and compression of trainer bundles, each variant measured."""
