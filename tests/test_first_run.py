"""A first run that cannot start says why in one line, naming the setting and its value.

`python main.py` in a subprocess, with the root app.yaml's embedded default on
free ports, and one thing wrong: a port something else listens on, a store
that cannot be reached, a URL with a port that is no number. Each ends with
exit status 2 and one line naming the setting (passwords masked), and no
traceback; a bad URL ends before anything is started.

`make run` installs what running needs and `make test` the dev tools on top:
checked on the Makefile's recipes (`make -n`), without installing anything.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import ROOT, free_port, main_env

EXIT_TIMEOUT = 30


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """The root app.yaml, every port free (embedded upstreams on any), sagas in process
    memory, with `sections` merged over it."""
    config = yaml.safe_load((ROOT / "app.yaml").read_text(encoding="utf-8"))
    config["grpc"]["port"] = free_port()
    config["metrics"]["port"] = free_port()
    config["embedded_upstreams"] = {
        "order": {"port": 0, "db_path": ":memory:"},
        "payment": {"port": 0, "db_path": ":memory:"},
    }
    config["store"] = {"url": "memory://"}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_main(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python main.py` with `config`, expected to give up at once."""
    try:
        return subprocess.run(
            [sys.executable, "main.py"],
            cwd=ROOT,
            env=main_env(config, **env),
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"main.py kept running with {config.read_text()}\n{exc.stderr!r}")


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port another socket listens on, on every address, for the duration."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def says_one_thing(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one line of stderr that has every one of `words`, after checking the exit status
    and that no traceback was printed."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if all(w in line for w in words)]
    assert len(lines) == 1, output
    return lines[0]


def test_a_grpc_port_in_use_exits_2_naming_grpc_port_and_the_address(tmp_path: Path) -> None:
    with taken_port() as port:
        result = run_main(write_config(tmp_path / "app.yaml", grpc={"port": port}))

    line = says_one_thing(result, "grpc.port", f":{port}")
    assert "in use" in line


def test_a_metrics_port_in_use_exits_2_naming_metrics_port(tmp_path: Path) -> None:
    with taken_port() as port:
        result = run_main(write_config(tmp_path / "app.yaml", metrics={"port": port}))

    line = says_one_thing(result, "metrics.port", f":{port}")
    assert "in use" in line


def test_an_embedded_upstream_port_in_use_exits_2_naming_its_setting(tmp_path: Path) -> None:
    with taken_port() as port:
        config = write_config(tmp_path / "app.yaml")
        settings = yaml.safe_load(config.read_text())
        settings["embedded_upstreams"]["payment"]["port"] = port
        config.write_text(yaml.safe_dump(settings))
        result = run_main(config)

    says_one_thing(result, "embedded_upstreams.payment.port", f":{port}")


def test_an_unreachable_postgresql_store_exits_2_naming_store_url_without_its_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql+asyncpg://orchestrator:s3cret@127.0.0.1:{free_port()}/sagas"
    result = run_main(write_config(tmp_path / "app.yaml", store={"url": url}))

    line = says_one_thing(result, "store.url", "orchestrator:***@127.0.0.1")
    assert "s3cret" not in result.stdout + result.stderr
    assert "refused" in line.lower() or "connect" in line.lower()


def test_a_sqlite_store_in_a_missing_folder_exits_2_naming_store_url(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/no/such/folder/sagas.db"
    result = run_main(write_config(tmp_path / "app.yaml", store={"url": url}))

    says_one_thing(result, "store.url", "no/such/folder/sagas.db")


def test_a_broker_url_with_a_port_that_is_no_number_exits_2_naming_broker_url(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "app.yaml")
    result = run_main(config, ORCH_BROKER_URL="amqp://guest:s3cret@127.0.0.1:56x2/")

    line = says_one_thing(result, "broker.url", "'56x2'")
    assert "amqp://guest:***@127.0.0.1:56x2/" in line
    assert "s3cret" not in result.stdout + result.stderr
    assert "starting" not in result.stderr  # refused before anything was started


def test_a_store_url_with_a_port_that_is_no_number_exits_2_naming_store_url(
    tmp_path: Path,
) -> None:
    url = "postgresql+asyncpg://orchestrator:s3cret@db:port/sagas"
    result = run_main(write_config(tmp_path / "app.yaml", store={"url": url}))

    line = says_one_thing(result, "store.url", "'port'")
    assert "s3cret" not in result.stdout + result.stderr
    assert "orchestrator:***@db:port" in line


def test_a_store_url_of_an_unknown_database_exits_2_naming_store_url(tmp_path: Path) -> None:
    url = "mysql://orchestrator@db/sagas"
    result = run_main(write_config(tmp_path / "app.yaml", store={"url": url}))

    says_one_thing(result, "store.url", "'mysql'")


# --- the Makefile -------------------------------------------------------------------------------


def recipe(*targets: str) -> str:
    """What `make` would run for `targets` in a checkout with no virtualenv yet."""
    # Under `make test` the outer make's MAKELEVEL and MAKEFLAGS would make this one print
    # "Entering directory" lines around the recipe: it runs as a make of its own.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    done = subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", "VENV=/nonexistent/venv", *targets],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_make_run_installs_the_package_with_the_extras_running_needs_and_shows_progress() -> None:
    commands = recipe("run")

    installs = [line for line in commands.splitlines() if "pip install" in line]
    assert any("-e '.[console]'" in line for line in installs), commands
    assert not any("dev" in line for line in installs), commands
    assert "--quiet" not in commands and " -q " not in commands
    assert commands.rstrip().endswith("main.py")


def test_make_test_adds_the_dev_tools_and_the_bench_extra() -> None:
    commands = recipe("test")

    assert "-e '.[dev,bench]'" in commands
    assert "pytest" in commands
