"""The repository's commands: `kapi repository serve|export`, `kapi push`, `kapi models`,
`kapi versions`, `kapi promote`, `kapi pull`. Tables for people, `--json` for programs."""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument, KapiError, NotFound
from kapi.core.hardware import detect_profiles
from kapi.repository import entities as ent
from kapi.repository.client import RepositoryClient, dumps


def add_commands(commands: Any) -> None:
    repository = commands.add_parser("repository", help="the model repository service")
    actions = repository.add_subparsers(dest="action", required=True)
    serve = actions.add_parser("serve", help="serve the repository's REST API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data", help="directory for SQLite, local blobs and the admin token")
    serve.add_argument("--database", help="SQLAlchemy URL, e.g. postgresql+psycopg://…")
    serve.add_argument("--blobs", help="file:///PATH or s3://BUCKET[/PREFIX]")
    serve.add_argument("--tokens-file", help="JSON list of {name, token|sha256, scope, models}")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.set_defaults(handler=_serve)

    export = actions.add_parser("export", help="write the models of an alias in Triton's layout")
    _client_args(export)
    export.add_argument("--alias", default="production")
    export.add_argument("--model", action="append", dest="models", help="only these; repeatable")
    _target_args(export)
    export.add_argument("directory", type=Path)
    export.set_defaults(handler=_export)

    push = commands.add_parser("push", help="upload an artifact as a new version or variant")
    _client_args(push)
    push.add_argument("model")
    push.add_argument(
        "artifact",
        type=Path,
        help="a model file, a directory (sent as tar), or a kapi train bundle (with no "
        "--runtime: a new version from its ONNX model, lineage and metrics)",
    )
    push.add_argument("--runtime", choices=ent.RUNTIMES, help="required but for a bundle")
    push.add_argument("--precision", default="fp32", choices=ent.PRECISIONS)
    push.add_argument("--profile", help="the target hardware profile (required but for a bundle)")
    push.add_argument("--version", type=int, help="add the variant to this version")
    push.add_argument("--filename", help="its name in the version directory")
    push.add_argument("--signature", type=Path, help="JSON: {inputs, outputs, max_batch_size}")
    push.add_argument("--requirements", type=Path, help="the requirements spec (YAML or JSON)")
    push.add_argument("--description", default="", help="for a new model")
    push.add_argument("--lineage", type=Path, help="JSON: dataset digest, training config, …")
    push.add_argument("--metrics", type=Path, help="JSON")
    push.add_argument("--report", type=Path, help="a verification report (JSON) to attach")
    push.set_defaults(handler=_push)

    models = commands.add_parser("models", help="list the repository's models")
    _client_args(models)
    models.set_defaults(handler=_models)

    versions = commands.add_parser("versions", help="list a model's versions and variants")
    _client_args(versions)
    versions.add_argument("model")
    versions.set_defaults(handler=_versions)

    promote = commands.add_parser("promote", help="point an alias at a version")
    _client_args(promote)
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    promote.add_argument("--alias", default="production")
    promote.add_argument("--force", action="store_true", help="move production unverified")
    promote.add_argument("--expected-version", type=int, help="fail unless the alias is here")
    promote.set_defaults(handler=_promote)

    pull = commands.add_parser("pull", help="download the best variant of MODEL@REF")
    _client_args(pull)
    pull.add_argument("ref", help="MODEL@ALIAS, MODEL@VERSION or MODEL (latest)")
    _target_args(pull)
    pull.add_argument("directory", type=Path, help="written in Triton's layout")
    pull.set_defaults(handler=_pull)


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", help="URL (default $KAPI_REPOSITORY_URL)")
    parser.add_argument("--token", help="bearer token (default $KAPI_TOKEN, $KAPI_TOKEN_FILE)")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile", action="append", dest="profiles", help="default: this machine's"
    )
    parser.add_argument(
        "--runtime", action="append", dest="runtimes", help="default: onnxruntime, openvino"
    )


def _client(args: argparse.Namespace) -> RepositoryClient:
    return RepositoryClient.from_env(args.repository, args.token)


def _serve(args: argparse.Namespace) -> None:
    from kapi.core.logging import configure_logging
    from kapi.repository.server import serve
    from kapi.repository.settings import RepositorySettings

    settings = RepositorySettings.from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    serve(settings)


def _push(args: argparse.Namespace) -> None:
    if args.runtime is None and args.profile is None and (args.artifact / "lineage.json").is_file():
        _push_bundle(args)
        return
    if args.runtime is None or args.profile is None:
        raise InvalidArgument("--runtime and --profile are required (but for a kapi bundle)")
    key = (args.runtime, args.precision, args.profile)
    if args.version is not None and (args.lineage or args.metrics):
        raise InvalidArgument(
            "--lineage and --metrics describe a new version; with --version the variant "
            "joins a version whose lineage and metrics are set for good"
        )
    wanted = ent.ModelCreate(
        name=args.model,
        description=args.description,
        signature=_json(args.signature) if args.signature else None,
        requirements=_requirements(args.requirements),
    )
    with _client(args) as client:
        try:
            existing = client.model(args.model)
        except NotFound:
            client.create_model(wanted)
        else:  # what the model is was said when it was made: a push may repeat it, not change it
            given = {
                "description": (args.description or None, existing.description or None),
                "signature": (wanted.signature, existing.signature),
                "requirements": (wanted.requirements, existing.requirements),
            }
            changed = [k for k, (new, old) in given.items() if new is not None and new != old]
            if changed:
                raise InvalidArgument(
                    f"model '{args.model}' exists with another {', '.join(changed)}; "
                    "a push does not change a model"
                )
        number = args.version
        if number is None:
            spec = ent.VersionCreate(
                lineage=_json(args.lineage) if args.lineage else {},
                metrics=_json(args.metrics) if args.metrics else {},
            )
            number = client.create_version(args.model, spec).number
        with tempfile.TemporaryDirectory() as scratch:
            artifact, fmt = args.artifact, "file"
            if args.artifact.is_dir():
                artifact, fmt = Path(scratch) / "artifact.tar", "tar"
                _tar(args.artifact, artifact)
            variant = client.upload(args.model, number, key, artifact, fmt, args.filename)
        if args.report:
            report = _json(args.report)
            variant = client.set_report(args.model, number, key, report)
    _print(
        args,
        {"model": args.model, "version": number, **variant.model_dump(mode="json")},
        [("model", args.model), ("version", number), ("variant", "/".join(key)),
         ("digest", variant.digest), ("size", variant.size), ("verified", variant.verified)],
    )  # fmt: skip


