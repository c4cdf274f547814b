"""The serving node: a Triton-layout model repository served over the Open Inference Protocol."""
