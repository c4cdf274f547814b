"""Generate kapi's Python protocol code from protos/ into services/kapi/core/_generated/.

    python protos/generate.py           write the generated code
    python protos/generate.py --check   exit 1 if the committed code differs from a fresh run

protoc's Python output registers every file in the process-wide default descriptor pool and
imports siblings by their proto path. Two rewrites make it fit a package that lives beside
tritonclient (which registers the same `inference.*` names under other file names): imports
become package-absolute, and the files register in kapi's own descriptor pool.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "services" / "kapi" / "core" / "_generated"
PACKAGE = "kapi.core._generated"
BIN = Path(sys.executable).parent
POOL_MODULE = '''"""kapi's descriptor pool: generated code registers here, not in the default."""

from google.protobuf.descriptor_pool import DescriptorPool

POOL = DescriptorPool()
'''


def _proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def _rewrite(text: str) -> str:
    text = re.sub(r"^from (inference|kapi) import", rf"from {PACKAGE}.\1 import", text, flags=re.M)
    text = re.sub(r"^import (inference|kapi)\.", rf"import {PACKAGE}.\1.", text, flags=re.M)
    text = text.replace(
        "_descriptor_pool.Default()", f"__import__('{PACKAGE}._pool', fromlist=['POOL']).POOL"
    )
    return text


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *_proto_files(),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / "__init__.py").write_text('"""Generated protocol code: `make proto`."""\n')
    (out / "_pool.py").write_text(POOL_MODULE)
    for path in out.rglob("*.py*"):
        if path.is_dir():
            continue
        path.write_text(_rewrite(path.read_text()))
    for folder in {p.parent for p in out.rglob("*_pb2.py")}:
        (folder / "__init__.py").touch()


def _same_tree(left: Path, right: Path) -> bool:
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    return all(_same_tree(left / sub, right / sub) for sub in cmp.common_dirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    if parser.parse_args().check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            if not TARGET.exists() or not _same_tree(Path(tmp), TARGET):
                print("generated protocol code is stale: run `make proto`", file=sys.stderr)
                return 1
        print("generated protocol code is current")
        return 0
    shutil.rmtree(TARGET, ignore_errors=True)
    generate(TARGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
