"""The trainer's job service: `kapi trainer serve`, a REST API that runs ingest and training
jobs as local processes or as Kubernetes Jobs."""
