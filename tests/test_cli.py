"""The operators' command line, run as a user types it, against a real `python main.py`.

One `python main.py` serves the module: a SQLite journal in a fresh directory,
the shared RabbitMQ under a topic prefix of this run's own (its queues and
exchanges are deleted afterwards), dead letters collected every 0.2 s, and
its Order service a process of its own that takes 1.5 s a call, so that an
async saga is still running when a watch or a `compensate` starts. Each test
runs `python -m orchestrator ...` or the installed `orchestrator` script in a
subprocess with a timeout, after real bookings over gRPC, and judges what it
prints (tables and JSON), its exit status, and what the journal and the
Order service's ledger say afterwards.

Access is enforced as in production: `access.tokens` holds an operate token
(`oncall`) and a read token (`dashboard`), random each run, and
`open_status` stays false. So the reading tests run as a user with the read
token in `ORCH_ADMIN_TOKEN` (every call of theirs proves the bearer metadata
is sent and accepted, and that read is enough to read), the acting tests with
the operate token, and the refusals (no token, a wrong one, a read token on
an operate method) are the server's real answers. `open_status: true` would
have left the reading commands untested with a token, which is how an
operator runs them.

A poison message (malformed JSON) is published to the create_order topic
with aio-pika as any other client of the broker could; the service
dead-letters it and takes it into its store, where `dlq` finds it.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import secrets
import select
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import pytest
import yaml
from google.protobuf import json_format

from orchestrator.config import BrokerSettings
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from pb import booking_pb2, booking_pb2_grpc, order_pb2, order_pb2_grpc
from tests.support.app_fixtures import BOOKING_TOPICS
from tests.support.broker_fixtures import delete_topology, make_settings
from tests.support.processes import ROOT, free_port, start_main, wait_for_serving
from topic import CREATE_ORDER

pytestmark = pytest.mark.broker

CLI_TIMEOUT = 30.0
"""Seconds any CLI run may take before the test fails."""
ORDER_LATENCY_MS = 1500
OPERATE_TOKEN = f"operate-{secrets.token_hex(16)}"
"""The `oncall` operator's bearer token: no output may ever show it."""
READ_TOKEN = f"read-{secrets.token_hex(16)}"
"""The `dashboard`'s read-only bearer token: no output may ever show it."""
OPERATOR, READER = "oncall", "dashboard"
ASYNC_FACADE = "AsyncBooking"
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
    """The running booking service, its broker, and the sagas booked on it."""

    target: str
    order_target: str
    broker: BrokerSettings
    completed: str
    compensated: str
    env: dict[str, str] = field(default_factory=dict)
    """The CLI's environment as a reader has it: ORCH_TARGET and the read token."""
    operator_env: dict[str, str] = field(default_factory=dict)
    """The CLI's environment as an operator has it: ORCH_TARGET and the operate token."""

    def cli(self, *args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the CLI as the reader (ORCH_TARGET, ORCH_ADMIN_TOKEN), stdout not a terminal."""
        return run_cli(*args, env=self.env, script=script)

    def operate(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the CLI as the operator (ORCH_TARGET, ORCH_ADMIN_TOKEN), stdout not a terminal."""
        return run_cli(*args, env=self.operator_env)

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

    def saga(self, request_id: str, facade: str = "") -> saga_pb2.Saga:
        """The saga of `request_id`, read over gRPC with the read token."""
        with grpc.insecure_channel(self.target) as channel:
            sagas = saga_pb2_grpc.SagaServiceStub(channel)
            request = saga_pb2.GetSagaRequest(request_id=request_id, facade=facade)
            return sagas.GetSaga(request, metadata=_bearer(READ_TOKEN), timeout=5)

    def wait_until_ended(self, request_id: str, *, within: float = 20.0) -> None:
        """Wait until the saga of `request_id` is in a final state (its rollback is async)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.saga(request_id).state not in (saga_pb2.RUNNING, saga_pb2.COMPENSATING):
                return
            time.sleep(0.05)
        pytest.fail(f"saga {request_id} did not end within {within}s")

    def order_of(self, request_id: str) -> order_pb2.Order | None:
        """The Order service's latest order of `request_id`, or None (a 1.5 s call)."""
        with grpc.insecure_channel(self.order_target) as channel:
            orders = order_pb2_grpc.OrderServiceStub(channel)
            try:
                return orders.GetOrder(order_pb2.GetOrderRequest(RequestID=request_id), timeout=10)
            except grpc.RpcError as exc:
                assert isinstance(exc, grpc.Call)
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise

    def dead_letters(self, state: int = saga_pb2.DEAD_LETTER_WAITING) -> list[saga_pb2.DeadLetter]:
        """The dead letters in `state`, listed over gRPC with the read token."""
        with grpc.insecure_channel(self.target) as channel:
            admin = saga_pb2_grpc.SagaAdminStub(channel)
            request = saga_pb2.ListDeadLettersRequest(state=state, page_size=500)
            listed = admin.ListDeadLetters(request, metadata=_bearer(READ_TOKEN), timeout=5)
        return list(listed.dead_letters)

    def discard(self, letter_id: str, note: str) -> None:
        """Discard a dead letter over gRPC with the operate token."""
        with grpc.insecure_channel(self.target) as channel:
            admin = saga_pb2_grpc.SagaAdminStub(channel)
            request = saga_pb2.DiscardDeadLetterRequest(id=letter_id, note=note)
            admin.DiscardDeadLetter(request, metadata=_bearer(OPERATE_TOKEN), timeout=5)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def write_config(
    directory: Path, port: int, order: int, payment: int, broker: BrokerSettings
) -> Path:
    """app.yaml on `port` with external upstreams, a SQLite journal in `directory`, no metrics
    and no console,
    `broker` (RabbitMQ under a prefix of its own), dead letters collected every 0.2 s, and
    access by an operate token and a read token."""
    config = yaml.safe_load((ROOT / "app.yaml").read_text(encoding="utf-8"))
    config["grpc"].update(host="127.0.0.1", port=port, shutdown_grace_seconds=1)
    config["broker"].update(
        url=broker.url.get_secret_value(),
        topic_prefix=broker.topic_prefix,
        connect_timeout_seconds=broker.connect_timeout_seconds,
        reconnect_interval_seconds=broker.reconnect_interval_seconds,
        redelivery_delay_seconds=broker.redelivery_delay_seconds,
    )
    config["embedded_upstreams"] = {}
    config["upstreams"]["order"] = {"address": f"127.0.0.1:{order}"}
    config["upstreams"]["payment"] = {"address": f"127.0.0.1:{payment}"}
    config["store"] = {"url": f"sqlite+aiosqlite:///{directory / 'sagas.db'}"}
    config["metrics"] = {"enabled": False}
    config["ui"] = {"enabled": False}
    config["dead_letters"] = {"interval_seconds": 0.2}
    config["access"] = {
        "tokens": [
            {"name": OPERATOR, "role": "operate", "token": OPERATE_TOKEN},
            {"name": READER, "role": "read", "token": READ_TOKEN},
        ],
        "open_status": False,
    }
    path = directory / "app.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str) -> Iterator[Service]:
    """`python main.py` on free ports and RabbitMQ, with a completed and a compensated sync
    booking; its queues and exchanges are deleted once it has stopped."""
    directory = tmp_path_factory.mktemp("cli")
    broker = make_settings(rabbitmq_url)
    order_port, payment_port, port = free_port(), free_port(), free_port()
    order = start_main(
        "upstream", "order", "--port", str(order_port), "--latency-ms", str(ORDER_LATENCY_MS)
    )
    payment = start_main("upstream", "payment", "--port", str(payment_port))
    try:
        with order, payment:
            wait_for_serving(f"127.0.0.1:{order_port}", order)
            wait_for_serving(f"127.0.0.1:{payment_port}", payment)
            config = write_config(directory, port, order_port, payment_port, broker)
            with start_main(config=config, cwd=directory) as main:
                target = f"127.0.0.1:{port}"
                wait_for_serving(target, main)
                suffix = uuid.uuid4().hex[:8]
                running = Service(
                    target,
                    f"127.0.0.1:{order_port}",
                    broker,
                    f"cli-ok-{suffix}",
                    f"cli-fault-{suffix}",
                    cli_env(ORCH_TARGET=target, ORCH_ADMIN_TOKEN=READ_TOKEN),
                    cli_env(ORCH_TARGET=target, ORCH_ADMIN_TOKEN=OPERATE_TOKEN),
                )
                assert running.book("HandleSyncBooking", running.completed) == grpc.StatusCode.OK
                status = running.book("HandleSyncBooking", running.compensated, fault=True)
                assert status == grpc.StatusCode.FAILED_PRECONDITION
                running.wait_until_ended(running.compensated)
                yield running
    finally:
        asyncio.run(delete_topology(broker, frozenset(BOOKING_TOPICS)))


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


# Acting on sagas

REASON = "customer cancelled by phone"


@dataclass(frozen=True)
class Compensated:
    """An async saga the operator compensated while it ran, and what the command printed."""

    request_id: str
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def compensated(service: Service) -> Compensated:
    """An async booking, compensated by `sagas compensate` while its order is being made."""
    request_id = f"cli-compensate-{uuid.uuid4().hex[:8]}"
    assert service.book("HandleAsyncBooking", request_id) == grpc.StatusCode.OK
    result = service.operate(
        "-o", "json", "sagas", "compensate", request_id, "--reason", REASON, "-f", ASYNC_FACADE
    )
    return Compensated(request_id, result)


def test_compensate_of_a_running_saga_exits_0_with_the_saga_rolling_back(
    compensated: Compensated,
) -> None:
    saga = json_of(compensated.result)

    assert (saga["request_id"], saga["facade"]) == (compensated.request_id, ASYNC_FACADE)
    assert saga["state"] in {"COMPENSATING", "COMPENSATED"}, "it was RUNNING: the order takes 1.5 s"
    assert saga["error_code"] == "ABORTED"
    assert saga["error_reason"] == f"compensated by {OPERATOR}: {REASON}"


def test_a_compensated_saga_ends_compensated_as_watch_shows(
    service: Service, compensated: Compensated
) -> None:
    result = service.cli("-o", "table", "sagas", "watch", compensated.request_id)

    assert result.returncode == 0, described(result)
    last = result.stdout.splitlines()[-1]
    assert last.split()[2] == "COMPENSATED", described(result)
    assert "create_order" in last and "undo DONE" in last, described(result)
    assert f"ABORTED: compensated by {OPERATOR}: {REASON}" in last


def test_sagas_show_names_the_operator_and_the_reason_of_a_compensation(
    service: Service, compensated: Compensated
) -> None:
    service.wait_until_ended(compensated.request_id)

    result = service.cli("-o", "table", "sagas", "show", compensated.request_id)

    assert result.returncode == 0, described(result)
    lines = result.stdout.splitlines()
    assert "Operator actions" in lines, described(result)
    [action] = [line for line in lines if " compensate " in f" {line} "]
    assert action.split()[2:4] == ["compensate", OPERATOR], action
    assert action.endswith(REASON), action
    assert any(line.split() == ["State", "COMPENSATED"] for line in lines), described(result)


def test_sagas_show_json_holds_the_compensation_action(
    service: Service, compensated: Compensated
) -> None:
    service.wait_until_ended(compensated.request_id)

    shown = json_of(service.cli("-o", "json", "sagas", "show", compensated.request_id))

    [action] = shown["actions"]
    assert (action["action"], action["actor"], action["note"]) == ("compensate", OPERATOR, REASON)
    assert shown["state"] == "COMPENSATED"


def test_a_compensated_saga_leaves_its_order_cancelled_and_nothing_paid(
    service: Service, compensated: Compensated
) -> None:
    service.wait_until_ended(compensated.request_id)

    saga = service.saga(compensated.request_id)
    order = service.order_of(compensated.request_id)

    steps = {step.name: step for step in saga.steps}
    assert list(steps) == ["create_order"], "the payment step never ran"
    assert steps["create_order"].compensation == saga_pb2.COMPENSATION_STATE_DONE
    # The order's create was under way: it is cancelled, or (had the cancel overtaken it)
    # refused and never made. Either way no order of the saga stands.
    assert order is None or order.Status == order_pb2.CANCELLED, order


def test_resolve_of_a_completed_saga_exits_4_naming_its_state(service: Service) -> None:
    result = service.operate("sagas", "resolve", service.completed, "--note", "refunded by hand")

    assert result.returncode == 4, described(result)
    line = one_error_line(result)
    assert line.startswith("error: FAILED_PRECONDITION: ")
    assert f"{service.completed} is COMPLETED" in line
    shown = json_of(service.cli("sagas", "show", service.completed))
    assert (shown["state"], shown["actions"]) == ("COMPLETED", [])


def test_retry_of_an_unknown_saga_exits_3_naming_not_found(service: Service) -> None:
    unknown = f"no-such-{uuid.uuid4().hex[:8]}"

    result = service.operate("sagas", "retry", unknown, "--note", "payments are back")

    assert result.returncode == 3, described(result)
    line = one_error_line(result)
    assert line.startswith("error: NOT_FOUND: ")
    assert unknown in line


# Dead letters

POISON_REASON = "malformed JSON"


def publish_poison(broker: BrokerSettings, message_id: str) -> None:
    """Publish a body that is not JSON to the create_order topic, as any AMQP client could."""

    async def publish() -> None:
        connection = await aio_pika.connect(broker.url.get_secret_value(), timeout=10)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(f"{broker.topic_prefix}orchestrator")
            message = aio_pika.Message(
                b'{"request_id": "' + message_id.encode() + b'", ',
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, routing_key=broker.queue_name(CREATE_ORDER))

    asyncio.run(asyncio.wait_for(publish(), 20))


@pytest.fixture
def dead_letter(service: Service) -> Iterator[str]:
    """The id of a poison message the service dead-lettered and keeps for an operator;
    discarded afterwards if a test left it waiting, so that each test starts with none."""
    message_id = f"cli-poison-{uuid.uuid4().hex[:8]}"
    publish_poison(service.broker, message_id)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        kept = [letter for letter in service.dead_letters() if letter.message_id == message_id]
        if kept:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"poison message {message_id} was not listed as a dead letter within 20s")
    [letter] = kept
    yield letter.id
    if any(waiting.id == letter.id for waiting in service.dead_letters()):
        service.discard(letter.id, "left waiting by a test")


