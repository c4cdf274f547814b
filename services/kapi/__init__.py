"""kapi: from data to fast, verified inference on GPUs and edge accelerators."""

__version__ = "0.1.0"
