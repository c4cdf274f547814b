"""A real S3-compatible server for the tests: moto's, as a process on a loopback port."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx

from tests.support.node import HOST, free_port, terminate

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
REGION = "us-east-1"
# moto accepts any credentials; these only keep boto3 from looking for real ones.
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class S3ServerFailedToStart(RuntimeError):
    pass


@contextlib.contextmanager
def running_s3_server(log_path: Path, attempts: int = 3) -> Iterator[str]:
    """moto's server for the `with` block; yields its endpoint URL (http://127.0.0.1:PORT)."""
    for attempt in range(attempts):
        port = free_port()
        endpoint = f"http://{HOST}:{port}"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [str(MOTO_SERVER), "-H", HOST, "-p", str(port)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            if _wait(process, endpoint):
                break
        except BaseException:
            terminate(process, STOP_TIMEOUT_S)
            raise
        terminate(process, STOP_TIMEOUT_S)  # exited early: most likely the port was taken meanwhile
        if attempt + 1 == attempts:
            log = log_path.read_text(errors="replace")
            raise S3ServerFailedToStart(f"moto_server did not start:\n{log}")
    try:
        yield endpoint
    finally:
        terminate(process, STOP_TIMEOUT_S)


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client of the server at `endpoint`, with dummy credentials."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create `bucket` on the server at `endpoint` (us-east-1 takes no location constraint)."""
    client = s3_client(endpoint)
    try:
        client.create_bucket(Bucket=bucket)
    finally:
        client.close()


def _wait(process: subprocess.Popen[bytes], endpoint: str) -> bool:
    """True once the server answers HTTP; False when it exited first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=2.0)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        return process.poll() is None  # not some other server that took the port
    raise S3ServerFailedToStart(
        f"moto_server at {endpoint} not answering after {READY_TIMEOUT_S} s"
    )
