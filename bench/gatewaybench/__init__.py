"""The pieces of `bench/gateway.py`: the requests, the servers and proxies, the client
processes and the report."""