def test_dlq_list_shows_a_poison_message_with_its_topic_and_reason(
    service: Service, dead_letter: str
) -> None:
    result = service.cli("-o", "table", "dlq", "list")

    assert result.returncode == 0, described(result)
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["ID", "TOPIC", "FACADE"]
    [row] = [row for row in rows if row.split()[0] == dead_letter]
    assert row.split()[1:3] == ["create_order", ASYNC_FACADE]
    assert "WAITING" in row.split()
    assert POISON_REASON in row


def run_in_terminal(*args: str, env: Mapping[str, str], columns: int) -> str:
    """Run `python -m orchestrator ARGS` on a terminal `columns` wide (NO_COLOR); its output."""
    main, child = pty.openpty()
    argv = [sys.executable, "-m", "orchestrator", *args]
    terminal = {**env, "COLUMNS": str(columns), "LINES": "50", "NO_COLOR": "1"}
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=child, stderr=child, cwd=ROOT, env=terminal
    ) as process:
        os.close(child)
        output = b""
        deadline = time.monotonic() + CLI_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.1)
            try:
                chunk = os.read(main, 65536) if ready else b""
            except OSError:  # the child closed the terminal
                break
            if ready and not chunk:
                break
            output += chunk
        else:
            process.kill()
            pytest.fail(f"{argv} did not finish within {CLI_TIMEOUT}s; output: {output!r}")
        os.close(main)
        assert process.wait(CLI_TIMEOUT) == 0, output
    return output.decode().replace("\r\n", "\n")


