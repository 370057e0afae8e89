"""Generate the Python code of every .proto under pb/ (and the framework's own).

Usage: python tools/genproto.py [OUT_DIR]

OUT_DIR defaults to the repository root, so the generated modules land beside
their .proto files; the staleness test generates into a temporary directory and
compares.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIRS = ("pb", "orchestrator/proto")


def proto_files() -> list[str]:
    """Every .proto file the project generates code for, relative to the root."""
    found: list[str] = []
    for folder in PROTO_DIRS:
        found.extend(str(p.relative_to(ROOT)) for p in sorted((ROOT / folder).glob("*.proto")))
    return found


def generate(out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2_grpc.py and their .pyi stubs for every proto into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    saved_path = os.environ.get("PATH", "")
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{saved_path}"
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *proto_files(),
    ]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if shutil.which("protoc-gen-mypy") is None:
            raise SystemExit("protoc-gen-mypy not found: pip install mypy-protobuf")
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    finally:
        os.chdir(cwd)
        os.environ["PATH"] = saved_path


if __name__ == "__main__":
    generate(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
