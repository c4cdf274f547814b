"""Races the API must win whatever the timing: held open here on purpose, with the service
in this process (a real uvicorn server on a loopback port) and one store call made to wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from kapi.repository import entities as ent
from kapi.repository.api import create_app
from kapi.repository.auth import Authenticator, TokenSpec
from kapi.repository.blobs import LocalBlobStore
from kapi.repository.client import RepositoryClient
from kapi.repository.store import MetadataStore, connect, migrate

from tests.support.node import HOST, free_port

TOKEN = "t" * 32
KEY = ("onnxruntime", "fp32", "cpu-x86_64")


class HeldStore(MetadataStore):
    """add_variant waits, once armed, until released: the window between an upload's blob
    being in and its variant row being written."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.armed = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()

    def add_variant(self, *args: Any, **kwargs: Any) -> ent.VariantOut:
        if self.armed.is_set():
            self.holding.set()
            assert self.release.wait(30)
        return super().add_variant(*args, **kwargs)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, HeldStore]]:
    engine = connect(f"sqlite:///{tmp_path}/r.db")
    migrate(engine)
    store = HeldStore(engine)
    app = create_app(
        store,
        LocalBlobStore(tmp_path / "blobs"),
        Authenticator([TokenSpec(name="admin", token=TOKEN, scope="write")], open_reads=True),
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield f"http://{HOST}:{port}", store
    store.release.set()
    server.should_exit = True
    thread.join(30)


def test_a_delete_does_not_take_the_blob_of_an_upload_of_the_same_bytes(
    tmp_path: Path, served: tuple[str, HeldStore]
) -> None:
    url, store = served
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"the same bytes in two versions")
    with RepositoryClient(url, TOKEN) as client:
        client.create_model(ent.ModelCreate(name="m"))
        for _ in range(2):
            client.create_version("m", ent.VersionCreate())
        first = client.upload("m", 1, KEY, artifact)
        store.armed.set()
        with ThreadPoolExecutor(2) as pool:
            second = pool.submit(client.upload, "m", 2, KEY, artifact)
            assert store.holding.wait(30)  # version 2's blob is in; its row is not yet
            deleted = pool.submit(
                httpx.delete,
                f"{url}/v1/models/m/versions/1",
                headers={"authorization": f"Bearer {TOKEN}"},
            )
            time.sleep(0.2)  # the delete runs now, if nothing holds it back
            store.release.set()
            assert deleted.result(30).status_code == 204
            assert second.result(30).digest == first.digest
        target = tmp_path / "pulled"
        client.download("m", 2, KEY, target, first.digest)
        assert target.read_bytes() == artifact.read_bytes()