def test_dlq_list_on_a_narrow_terminal_cuts_nothing_off(service: Service, dead_letter: str) -> None:
    # Its fixed columns alone are wider than 80: each dead letter becomes a record of lines.
    output = run_in_terminal("dlq", "list", env=service.env, columns=80)

    lines = output.splitlines()
    assert max(len(line) for line in lines) <= 80, output
    assert f"ID                   {dead_letter}" in lines, output
    assert "STATE                WAITING" in lines, output
    assert any(line.startswith(f"REASON               {POISON_REASON}") for line in lines)


def test_dlq_list_json_holds_the_poison_message(service: Service, dead_letter: str) -> None:
    listing = json_of(service.cli("-o", "json", "dlq", "list", "--topic", CREATE_ORDER))

    [letter] = [letter for letter in listing["dead_letters"] if letter["id"] == dead_letter]
    assert (letter["topic"], letter["facade"]) == (CREATE_ORDER, ASYNC_FACADE)
    assert letter["reason"].startswith(POISON_REASON)
    assert letter["state"] == "DEAD_LETTER_WAITING"
    json_format.ParseDict(listing, saga_pb2.ListDeadLettersResponse())


def test_dlq_discard_exits_0_and_the_waiting_list_is_empty(
    service: Service, dead_letter: str
) -> None:
    discarded = service.operate("-o", "json", "dlq", "discard", dead_letter, "--note", "a test")
    listed = service.cli("-o", "table", "dlq", "list")

    letter = json_of(discarded)
    assert (letter["id"], letter["state"]) == (dead_letter, "DEAD_LETTER_DISCARDED")
    assert (letter["settled_by"], letter["note"]) == (OPERATOR, "a test")
    assert listed.returncode == 0, described(listed)
    assert listed.stdout == "No dead letters match.\n", described(listed)


