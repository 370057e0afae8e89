"""The checked-in protobuf code is what `make proto` (tools/genproto.py) generates today."""

from __future__ import annotations

import difflib
import os

import pytest

from tools.genproto import PROTO_DIRS, ROOT, generate, proto_files

REGENERATE = "the checked-in generated code is stale: run `make proto` and commit the result"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every file genproto writes into a fresh directory, by path relative to it."""
    out = tmp_path_factory.mktemp("genproto")
    with pytest.MonkeyPatch.context() as patch:
        # generate() prepends the venv's bin to PATH; keep that out of the other tests.
        patch.setenv("PATH", os.environ.get("PATH", ""))
        generate(out)
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


def _diff(relative: str, expected: bytes) -> str:
    """The start of a unified diff from the checked-in `relative` to the generated one."""
    actual = (ROOT / relative).read_text(encoding="utf-8", errors="replace").splitlines()
    fresh = expected.decode("utf-8", errors="replace").splitlines()
    lines = difflib.unified_diff(
        actual, fresh, f"checked-in {relative}", f"generated {relative}", lineterm="", n=1
    )
    return "\n".join(list(lines)[:20])


def test_genproto_generates_code_for_every_proto(generated: dict[str, bytes]) -> None:
    protos = proto_files()
    assert protos, f"no .proto under {PROTO_DIRS}"
    expected = {
        proto.removesuffix(".proto") + suffix for proto in protos for suffix in GENERATED_SUFFIXES
    }
    assert expected <= set(generated), sorted(expected - set(generated))


def test_every_generated_file_is_checked_in_byte_identical(generated: dict[str, bytes]) -> None:
    missing = [relative for relative in generated if not (ROOT / relative).is_file()]
    stale = [
        relative
        for relative, content in generated.items()
        if relative not in missing and (ROOT / relative).read_bytes() != content
    ]
    details = "\n".join(_diff(relative, generated[relative]) for relative in stale)
    assert not missing and not stale, (
        f"{REGENERATE}\nmissing: {missing}\ndiffering: {stale}\n{details}"
    )


def test_no_checked_in_generated_file_lacks_its_proto(generated: dict[str, bytes]) -> None:
    checked_in = {
        path.relative_to(ROOT).as_posix()
        for folder in PROTO_DIRS
        for suffix in GENERATED_SUFFIXES
        for path in (ROOT / folder).glob(f"*{suffix}")
    }
    orphans = sorted(checked_in - set(generated))
    assert not orphans, f"{REGENERATE} (and delete the code of removed protos): {orphans}"
