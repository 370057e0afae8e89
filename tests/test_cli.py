"""The operators' command line, run as a user types it, against a real `python main.py`.

One `python main.py` (in-memory broker, SQLite journal in a fresh directory)
serves the module, with its Order service a process of its own that takes
1.5 s a call, so that an async saga is still running when a watch starts.
Each test runs `python -m orchestrator ...` or the installed `orchestrator`
script in a subprocess with a timeout, after real bookings over gRPC.

The SagaAdmin service is not served on this branch: its commands are checked
for what can be seen without it (UNIMPLEMENTED is exit 1 with a clear line;
usage errors are exit 2 before any call), and, against a small stand-in
server in this module, for the requests and metadata they send.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import json_format

from orchestrator.proto import saga_pb2, saga_pb2_grpc
from pb import booking_pb2, booking_pb2_grpc
from tests.support.processes import ROOT, free_port, start_main, wait_for_serving

CLI_TIMEOUT = 30.0
"""Seconds any CLI run may take before the test fails."""
ORDER_LATENCY_MS = 1500
TOKEN = f"tok-{uuid.uuid4().hex}"
"""A bearer token no output may ever show."""
_CLI_ENV = ("ORCH_TARGET", "ORCH_ADMIN_TOKEN", "ORCH_OUTPUT", "ORCH_TIMEOUT", "NO_COLOR")


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without the CLI's variables (or a TLS one), plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _CLI_ENV and not key.startswith("ORCH_TLS")
    }
    env.update(extra)
    return env


def installed_script() -> Path:
    """The `orchestrator` console script of this virtualenv."""
    script = Path(sys.prefix) / "bin" / "orchestrator"
    if not os.access(script, os.X_OK):
        pytest.fail(f"{script} is missing: `pip install -e .` installs the console script")
    return script


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    script: bool = False,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m orchestrator ARGS` (or the installed script) with a timeout."""
    command = [str(installed_script())] if script else [sys.executable, "-m", "orchestrator"]
    argv = [*command, *args]
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=ROOT,
            env=dict(env) if env is not None else cli_env(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv} did not finish within {timeout}s; output: {exc.stdout!r}")


