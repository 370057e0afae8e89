"""The compose stack as local processes: the README's grpcurl commands against it, verbatim.

No container runs here. The `order`, `payment` and `orchestrator` services of
deployment/local/docker-compose.yaml start as `python main.py <their command>`
with their compose environment, rewritten for this machine: the upstream
ledgers (`--db /data/...`) go to a temporary directory, and the orchestrator
gets a copy of its config whose compose hostnames are 127.0.0.1, whose broker
is this machine's RabbitMQ (`$RABBITMQ_URL`, else amqp://guest:guest@127.0.0.1:5672/,
else the broker tests' RabbitMQ) and whose `broker.topic_prefix` is unique, so
nothing collides with anything else on a shared broker. The services use their
compose ports (10000, 50051, 50052): the README's commands name them.

The last test stops the stack with SIGTERM; its queues and exchanges are
deleted afterwards.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
import yaml

import topic
from main import AppSettings
from orchestrator.config import BrokerSettings, load_settings
from tests.support.broker_fixtures import delete_topology, skip_or_fail
from tests.support.databases import admin_url, create_database, drop_database
from tests.support.processes import (
    ROOT,
    ServiceProcess,
    main_env,
    require_free_ports,
    run_grpcurl,
    start_main,
    wait_for_serving,
)
from tests.test_acceptance import (
    Readme,
    eventually,
    grpcurl_call,
    normalized,
    request_id_of,
    run_readme,
    stdout_json,
)
from tests.test_deployment import (
    DOCKERFILE,
    Dockerfile,
    compose_environment,
    duration_seconds,
    image_path,
    load_compose,
    parse_upstream_args,
    volume_mounts,
)

pytestmark = pytest.mark.broker

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOCALHOST = "127.0.0.1"
UPSTREAMS = ("order", "payment")
EVENTUALLY_SECONDS = 15.0
"""How long an async saga or a rollback through RabbitMQ gets to finish."""


@dataclass
class StackService:
    """One compose service run as a local process."""

    name: str
    args: list[str]
    env: dict[str, str]
    port: int
    stop_grace: float
    process: ServiceProcess | None = None

    @property
    def target(self) -> str:
        """Where its gRPC server (and health service) answers."""
        return f"{LOCALHOST}:{self.port}"


@dataclass
class Stack:
    """The services of the compose stack, in start order, and the broker they share."""

    services: dict[str, StackService]
    broker: BrokerSettings
    topics: frozenset[str]


def _swap_host(address: str, hosts: set[str]) -> str:
    host, _, port = address.rpartition(":")
    return f"{LOCALHOST}:{port}" if host in hosts else address


def _reachable(url: str) -> bool:
    async def connect() -> None:
        connection = await aio_pika.connect(url, timeout=3)
        await connection.close()

    try:
        asyncio.run(connect())
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def stack_broker_url(request: pytest.FixtureRequest) -> str:
    """$RABBITMQ_URL, else this machine's RabbitMQ as guest, else the broker tests' RabbitMQ."""
    if url := os.environ.get("RABBITMQ_URL"):
        return url
    if _reachable(DEFAULT_RABBITMQ_URL):
        return DEFAULT_RABBITMQ_URL
    return str(request.getfixturevalue("rabbitmq_url"))


def _orchestrator_config(
    raw: dict[str, Any], hosts: set[str], broker_url: str, prefix: str
) -> dict[str, Any]:
    """The compose orchestrator's config, rewritten to run beside the local upstreams."""
    config = copy.deepcopy(raw)
    for name in UPSTREAMS:
        upstream = config["upstreams"][name]
        upstream["address"] = _swap_host(upstream["address"], hosts)
    config["broker"]["url"] = broker_url
    config["broker"]["topic_prefix"] = prefix
    return config


def _on_local_disk(arg: str, mounts: dict[str, str], directory: Path) -> str:
    """`arg`, or the path under `directory` that stands for it when it is on a compose volume."""
    for mount in mounts:
        if arg.startswith(f"{mount}/"):
            local = directory / arg.removeprefix(f"{mount}/")
            local.parent.mkdir(parents=True, exist_ok=True)
            return str(local)
    return arg


