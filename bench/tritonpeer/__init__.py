"""A real NVIDIA Triton Inference Server as a benchmark peer (see README.md beside this)."""