def described(result: subprocess.CompletedProcess[str]) -> str:
    """The run's command, exit status and output, for assertion messages."""
    return (
        f"{result.args}\nexit {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


@dataclass
class Service:
    """The running booking service and the sagas booked on it."""

    target: str
    completed: str
    compensated: str
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the CLI against this service (ORCH_TARGET), stdout not a terminal."""
        return run_cli(*args, env=self.env, script=script)

    def book(self, method: str, request_id: str, *, fault: bool = False) -> grpc.StatusCode:
        """Book over gRPC with `method` under `request_id`; the call's status."""
        with grpc.insecure_channel(self.target) as channel:
            stub = booking_pb2_grpc.BookingServiceStub(channel)
            call = getattr(stub, method)
            try:
                call(
                    booking_pb2.BookingRequest(ProductID=1, FaultInject=fault),
                    metadata=(("x-request-id", request_id),),
                    timeout=20,
                )
            except grpc.RpcError as exc:
                assert isinstance(exc, grpc.Call)
                return exc.code()
        return grpc.StatusCode.OK

    def wait_until_ended(self, request_id: str, *, within: float = 20.0) -> None:
        """Wait until the saga of `request_id` is in a final state (its rollback is async)."""
        deadline = time.monotonic() + within
        with grpc.insecure_channel(self.target) as channel:
            sagas = saga_pb2_grpc.SagaServiceStub(channel)
            while time.monotonic() < deadline:
                saga = sagas.GetSaga(saga_pb2.GetSagaRequest(request_id=request_id), timeout=5)
                if saga.state not in (saga_pb2.RUNNING, saga_pb2.COMPENSATING):
                    return
                time.sleep(0.05)
        pytest.fail(f"saga {request_id} did not end within {within}s")


def write_config(directory: Path, port: int, order: int, payment: int) -> Path:
    """app.yaml on `port` with external upstreams, a SQLite journal in `directory`, no metrics."""
    config = yaml.safe_load((ROOT / "app.yaml").read_text(encoding="utf-8"))
    config["grpc"].update(host="127.0.0.1", port=port, shutdown_grace_seconds=1)
    config["embedded_upstreams"] = {}
    config["upstreams"]["order"] = {"address": f"127.0.0.1:{order}"}
    config["upstreams"]["payment"] = {"address": f"127.0.0.1:{payment}"}
    config["store"] = {"url": f"sqlite+aiosqlite:///{directory / 'sagas.db'}"}
    config["metrics"] = {"enabled": False}
    path = directory / "app.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`python main.py` on free ports, with a completed and a compensated sync booking."""
    directory = tmp_path_factory.mktemp("cli")
    order_port, payment_port, port = free_port(), free_port(), free_port()
    order = start_main(
        "upstream", "order", "--port", str(order_port), "--latency-ms", str(ORDER_LATENCY_MS)
    )
    payment = start_main("upstream", "payment", "--port", str(payment_port))
    with order, payment:
        wait_for_serving(f"127.0.0.1:{order_port}", order)
        wait_for_serving(f"127.0.0.1:{payment_port}", payment)
        config = write_config(directory, port, order_port, payment_port)
        with start_main(config=config, cwd=directory) as main:
            target = f"127.0.0.1:{port}"
            wait_for_serving(target, main)
            suffix = uuid.uuid4().hex[:8]
            running = Service(
                target, f"cli-ok-{suffix}", f"cli-fault-{suffix}", cli_env(ORCH_TARGET=target)
            )
            assert running.book("HandleSyncBooking", running.completed) == grpc.StatusCode.OK
            status = running.book("HandleSyncBooking", running.compensated, fault=True)
            assert status == grpc.StatusCode.FAILED_PRECONDITION
            running.wait_until_ended(running.compensated)
            yield running


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    """The run's stdout as JSON, after checking that it exited 0."""
    assert result.returncode == 0, described(result)
    return json.loads(result.stdout)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The run's stderr, checked to be one line and nothing on stdout."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, described(result)
    assert result.stdout == "", described(result)
    return lines[0]


# Reading sagas


def test_sagas_list_shows_the_bookings_as_a_table(service: Service) -> None:
    result = service.cli("--output", "table", "sagas", "list")

    assert result.returncode == 0, described(result)
    header, *rows = result.stdout.splitlines()
    assert header.split()[:2] == ["REQUEST", "ID"]
    by_id = {row.split()[0]: row.split() for row in rows}
    assert by_id[service.completed][1:3] == ["SyncBooking", "COMPLETED"]
    assert by_id[service.compensated][1:3] == ["SyncBooking", "COMPENSATED"]
    assert "FAILED_PRECONDITION" in by_id[service.compensated]
    assert "\x1b[" not in result.stdout, "no colour codes when stdout is not a terminal"


def test_sagas_list_json_holds_the_bookings_with_snake_case_fields(service: Service) -> None:
    listing = json_of(service.cli("--output", "json", "sagas", "list"))

    states = {saga["request_id"]: saga["state"] for saga in listing["sagas"]}
    assert states[service.completed] == "COMPLETED"
    assert states[service.compensated] == "COMPENSATED"
    json_format.ParseDict(listing, saga_pb2.ListSagasResponse())


def test_output_is_json_by_default_when_stdout_is_not_a_terminal(service: Service) -> None:
    listing = json_of(service.cli("sagas", "list"))

    assert {service.completed, service.compensated} <= {s["request_id"] for s in listing["sagas"]}


def test_installed_script_lists_what_python_m_lists(service: Service) -> None:
    by_script = json_of(service.cli("sagas", "list", script=True))
    by_module = json_of(service.cli("sagas", "list"))

    assert by_script == by_module


def test_sagas_list_filters_by_state(service: Service) -> None:
    listing = json_of(service.cli("sagas", "list", "--state", "compensated"))

    ids = {saga["request_id"] for saga in listing["sagas"]}
    assert service.compensated in ids
    assert service.completed not in ids
    assert {saga["state"] for saga in listing["sagas"]} == {"COMPENSATED"}


def test_sagas_list_stops_at_the_limit(service: Service) -> None:
    listing = json_of(service.cli("sagas", "list", "--limit", "1"))

    assert len(listing["sagas"]) == 1
    assert listing["next_page_token"]


def test_sagas_show_prints_the_steps_timeline(service: Service) -> None:
    result = service.cli("-o", "table", "sagas", "show", service.compensated)

    assert result.returncode == 0, described(result)
    lines = result.stdout.splitlines()
    assert any(line.split() == ["State", "COMPENSATED"] for line in lines), result.stdout
    steps = {line.split()[1]: line.split() for line in lines if line[:1].isdigit()}
    assert steps["create_order"][2:4] == ["DONE", "1"]
    assert steps["create_order"][-1] == "DONE", "its compensation"
    assert steps["create_payment"][2] == "FAILED"
    assert "payment declined" in result.stdout
    assert "No operator actions." in result.stdout


def test_sagas_show_json_parses_as_a_saga_message(service: Service) -> None:
    shown = json_of(service.cli("-o", "json", "sagas", "show", service.completed))

    saga = json_format.ParseDict(shown, saga_pb2.Saga())
    assert saga.state == saga_pb2.COMPLETED
    assert [step.name for step in saga.steps] == ["create_order", "create_payment"]
    assert shown["actions"] == []


def test_sagas_show_of_an_unknown_saga_exits_3_naming_not_found(service: Service) -> None:
    result = service.cli("sagas", "show", f"no-such-{uuid.uuid4()}")

    assert result.returncode == 3, described(result)
    assert one_error_line(result).startswith("error: NOT_FOUND: ")


def test_a_request_id_of_two_facades_needs_facade_and_exits_4_without(service: Service) -> None:
    shared = f"cli-shared-{uuid.uuid4().hex[:8]}"
    assert service.book("HandleSyncBooking", shared) == grpc.StatusCode.OK
    assert service.book("HandleAsyncBooking", shared) == grpc.StatusCode.OK

    ambiguous = service.cli("sagas", "show", shared)
    chosen = json_of(service.cli("sagas", "show", shared, "--facade", "SyncBooking"))

    assert ambiguous.returncode == 4, described(ambiguous)
    assert one_error_line(ambiguous).startswith("error: FAILED_PRECONDITION: ")
    assert (chosen["facade"], chosen["state"]) == ("SyncBooking", "COMPLETED")


def test_an_invalid_request_id_exits_4_naming_invalid_argument(service: Service) -> None:
    result = service.cli("sagas", "show", "x" * 129)

    assert result.returncode == 4, described(result)
    assert one_error_line(result).startswith("error: INVALID_ARGUMENT: ")


def test_sagas_watch_follows_an_async_saga_until_it_completes(service: Service) -> None:
    request_id = f"cli-watch-{uuid.uuid4().hex[:8]}"
    assert service.book("HandleAsyncBooking", request_id) == grpc.StatusCode.OK

    result = service.cli("-o", "table", "sagas", "watch", request_id)

    assert result.returncode == 0, described(result)
    lines = result.stdout.splitlines()
    assert len(lines) >= 2, described(result)
    assert lines[0].split()[2] == "RUNNING", "the saga was running when the watch began"
    assert lines[-1].split()[2] == "COMPLETED"
    assert "create_payment DONE" in lines[-1]


def test_sagas_watch_json_prints_one_saga_a_line(service: Service) -> None:
    request_id = f"cli-watch-json-{uuid.uuid4().hex[:8]}"
    assert service.book("HandleAsyncBooking", request_id) == grpc.StatusCode.OK

    result = service.cli("-o", "json", "sagas", "watch", request_id)

    assert result.returncode == 0, described(result)
    sagas = [json.loads(line) for line in result.stdout.splitlines()]
    assert {saga["request_id"] for saga in sagas} == {request_id}
    assert sagas[-1]["state"] == "COMPLETED"


# Reaching the server


def test_an_unreachable_target_exits_6_within_the_timeout() -> None:
    started = time.monotonic()
    result = run_cli("--target", f"127.0.0.1:{free_port()}", "--timeout", "2", "sagas", "list")

    assert result.returncode == 6, described(result)
    assert one_error_line(result).startswith("error: UNAVAILABLE: cannot reach 127.0.0.1:")
    assert time.monotonic() - started < 2 + 5


def test_a_target_that_never_answers_exits_6_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = run_cli("--target", target, "--timeout", "1.5", "sagas", "watch", "any")
        took = time.monotonic() - started

    assert result.returncode == 6, described(result)
    assert one_error_line(result).split()[1] in {"DEADLINE_EXCEEDED:", "UNAVAILABLE:"}
    assert took < 1.5 + 5


# The admin commands without SagaAdmin on this branch


@pytest.mark.parametrize(
    "args",
    [
        ("sagas", "retry", "some-id", "--note", "fixed the payment service"),
        ("sagas", "compensate", "some-id", "--reason", "customer cancelled"),
        ("sagas", "resolve", "some-id", "--note", "refunded by hand"),
        ("dlq", "list"),
        ("dlq", "replay", "dl-1"),
        ("dlq", "discard", "dl-1", "--note", "duplicate"),
    ],
    ids=lambda args: "-".join(args[:2]),
)
def test_admin_commands_against_a_server_without_saga_admin_exit_1_naming_unimplemented(
    service: Service, args: tuple[str, ...]
) -> None:
    result = service.cli(*args)

    assert result.returncode == 1, described(result)
    line = one_error_line(result)
    assert line.startswith("error: UNIMPLEMENTED: ")
    assert "orchestrator.v1.SagaAdmin/" in line


@pytest.mark.parametrize(
    "args",
    [
        ("sagas", "retry", "some-id"),
        ("sagas", "compensate", "some-id"),
        ("sagas", "resolve", "some-id"),
        ("sagas", "resolve", "some-id", "--note", "  "),
        ("dlq", "discard", "dl-1"),
        ("dlq", "list", "--state", "lost"),
        ("sagas", "list", "--limit", "0"),
    ],
    ids=lambda args: "-".join(arg.strip() or "blank" for arg in args),
)
def test_usage_errors_exit_2_before_any_call(args: tuple[str, ...]) -> None:
    # Any call to this target would fail UNAVAILABLE (exit 6): exit 2 means none was made.
    result = run_cli("--target", f"127.0.0.1:{free_port()}", *args)

    assert result.returncode == 2, described(result)
    assert "UNAVAILABLE" not in result.stderr
    assert result.stdout == ""


def test_a_client_certificate_without_its_key_is_a_usage_error(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not used")

    result = run_cli("--tls-cert", str(cert), "sagas", "list")

    assert result.returncode == 2, described(result)
    assert "--tls-key" in result.stderr


# Help


@pytest.mark.parametrize(
    "command",
    [
        (),
        ("sagas",),
        ("dlq",),
        *[("sagas", name) for name in ("list", "show", "watch", "retry", "compensate", "resolve")],
        *[("dlq", name) for name in ("list", "replay", "discard")],
    ],
    ids=lambda command: "-".join(command) or "root",
)
def test_every_command_has_help_with_the_exit_codes(command: tuple[str, ...]) -> None:
    result = run_cli(*command, "--help")

    assert result.returncode == 0, described(result)
    assert "Usage: orchestrator" in result.stdout
    assert "Exit codes: 0 ok; 2 usage error" in " ".join(result.stdout.split())


# The token


class _StandIn(saga_pb2_grpc.SagaServiceServicer, saga_pb2_grpc.SagaAdminServicer):
    """Records what each call carried; aborts with `refuse` when it is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        self.refuse: grpc.StatusCode | None = None

    def _record(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        self.calls.append((method, request, dict(context.invocation_metadata())))
        if self.refuse is not None:
            context.abort(self.refuse, f"refused by the stand-in ({method})")

    def GetSaga(self, request: Any, context: grpc.ServicerContext) -> saga_pb2.Saga:
        self._record("GetSaga", request, context)
        return saga_pb2.Saga(request_id=request.request_id, state=saga_pb2.COMPLETED)

    def RetrySaga(self, request: Any, context: grpc.ServicerContext) -> saga_pb2.Saga:
        self._record("RetrySaga", request, context)
        return saga_pb2.Saga(request_id=request.request_id, facade=request.facade)

    def DiscardDeadLetter(self, request: Any, context: grpc.ServicerContext) -> saga_pb2.DeadLetter:
        self._record("DiscardDeadLetter", request, context)
        return saga_pb2.DeadLetter(
            id=request.id, state=saga_pb2.DEAD_LETTER_DISCARDED, note=request.note
        )


@pytest.fixture
def stand_in() -> Iterator[tuple[str, _StandIn]]:
    """A plain gRPC server with SagaService and SagaAdmin stand-ins, on a free port."""
    servicer = _StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    saga_pb2_grpc.add_SagaServiceServicer_to_server(servicer, server)
    saga_pb2_grpc.add_SagaAdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_the_token_goes_as_bearer_authorization_metadata(stand_in: tuple[str, _StandIn]) -> None:
    target, servicer = stand_in

    result = run_cli(
        "--target", target, "sagas", "show", "some-id", env=cli_env(ORCH_ADMIN_TOKEN=TOKEN)
    )

    assert result.returncode == 0, described(result)
    assert servicer.calls[0][2]["authorization"] == f"Bearer {TOKEN}"


def test_an_unauthenticated_call_exits_5(stand_in: tuple[str, _StandIn]) -> None:
    target, servicer = stand_in
    servicer.refuse = grpc.StatusCode.UNAUTHENTICATED

    result = run_cli("--target", target, "--token", TOKEN, "sagas", "show", "some-id")

    assert result.returncode == 5, described(result)
    assert one_error_line(result).startswith("error: UNAUTHENTICATED: ")


def test_admin_commands_send_the_operator_note_and_facade(stand_in: tuple[str, _StandIn]) -> None:
    target, servicer = stand_in

    retried = run_cli(
        "--target", target, "sagas", "retry", "r-1", "--note", "payments back", "-f", "SyncBooking"
    )
    discarded = run_cli("--target", target, "dlq", "discard", "dl-9", "--note", "duplicate")

    assert retried.returncode == 0 and discarded.returncode == 0, described(retried)
    (_, retry, _), (_, discard, _) = servicer.calls
    assert (retry.request_id, retry.facade, retry.note) == ("r-1", "SyncBooking", "payments back")
    assert (discard.id, discard.note) == ("dl-9", "duplicate")
    assert json.loads(discarded.stdout)["state"] == "DEAD_LETTER_DISCARDED"


def test_the_token_never_appears_in_any_output(
    service: Service, stand_in: tuple[str, _StandIn]
) -> None:
    target, servicer = stand_in
    servicer.refuse = grpc.StatusCode.PERMISSION_DENIED
    with_token = cli_env(ORCH_TARGET=service.target, ORCH_ADMIN_TOKEN=TOKEN)
    runs = [
        run_cli("-o", "table", "sagas", "list", env=with_token),
        run_cli("-o", "json", "sagas", "show", service.compensated, env=with_token),
        run_cli("sagas", "show", "no-such-saga", env=with_token),
        run_cli("sagas", "resolve", "x", "--note", "n", env=with_token),
        run_cli("sagas", "resolve", "x", env=with_token),
        run_cli("--help", env=with_token),
        run_cli("--token", TOKEN, "--target", target, "sagas", "retry", "x", "--note", "n"),
        run_cli("--token", TOKEN, "--target", f"127.0.0.1:{free_port()}", "sagas", "list"),
    ]

    exits = [run.returncode for run in runs]
    assert exits == [0, 0, 3, 1, 2, 0, 5, 6], [described(run) for run in runs]
    for run in runs:
        assert TOKEN not in run.stdout + run.stderr, described(run)
