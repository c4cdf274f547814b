"""Reading a model's directory: its config.pbtxt, its version directories, its runtime.

A config.pbtxt is Triton's ModelConfig in protobuf text format. Anything that makes a model's
directory unreadable (a config that is not UTF-8 text, a config.pbtxt that is a directory,
an unreadable directory) is an InvalidArgument naming the path, so it fails that model's
load and nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

from google.protobuf import json_format, text_format

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, NotFound
from kapi.node.runtimes import FILES, PLATFORMS, RUNTIMES

log = logging.getLogger("kapi.node.config")
CONFIG_FILE = "config.pbtxt"
_INT64_DIGITS = len(str(2**63))


def read_config(model_dir: Path) -> mc.ModelConfig:
    """The model's config.pbtxt, or an empty config named after the directory."""
    config = mc.ModelConfig()
    path = model_dir / CONFIG_FILE
    if path.exists() or path.is_symlink():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{path}: cannot be read as a text config: {exc}") from exc
        try:
            text_format.Parse(text, config)  # an unknown field is an error, as in Triton
        except text_format.ParseError as exc:
            raise InvalidArgument(f"{path}: not a valid model configuration: {exc}") from exc
    if config.name and config.name != model_dir.name:
        raise InvalidArgument(
            f"{path}: name '{config.name}' does not match its directory '{model_dir.name}'"
        )
    config.name = model_dir.name
    return config


def config_from_json(name: str, text: str) -> mc.ModelConfig:
    """A config given as JSON (RepositoryModelLoad's `config`), in place of config.pbtxt."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)  # an unknown field is an error, as in Triton
    except json_format.ParseError as exc:  # Triton's words, then the parser's
        raise InvalidArgument(f"Invalid config override: {exc}") from exc
    if config.name and config.name != name:
        raise InvalidArgument(
            f"Invalid config override: name '{config.name}' does not match the model '{name}'"
        )
    config.name = name
    return config


def parse_version(version: str) -> int | None:
    """A version as a request names it: ASCII digits that fit an int64 (Triton's type), or
    None (a superscript two or an Arabic-Indic digit passes str.isdigit, and is not one)."""
    if not (version.isascii() and version.isdigit()) or len(version) > _INT64_DIGITS:
        return None
    number = int(version)
    return number if number < 2**63 else None


def available_versions(model_dir: Path) -> list[int]:
    # As in Triton, a version directory is a positive number without leading zeros.
    try:
        entries = [p for p in model_dir.iterdir() if p.is_dir()]
    except OSError as exc:
        raise InvalidArgument(f"{model_dir}: cannot list its version directories: {exc}") from exc
    return sorted(
        version
        for p in entries
        if (version := parse_version(p.name)) is not None and not p.name.startswith("0")
    )


def select_versions(model_dir: Path, config: mc.ModelConfig) -> list[int]:
    """The versions the config's version_policy asks to serve (default: the latest one)."""
    versions = available_versions(model_dir)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        chosen = versions
    elif choice == "specific":
        wanted = set(policy.specific.versions)
        missing = sorted(wanted - set(versions))
        if missing:  # as Triton: the versions there load, the others are warned about
            log.warning(
                "model %r: versions %s of its specific version policy are not in %s",
                config.name, missing, model_dir,
            )  # fmt: skip
        chosen = sorted(wanted & set(versions))
        if not chosen:  # Triton's words
            raise NotFound(
                "at least one version must be available under the version policy of model "
                f"'{config.name}': none of {sorted(wanted)} is in {model_dir}"
            )
    else:
        count = policy.latest.num_versions if choice == "latest" else 1
        chosen = versions[-max(count, 1) :]
    if not chosen:
        raise NotFound(f"model '{config.name}': no numeric version directory in {model_dir}")
    return chosen


def choose_runtime(config: mc.ModelConfig, version_dir: Path) -> str:
    """The runtime name: from backend, else platform, else the model file present."""
    if config.backend:
        if config.backend not in RUNTIMES:
            raise InvalidArgument(
                f"model '{config.name}': backend '{config.backend}' is not served by kapi, "
                f"expected one of {sorted(RUNTIMES)}"
            )
        return config.backend
    if config.platform:
        if config.platform not in PLATFORMS:
            raise InvalidArgument(
                f"model '{config.name}': platform '{config.platform}' is not served by kapi, "
                f"expected one of {sorted(PLATFORMS)}"
            )
        return PLATFORMS[config.platform]
    for filename, runtime in FILES.items():
        if (version_dir / filename).exists():
            return runtime
    raise InvalidArgument(
        f"model '{config.name}': no backend or platform in config and no model file "
        f"({', '.join(FILES)}) in {version_dir}"
    )