def test_a_discarded_dead_letter_is_listed_under_discarded(
    service: Service, dead_letter: str
) -> None:
    assert service.operate("dlq", "discard", dead_letter, "--note", "a test").returncode == 0

    result = service.cli("-o", "table", "dlq", "list", "--state", "discarded")

    assert result.returncode == 0, described(result)
    [row] = [row for row in result.stdout.splitlines() if row.split()[0] == dead_letter]
    assert "DISCARDED" in row.split()
    assert POISON_REASON in row


def test_a_second_discard_exits_4_naming_who_discarded_it(
    service: Service, dead_letter: str
) -> None:
    first = service.operate("dlq", "discard", dead_letter, "--note", "a test")
    second = service.operate("dlq", "discard", dead_letter, "--note", "again")

    assert first.returncode == 0, described(first)
    assert second.returncode == 4, described(second)
    line = one_error_line(second)
    assert line.startswith("error: FAILED_PRECONDITION: ")
    assert f"already DISCARDED by {OPERATOR}" in line


def test_dlq_replay_of_an_unknown_dead_letter_exits_3(service: Service) -> None:
    result = service.operate("dlq", "replay", f"dl-{uuid.uuid4().hex[:8]}")

    assert result.returncode == 3, described(result)
    assert one_error_line(result).startswith("error: NOT_FOUND: no dead letter ")