def build_stack(broker_url: str, store_url: str, workdir: Path) -> Stack:
    """The compose app services as local commands; nothing is started yet."""
    compose = load_compose()
    services = compose["services"]
    hosts = set(services)
    image_workdir = Dockerfile.parse(DOCKERFILE.read_text(encoding="utf-8")).workdir
    stack: dict[str, StackService] = {}
    for name in UPSTREAMS:
        service = services[name]
        mounts = volume_mounts(service)
        args = [_on_local_disk(arg, mounts, workdir / name) for arg in service["command"]]
        env = compose_environment(service)
        port = parse_upstream_args(args).port
        stop_grace = duration_seconds(service["stop_grace_period"])
        stack[name] = StackService(name, args, env, port, stop_grace)

    service = services["orchestrator"]
    env = compose_environment(service)
    config_path = image_path(env["ORCH_CONFIG"], image_workdir)
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    prefix = f"stack{uuid.uuid4().hex[:12]}."
    config = _orchestrator_config(raw, hosts, broker_url, prefix)
    local_config = workdir / "app.yaml"
    local_config.write_text(yaml.safe_dump(config), encoding="utf-8")
    env["ORCH_CONFIG"] = str(local_config)
    assert urlsplit(env["ORCH_BROKER_URL"]).hostname in hosts, env["ORCH_BROKER_URL"]
    env["ORCH_BROKER_URL"] = broker_url
    assert urlsplit(env["ORCH_STORE_URL"]).hostname in hosts, env["ORCH_STORE_URL"]
    env["ORCH_STORE_URL"] = store_url
    port = load_settings(AppSettings, local_config, environ=env).grpc.port
    stop_grace = duration_seconds(service["stop_grace_period"])
    args = list(service.get("command", []))
    stack["orchestrator"] = StackService("orchestrator", args, env, port, stop_grace)

    broker = BrokerSettings.model_validate({"url": broker_url, "topic_prefix": prefix})
    topics = {value for key, value in vars(topic).items() if key.isupper()}
    topics |= set(config["broker"].get("topics", {}))
    return Stack(stack, broker, frozenset(topics))