def _push_bundle(args: argparse.Namespace) -> None:
    from kapi.trainer.push import push_bundle

    given = [
        flag
        for flag, value in (
            ("--version", args.version),
            ("--filename", args.filename),
            ("--signature", args.signature),
            ("--lineage", args.lineage),
            ("--metrics", args.metrics),
            ("--description", args.description),
        )
        if value
    ]
    if given:
        raise InvalidArgument(f"a bundle says these itself: drop {', '.join(given)}")
    with _client(args) as client:
        number, variant = push_bundle(
            client, args.model, args.artifact, requirements=_requirements(args.requirements)
        )
        if args.report:
            key = (variant.runtime, variant.precision, variant.profile)
            variant = client.set_report(args.model, number, key, _json(args.report))
    _print(
        args,
        {"model": args.model, "version": number, **variant.model_dump(mode="json")},
        [("model", args.model), ("version", number),
         ("variant", f"{variant.runtime}/{variant.precision}/{variant.profile}"),
         ("digest", variant.digest), ("size", variant.size)],
    )  # fmt: skip


def _models(args: argparse.Namespace) -> None:
    with _client(args) as client:
        models = client.models()
    if args.json:
        print(dumps([m.model_dump(mode="json") for m in models]))
        return
    _table(
        ["MODEL", "LATEST", "ALIASES", "DESCRIPTION"],
        [[m.name, m.latest_version or "-", _aliases(m.aliases), m.description] for m in models],
    )


def _versions(args: argparse.Namespace) -> None:
    with _client(args) as client:
        versions = client.versions(args.model)
    if args.json:
        print(dumps([v.model_dump(mode="json") for v in versions]))
        return
    rows = []
    for version in versions:
        for index, variant in enumerate(version.variants or [None]):
            rows.append(
                [
                    version.number if index == 0 else "",
                    ",".join(version.aliases) if index == 0 else "",
                    f"{variant.runtime}/{variant.precision}/{variant.profile}" if variant else "-",
                    _size(variant.size) if variant else "",
                    ("yes" if variant.verified else "no") if variant else "",
                    variant.digest[:19] if variant else "",
                ]
            )
    _table(["VERSION", "ALIASES", "VARIANT", "SIZE", "VERIFIED", "DIGEST"], rows)


def _promote(args: argparse.Namespace) -> None:
    with _client(args) as client:
        model = client.set_alias(
            args.model, args.alias, args.version, args.force, args.expected_version
        )
    _print(
        args,
        model.model_dump(mode="json"),
        [("model", model.name), ("alias", args.alias), ("version", model.aliases[args.alias])],
    )


def _pull(args: argparse.Namespace) -> None:
    from kapi.repository.export import fetch, write_model

    name, _, ref = args.ref.partition("@")
    profiles, runtimes = _targets(args)
    with _client(args) as client:
        resolved = client.resolve(name, ref or "latest", profiles, runtimes)
        downloads = args.directory / ".kapi-downloads"
        artifact = fetch(client, resolved, downloads)
        model_dir = write_model(resolved, artifact, args.directory, pin_version=False)

        downloads.rmdir()
    variant = resolved.variant
    _print(
        args,
        resolved.model_dump(mode="json"),
        [("model", name), ("version", resolved.version.number),
         ("variant", f"{variant.runtime}/{variant.precision}/{variant.profile}"),
         ("digest", variant.digest), ("written", model_dir)],
    )  # fmt: skip


def _export(args: argparse.Namespace) -> None:
    from kapi.repository.export import export

    profiles, runtimes = _targets(args)
    with _client(args) as client:
        written = export(client, args.alias, args.directory, profiles, runtimes, args.models)
    if args.json:
        print(dumps([r.model_dump(mode="json") for r in written]))
        return
    _table(
        ["MODEL", "VERSION", "VARIANT", "DIGEST"],
        [
            [r.model.name, r.version.number,
             f"{r.variant.runtime}/{r.variant.precision}/{r.variant.profile}",
             r.variant.digest[:19]]
            for r in written
        ],
    )  # fmt: skip


def _targets(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    return args.profiles or detect_profiles(), args.runtimes or ["onnxruntime", "openvino"]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KapiError(f"{path}: {exc}") from exc


def _requirements(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from kapi.core.requirements import load_requirements

    return load_requirements(path).model_dump(mode="json", exclude_none=True)


def _tar(directory: Path, target: Path) -> None:
    with tarfile.open(target, "w") as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.add(path, arcname=str(path.relative_to(directory)), recursive=False)


def _print(args: argparse.Namespace, document: Any, pairs: Sequence[tuple[str, Any]]) -> None:
    if args.json:
        print(dumps(document))
        return
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{k:<{width}}  {v}")


def _table(headers: list[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    out = io.StringIO()
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    sys.stdout.write(out.getvalue())


def _aliases(aliases: dict[str, int]) -> str:
    return ", ".join(f"{name}->{number}" for name, number in aliases.items()) or "-"


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)