# Access


def test_a_read_token_on_an_operate_command_exits_5_naming_permission_denied(
    service: Service,
) -> None:
    result = service.cli("sagas", "resolve", service.completed, "--note", "refunded by hand")

    assert result.returncode == 5, described(result)
    assert one_error_line(result).startswith("error: PERMISSION_DENIED: ")


@pytest.mark.parametrize(
    "args",
    [
        ("sagas", "resolve", "any-id", "--note", "refunded by hand"),
        ("sagas", "list"),
        ("dlq", "list"),
    ],
    ids=lambda args: "-".join(args[:2]),
)
def test_a_command_without_a_token_exits_5_naming_unauthenticated(
    service: Service, args: tuple[str, ...]
) -> None:
    result = run_cli(*args, env=cli_env(ORCH_TARGET=service.target))

    assert result.returncode == 5, described(result)
    assert one_error_line(result).startswith("error: UNAUTHENTICATED: ")


def test_a_wrong_token_exits_5_naming_unauthenticated(service: Service) -> None:
    result = run_cli("--token", f"not-{READ_TOKEN}", "sagas", "list", env=service.env)

    assert result.returncode == 5, described(result)
    assert one_error_line(result).startswith("error: UNAUTHENTICATED: ")


def test_the_token_option_goes_as_bearer_metadata_the_server_accepts(service: Service) -> None:
    env = cli_env(ORCH_TARGET=service.target)

    shown = json_of(run_cli("--token", READ_TOKEN, "sagas", "show", service.completed, env=env))

    assert (shown["request_id"], shown["state"]) == (service.completed, "COMPLETED")


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


# Usage errors


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


# The tokens


def test_the_tokens_never_appear_in_any_output(service: Service, dead_letter: str) -> None:
    reader, operator = service.env, service.operator_env
    runs = [
        run_cli("-o", "table", "sagas", "list", env=reader),
        run_cli("-o", "json", "sagas", "show", service.compensated, env=reader),
        run_cli("sagas", "show", "no-such-saga", env=reader),
        run_cli("sagas", "resolve", service.completed, "--note", "n", env=reader),
        run_cli("sagas", "resolve", "x", env=reader),
        run_cli("--help", env=operator),
        run_cli("-o", "table", "dlq", "list", env=operator),
        run_cli("-o", "table", "sagas", "show", service.completed, env=operator),
        run_cli("sagas", "resolve", service.completed, "--note", "n", env=operator),
        run_cli("sagas", "retry", "no-such-saga", "--note", "n", env=operator),
        run_cli("-o", "table", "dlq", "discard", dead_letter, "--note", "n", env=operator),
        run_cli("dlq", "discard", dead_letter, "--note", "n", env=operator),
        run_cli("--token", f"{OPERATE_TOKEN}x", "sagas", "list", env=reader),
        run_cli("--token", OPERATE_TOKEN, "--target", f"127.0.0.1:{free_port()}", "sagas", "list"),
    ]

    exits = [run.returncode for run in runs]
    assert exits == [0, 0, 3, 5, 2, 0, 0, 0, 4, 3, 0, 4, 5, 6], [described(r) for r in runs]
    for run in runs:
        output = run.stdout + run.stderr
        assert OPERATE_TOKEN not in output and READ_TOKEN not in output, described(run)
