"""The zoo's registry: architectures by name, built with validated common arguments."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from kapi.core.errors import AlreadyExists, InvalidArgument

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Registers a model class (or function) under `name`. It is called with the keywords
    `in_channels`, `num_classes`, `width`, `depth` and its own extra keywords."""

    def decorate(factory: Factory) -> Factory:
        if name in _FACTORIES:
            raise AlreadyExists(f"a model named '{name}' is registered already")
        _FACTORIES[name] = factory
        return factory

    return decorate


def names() -> list[str]:
    """The registered architectures, sorted."""
    return sorted(_FACTORIES)


def options(name: str) -> set[str]:
    """The keywords `name` takes besides the common ones (`input_size`, `dropout`, ...)."""
    common = {"in_channels", "num_classes", "width", "depth"}
    return set(inspect.signature(_factory(name)).parameters) - common


def _factory(name: str) -> Callable[..., nn.Module]:
    try:
        return _FACTORIES[name]
    except KeyError:
        raise InvalidArgument(f"unknown model '{name}', expected one of {names()}") from None


def build(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    width: float = 1.0,
    depth: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """A freshly initialized `name` for `in_channels`-channel images of any size and
    `num_classes` classes; `width` scales channels and `depth` scales blocks per stage."""
    factory = _factory(name)
    _check_sizes(name, in_channels=in_channels, num_classes=num_classes)
    _check_multipliers(name, width=width, depth=depth)
    arguments = {"in_channels": in_channels, "num_classes": num_classes, "width": width}
    arguments |= {"depth": depth, **kwargs}
    try:
        inspect.signature(factory).bind(**arguments)
    except TypeError as exc:
        raise InvalidArgument(f"model '{name}': {exc}") from exc
    try:
        return factory(**arguments)
    except InvalidArgument as exc:  # a model's own argument: say which model refused it
        raise InvalidArgument(f"model '{name}': {exc.message}") from exc


def _check_sizes(name: str, **sizes: int) -> None:
    for argument, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument(
                f"model '{name}': {argument} must be an integer >= 1, got {value!r}"
            )


def _check_multipliers(name: str, **multipliers: float) -> None:
    for argument, value in multipliers.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"model '{name}': {argument} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise InvalidArgument(f"model '{name}': {argument} must be > 0, got {value!r}")
