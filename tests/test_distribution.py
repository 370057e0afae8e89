"""The distribution: `python -m build` makes an sdist and a wheel of `saga-orchestrator`,
and the wheel, installed into a fresh virtualenv outside the repository, runs a facade of
a script's own: a saga and its compensation, on the in-memory broker and a SQLite store.

The build runs on a copy of what the build reads (it writes into its source tree). The
fresh virtualenv gets the wheel's dependencies from wheels re-packed from this
environment (`tests/support/wheelhouse.py`), so it installs offline and in seconds.
"""

from __future__ import annotations

import email.message
import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support.wheelhouse import wheelhouse

ROOT = Path(__file__).resolve().parent.parent
NAME = "saga_orchestrator"
PROTOS = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "orchestrator/proto").glob("*.proto")
)

SCRIPT = '''\
"""A trip booked, and one declined: its booking undone by its compensation."""

import asyncio

from orchestrator import AsyncFacade, AsyncFacadeContext, FailedPrecondition, Orchestrator
from orchestrator.broker import InMemoryBroker
from orchestrator.config import BrokerSettings
from orchestrator.store import store_from_url


class Trip(AsyncFacadeContext):
    declined: bool = False


async def book(trip: Trip) -> Trip:
    print("booked", trip.request_id)
    return trip


async def unbook(trip: Trip) -> None:
    print("unbooked", trip.request_id)


async def pay(trip: Trip) -> Trip:
    if trip.declined:
        raise FailedPrecondition("payment declined")
    print("paid", trip.request_id)
    return trip


async def main() -> None:
    broker = InMemoryBroker(BrokerSettings(url="memory://"))
    orchestrator = Orchestrator(broker, store=store_from_url("sqlite:///trips.db"))
    flow = AsyncFacade(dto=Trip).use("trip.book", book, compensate=unbook).use("trip.pay", pay)
    orchestrator.register_async_facade("Trip", flow.consume_rollback("trip.undo"))
    await orchestrator.start()
    try:
        for request_id, declined in (("t1", False), ("t2", True)):
            await flow.run(request_id, Trip(request_id=request_id, declined=declined))
            async with asyncio.timeout(10):
                print(request_id, (await flow.wait_for(request_id)).state)
    finally:
        await orchestrator.close()


asyncio.run(main())
'''


def run(*command: str | Path, cwd: Path, timeout: float) -> str:
    """Run `command` without the repository on its path; its output, or a failure showing it."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "PIP_"))
    }
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder with the sdist and the wheel `python -m build` made."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "orchestrator", source / "orchestrator", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    # The build backend comes from this environment (`build` and setuptools are dev tools).
    run(
        sys.executable,
        "-m",
        "build",
        "--no-isolation",
        "--outdir",
        out,
        source,
        cwd=source,
        timeout=180,
    )
    return out


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}: {found}"
    return found[0]


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(
            f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/METADATA"
        )
    return email.parser.Parser().parsestr(text.decode())


def test_build_makes_an_sdist_and_a_wheel_of_saga_orchestrator(dist: Path) -> None:
    assert only(dist, "*.whl").name == f"{NAME}-0.1.0-py3-none-any.whl"
    assert only(dist, "*.tar.gz").name == f"{NAME}-0.1.0.tar.gz"


def test_the_wheel_holds_the_framework_alone_with_its_protos_typing_marker_and_licence(
    dist: Path,
) -> None:
    with zipfile.ZipFile(only(dist, "*.whl")) as archive:
        names = set(archive.namelist())

    assert set(PROTOS) <= names
    assert {
        "orchestrator/py.typed",
        "orchestrator/proto/saga_pb2.py",
        "orchestrator/store/sql/_migrations/script.py.mako",
        f"{NAME}-0.1.0.dist-info/licenses/LICENSE",
    } <= names
    assert {name.split("/")[0] for name in names} == {"orchestrator", f"{NAME}-0.1.0.dist-info"}


def test_the_sdist_holds_the_protos_and_the_licence(dist: Path) -> None:
    with tarfile.open(only(dist, "*.tar.gz")) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}

    assert {*PROTOS, "LICENSE", "README.md", "pyproject.toml"} <= names


def test_the_wheel_names_its_licence_python_versions_urls_and_extras(dist: Path) -> None:
    meta = metadata(only(dist, "*.whl"))
    requires = meta.get_all("Requires-Dist") or []

    assert meta["Name"] == "saga-orchestrator"
    assert meta["License-Expression"] == "Apache-2.0"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"Programming Language :: Python :: {python}" in meta.get_all("Classifier", [])
    assert meta.get_all("Project-URL")
    assert {"postgres", "tracing", "console"} <= set(meta.get_all("Provides-Extra", []))
    # The PostgreSQL driver and OpenTelemetry only with their extras.
    optional = [r for r in requires if r.startswith(("asyncpg", "opentelemetry"))]
    assert optional
    assert all("extra ==" in r for r in optional)


def test_a_fresh_virtualenv_runs_a_saga_and_its_compensation_from_the_wheel_alone(
    dist: Path, tmp_path: Path
) -> None:
    wheel = only(dist, "*.whl")
    base = [r for r in metadata(wheel).get_all("Requires-Dist") or [] if "extra ==" not in r]
    wheels = tmp_path / "wheels"
    wheelhouse(base, wheels)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, timeout=60)
    python = venv / "bin" / "python"
    # This environment's pip, installing into the new one: no index, its own wheels only.
    install = ["-m", "pip", "--python", python, "install", "--no-index", "--no-compile"]
    run(sys.executable, *install, "--find-links", wheels, wheel, cwd=tmp_path, timeout=120)
    work = tmp_path / "work"
    work.mkdir()
    (work / "trip.py").write_text(SCRIPT)

    out = run(python, "trip.py", cwd=work, timeout=60)

    assert out.splitlines() == [
        "booked t1",
        "paid t1",
        "t1 COMPLETED",
        "booked t2",
        "unbooked t2",
        "t2 COMPENSATED",
    ]
    installed = run(
        python, "-c", "import orchestrator; print(orchestrator.__file__)", cwd=work, timeout=30
    )
    assert Path(installed.strip()).is_relative_to(venv)
    assert (work / "trips.db").exists()  # the sagas were kept in SQLite, from the base install