@pytest.fixture(scope="module")
def stack(stack_broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack's services running; killed if still up at the end, then its topology deleted."""
    admin = admin_url()
    try:
        database = asyncio.run(create_database(admin))
    except (OSError, asyncpg.PostgresError) as exc:
        skip_or_fail("PostgreSQL for the stack's saga store", [repr(exc)])
    store_url = database.render_as_string(hide_password=False)
    try:
        built = build_stack(stack_broker_url, store_url, tmp_path_factory.mktemp("local-stack"))
        yield from _running(built)
    finally:
        asyncio.run(drop_database(admin, database))


def _running(built: Stack) -> Iterator[Stack]:
    """Start the stack's processes as compose would, and always stop them."""
    require_free_ports(
        [service.port for service in built.services.values()],
        "the local stack runs the compose services on their published ports",
    )
    upstreams = [built.services[name] for name in UPSTREAMS]
    orchestrator = built.services["orchestrator"]
    try:
        for service in upstreams:
            service.process = start_main(*service.args, env=main_env(None, **service.env))
        # As compose does: the orchestrator starts once its upstreams are healthy.
        for service in upstreams:
            assert service.process is not None
            wait_for_serving(service.target, service.process)
        orchestrator.process = start_main(
            *orchestrator.args, env=main_env(None, **orchestrator.env)
        )
        wait_for_serving(orchestrator.target, orchestrator.process)
        yield built
    finally:
        for service in (orchestrator, *upstreams):
            if service.process is not None:
                service.process.close()
        asyncio.run(delete_topology(built.broker, built.topics))


@pytest.fixture(scope="module")
def readme() -> Readme:
    """README.md, parsed."""
    return Readme.parse((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", autouse=True)
def readme_sync_booking(stack: Stack, readme: Readme) -> subprocess.CompletedProcess[str]:
    """The README's sync booking, the first call the fresh stack gets."""
    return run_readme(readme.command("HandleSyncBooking", '"FaultInject": "false"')[1])


@pytest.fixture(scope="module")
def readme_fault_booking(readme: Readme) -> subprocess.CompletedProcess[str]:
    """The README's booking with FaultInject=true, run once."""
    return run_readme(readme.command("HandleSyncBooking", '"FaultInject": "true"')[1])


def _status_of(method: str, target: str, request_id: str) -> str | None:
    body = json.dumps({"RequestID": request_id})
    result = run_grpcurl(["-plaintext", "-d", body, target, method])
    return json.loads(result.stdout).get("Status") if result.returncode == 0 else None


@pytest.mark.parametrize("name", [*UPSTREAMS, "orchestrator"])
def test_compose_healthcheck_passes_against_the_running_service(stack: Stack, name: str) -> None:
    test = load_compose()["services"][name]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"], test
    result = subprocess.run(
        [sys.executable, *test[2:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_sync_booking_prints_the_readme_response(
    readme: Readme, readme_sync_booking: subprocess.CompletedProcess[str]
) -> None:
    index, _ = readme.command("HandleSyncBooking", '"FaultInject": "false"')
    assert stdout_json(readme_sync_booking) == readme.json_after(index)


def test_readme_fault_injected_booking_fails_with_the_readme_error(
    readme: Readme, readme_fault_booking: subprocess.CompletedProcess[str]
) -> None:
    _, command = readme.command("HandleSyncBooking", '"FaultInject": "true"')
    expected = readme.error_mentioning(request_id_of(command))
    assert readme_fault_booking.returncode != 0, readme_fault_booking.stdout
    assert normalized(readme_fault_booking.stderr) == normalized(expected)


def test_readme_get_order_shows_the_fault_injected_order_cancelled(
    readme: Readme, readme_fault_booking: subprocess.CompletedProcess[str]
) -> None:
    _, command = readme.command("pb.OrderService/GetOrder")
    result = eventually(
        lambda: run_readme(command),
        lambda r: r.returncode == 0 and json.loads(r.stdout).get("Status") == "CANCELLED",
        timeout=EVENTUALLY_SECONDS,
    )
    assert stdout_json(result)["Status"] == "CANCELLED"


def test_readme_async_booking_prints_the_readme_response(readme: Readme) -> None:
    index, command = readme.command("HandleAsyncBooking")
    assert stdout_json(run_readme(command)) == readme.json_after(index)


def test_async_booking_through_rabbitmq_is_eventually_paid(stack: Stack) -> None:
    request_id = f"stack-{uuid.uuid4()}"
    body = json.dumps({"ProductID": 1})
    orchestrator = stack.services["orchestrator"].target
    queued = run_grpcurl(
        [
            *("-rpc-header", f"x-request-id:{request_id}", "-plaintext", "-d", body),
            *(orchestrator, "pb.BookingService/HandleAsyncBooking"),
        ]
    )
    assert stdout_json(queued) == {"RequestID": request_id}
    payments = stack.services["payment"].target
    status = eventually(
        lambda: _status_of("pb.PaymentService/GetPayment", payments, request_id),
        lambda s: s == "PAID",
        timeout=EVENTUALLY_SECONDS,
    )
    assert status == "PAID"
    orders = stack.services["order"].target
    assert _status_of("pb.OrderService/GetOrder", orders, request_id) == "CREATED"


def test_orchestrator_declares_its_topics_on_rabbitmq_under_the_stack_prefix(
    stack: Stack,
) -> None:
    async def missing_queues() -> list[str]:
        missing = []
        connection = await aio_pika.connect(stack.broker.url.get_secret_value(), timeout=10)
        async with connection:
            for name in sorted(stack.topics):
                channel = await connection.channel()
                try:
                    await channel.declare_queue(stack.broker.queue_name(name), passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    missing.append(name)
        return missing

    assert asyncio.run(missing_queues()) == []


def test_the_stacks_sagas_are_recorded_in_its_postgresql_store(stack: Stack) -> None:
    target = stack.services["orchestrator"].target
    booked = grpcurl_call(
        "pb.BookingService/HandleSyncBooking",
        {"ProductID": 1},
        target=target,
        request_id="stack-saga-1",
    )
    assert booked.returncode == 0, booked.stderr

    found = grpcurl_call(
        "orchestrator.v1.SagaService/GetSaga", {"request_id": "stack-saga-1"}, target=target
    )
    assert found.returncode == 0, found.stderr
    saga = json.loads(found.stdout)
    assert (saga["facade"], saga["state"]) == ("SyncBooking", "COMPLETED")


def test_stack_processes_exit_0_on_sigterm_within_their_stop_grace_period(stack: Stack) -> None:
    # Last: it stops the stack. The orchestrator first, as compose stops dependents first.
    processes = {name: stack.services[name].process for name in ("orchestrator", *UPSTREAMS)}
    statuses = {}
    for name, process in processes.items():
        assert process is not None
        statuses[name] = process.stop(signal.SIGTERM, timeout=stack.services[name].stop_grace)
    logs = [p.describe() for n, p in processes.items() if p is not None and statuses[n] != 0]
    assert statuses == dict.fromkeys(statuses, 0), "\n".join(logs)
