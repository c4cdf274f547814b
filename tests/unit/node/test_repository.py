"""The repository's bookkeeping for names that are not models."""

from __future__ import annotations

from pathlib import Path

import pytest
from kapi.core.errors import InvalidArgument, NotFound
from kapi.node.repository import ModelRepository
from kapi.node.stats import NodeMetrics
from prometheus_client import CollectorRegistry


async def test_unloading_names_that_are_not_models_keeps_nothing(tmp_path: Path) -> None:
    """Each unload of an unknown name once left a lock behind: 100 k names, 17 MiB."""
    repository = ModelRepository(tmp_path, NodeMetrics(CollectorRegistry()), 4, 1.0)
    for index in range(1000):
        await repository.unload(f"no_such_model_{index}")  # as Triton: nothing to do
    assert len(repository._locks) == 0
    assert repository.index(ready_only=False) == []


@pytest.mark.parametrize("name", ["x" * 5000, ".hidden"])
async def test_loading_a_name_that_is_no_directory_here_is_not_found(
    tmp_path: Path, name: str
) -> None:
    repository = ModelRepository(tmp_path, NodeMetrics(CollectorRegistry()), 4, 1.0)
    with pytest.raises(NotFound, match="is not in the model repository"):
        await repository.load(name)
    assert len(repository._locks) == 0


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("a\x00b", "must not contain path traversal characters"),
        ("../x", "must not contain path traversal characters"),
        ("", "Model name cannot be empty"),
        ("  ", "Model name cannot be empty"),
    ],
)
async def test_loading_a_name_that_cannot_be_a_directory_is_invalid(
    tmp_path: Path, name: str, words: str
) -> None:
    repository = ModelRepository(tmp_path, NodeMetrics(CollectorRegistry()), 4, 1.0)
    with pytest.raises(InvalidArgument, match=words):
        await repository.load(name)
    assert len(repository._locks) == 0
