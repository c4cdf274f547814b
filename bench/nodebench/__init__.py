"""The pieces of `bench/node.py`: models, load generation, servers and the report."""
