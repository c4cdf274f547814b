"""`kapi view MODEL[:VERSION[:VARIANT]]` or `kapi view PATH`: the artifact opened in Netron,
served on a local port whose address is printed. From the repository, VERSION defaults to
the latest and VARIANT (RUNTIME/PRECISION/PROFILE) to the version's only or first one; the
artifact is downloaded (digest checked) into a temporary folder that is removed at exit."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument, NotFound


def add_commands(commands: Any) -> None:
    view = commands.add_parser("view", help="open a model in Netron, on a local port")
    view.add_argument("ref", help="a file, or MODEL[:VERSION[:RUNTIME/PRECISION/PROFILE]]")
    view.add_argument("--host", default="127.0.0.1")
    view.add_argument("--port", type=int, default=8081)
    view.add_argument("--repository", help="URL (default $KAPI_REPOSITORY_URL)")
    view.add_argument("--token", help="bearer token (default $KAPI_TOKEN, $KAPI_TOKEN_FILE)")
    view.add_argument("--no-wait", action="store_true", help="print the address and exit")
    view.set_defaults(handler=_view)


def _view(args: argparse.Namespace) -> None:
    import netron

    path = Path(args.ref)
    with tempfile.TemporaryDirectory(prefix="kapi-view-") as scratch:
        if not path.exists():
            path = pull(args.ref, Path(scratch), args.repository, args.token)
        elif path.is_dir():
            path = _model_in(path)
        host, port = netron.serve(str(path), address=(args.host, args.port), browse=False)
        print(f"Netron shows {path.name} at http://{host}:{port}", flush=True)
        if not args.no_wait:
            netron.wait()


def pull(ref: str, folder: Path, url: str | None, token: str | None) -> Path:
    """The artifact that MODEL[:VERSION[:VARIANT]] names, downloaded into `folder`."""
    from kapi.repository.client import RepositoryClient

    name, _, rest = ref.partition(":")
    version_text, _, variant_text = rest.partition(":")
    if version_text and not version_text.isdigit():
        raise InvalidArgument(f"{ref!r}: VERSION is a number (MODEL[:VERSION[:VARIANT]])")
    with RepositoryClient.from_env(url, token) as client:
        versions = client.versions(name)
        if not versions:
            raise NotFound(f"model '{name}' has no versions")
        number = int(version_text) if version_text else versions[-1].number
        version = client.version(name, number)
        variants = version.variants
        if variant_text:
            variants = [
                v for v in variants if f"{v.runtime}/{v.precision}/{v.profile}" == variant_text
            ]
        if not variants:
            keys = [f"{v.runtime}/{v.precision}/{v.profile}" for v in version.variants]
            raise NotFound(
                f"model '{name}' version {number} has no variant {variant_text!r}: {keys}"
            )
        chosen = variants[0]
        key = (chosen.runtime, chosen.precision, chosen.profile)
        return client.download(name, number, key, folder / chosen.filename, chosen.digest)


def _model_in(folder: Path) -> Path:
    for name in ("model.onnx", "model.xml", "model.plan"):
        if (folder / name).is_file():
            return folder / name
    raise InvalidArgument(f"{folder} holds no model.onnx, model.xml or model.plan")
