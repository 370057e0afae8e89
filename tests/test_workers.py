"""One orchestrator process per core: `python main.py --workers N` under its supervisor.

The workers run as real processes on a real RabbitMQ and a SQLite store; the upstream
services run in this process, so their ledgers can be read. Sagas are judged from the
ledgers and the store (through SagaService).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from bench.common import listeners
from orchestrator import Orchestrator
from orchestrator.broker import InMemoryBroker
from orchestrator.config import BrokerSettings, GrpcSettings, Settings, load_settings
from orchestrator.errors import ConfigError
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from orchestrator.server import OrchestratorServer
from orchestrator.workers import WORKER_ENV, WORKER_METADATA, worker_count
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import BOOKING_TOPICS, Upstreams
from tests.support.broker_fixtures import delete_topology, make_settings
from tests.support.processes import (
    ROOT,
    ServiceProcess,
    alive,
    children,
    free_port,
    main_env,
    start_main,
)
from tests.support.processes import wait_for_serving as wait_serving
from upstream.server import serve_upstream

STARTUP_SECONDS = 90.0
"""Two workers importing, migrating and connecting on a busy 2-core machine take a while."""
FINAL = {saga_pb2.COMPLETED, saga_pb2.COMPENSATED}


# --- what workers need -----------------------------------------------------------------------


def settings_with(tmp_path: Path, **values: object) -> Settings:
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_settings(Settings, path, environ={})


def test_workers_refuse_a_broker_in_memory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"workers: 2 cannot share broker\.url memory://"):
        settings_with(tmp_path, workers=2, store={"url": "sqlite+aiosqlite:///x.db"})


def test_workers_refuse_a_store_in_memory(tmp_path: Path) -> None:
    broker = {"url": "amqp://guest:guest@127.0.0.1:5672/"}
    with pytest.raises(ConfigError, match="cannot share a store in memory"):
        settings_with(tmp_path, workers=0, broker=broker)


def test_workers_refuse_a_port_the_os_picks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"need a fixed grpc\.port"):
        settings_with(
            tmp_path,
            workers=3,
            grpc={"port": 0},
            broker={"url": "amqp://guest:guest@127.0.0.1:5672/"},
            store={"url": "sqlite+aiosqlite:///x.db"},
        )


def test_zero_workers_is_one_per_core_this_process_may_use() -> None:
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


def test_the_embedded_default_with_workers_stops_at_once_naming_the_broker() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--workers", "2"],
        cwd=ROOT,
        env=main_env(ROOT / "app.yaml"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and "memory://" in result.stderr


class _SlowBroker(InMemoryBroker):
    """An embedded broker whose start waits until `connected` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.connected = asyncio.Event()

    async def start(self) -> None:
        await self.connected.wait()
        await super().start()


async def test_a_worker_listens_only_once_its_orchestrator_has_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel hands every listening worker its share of new connections: one listening
    # while it still connects would hold those callers until it is done.
    monkeypatch.setenv(WORKER_ENV, "0")
    broker, port = _SlowBroker(), free_port()
    server = OrchestratorServer(
        Orchestrator(broker),
        GrpcSettings(host="127.0.0.1", port=port, drain_seconds=0, shutdown_grace_seconds=0),
        [],
    )
    starting = asyncio.create_task(server.start())
    try:
        await asyncio.sleep(0.3)
        assert not starting.done() and listeners(port) == 0
        broker.connected.set()
        async with asyncio.timeout(10):
            assert await starting == port
        assert listeners(port) == 1
    finally:
        starting.cancel()
        await server.stop(0)


# --- two workers on one port -----------------------------------------------------------------


@dataclass
class Workers:
    """A supervisor running two workers, and where to reach them."""

    supervisor: ServiceProcess
    target: str
    metrics_port: int
    upstreams: Upstreams
    served_by: set[str] = field(default_factory=set)
    """The `x-orchestrator-worker` trailers seen so far."""

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())


def workers_config(
    folder: Path, order: str, payment: str, broker: BrokerSettings, **extra: object
) -> tuple[Path, int, int]:
    """An app.yaml for two workers on `broker` and a SQLite store in `folder`."""
    port, metrics_port = free_port(), free_port()
    config = {
        "grpc": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 2},
        "broker": {
            "url": broker.url.get_secret_value(),
            "topic_prefix": broker.topic_prefix,
            "connect_timeout_seconds": 20,
        },
        "upstreams": {
            "order": {"address": order},
            "payment": {"address": payment},
            "timeout_seconds": 5,
        },
        "embedded_upstreams": {},
        "store": {
            "url": f"sqlite+aiosqlite:///{folder / 'orchestrator.db'}",
            "heartbeat_seconds": 0.5,
            "lease_seconds": 2,
        },
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        "workers": 2,
        "log_level": "INFO",
        **extra,
    }
    path = folder / "app.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port, metrics_port


@pytest.fixture
async def broker(rabbitmq_url: str) -> AsyncIterator[BrokerSettings]:
    """This test's topic prefix on the shared RabbitMQ; its queues deleted afterwards."""
    settings = make_settings(rabbitmq_url)
    yield settings
    await delete_topology(settings, frozenset(BOOKING_TOPICS))


@pytest.fixture
async def workers(tmp_path: Path, broker: BrokerSettings) -> AsyncIterator[Workers]:
    """Two workers under their supervisor; the payment takes 300 ms, so that sagas are in
    flight when a worker dies."""
    order = await serve_upstream("order", port=0)
    payment = await serve_upstream("payment", port=0, latency_ms=300)
    upstreams = Upstreams(order, payment, None, None)  # type: ignore[arg-type]
    config, port, metrics_port = workers_config(tmp_path, order.target, payment.target, broker)
    try:
        with start_main(config=config, cwd=tmp_path) as supervisor:
            target = f"127.0.0.1:{port}"
            await asyncio.to_thread(wait_serving, target, supervisor, timeout=STARTUP_SECONDS)
            # One worker answering is not both: wait until each has bound the port.
            async with asyncio.timeout(STARTUP_SECONDS):
                while listeners(port) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            yield Workers(supervisor, target, metrics_port, upstreams)
            await asyncio.to_thread(supervisor.stop, signal.SIGTERM, timeout=30)
    finally:
        await order.stop(None)
        await payment.stop(None)


def http_status(url: str) -> int:
    """The HTTP status of a GET of `url`."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status)


def channels(target: str, count: int) -> list[grpc.aio.Channel]:
    """`count` channels, each on a connection of its own (the kernel spreads connections)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


async def book(workers: Workers, pool: list[grpc.aio.Channel], request_id: str, kind: str) -> str:
    """Book until answered (a caller retrying UNAVAILABLE with the same request id, on any
    connection); the status it ends with."""
    request = booking_pb2.BookingRequest(ProductID=1)
    async with asyncio.timeout(90):
        while True:
            stub = booking_pb2_grpc.BookingServiceStub(random.choice(pool))
            method = getattr(stub, f"Handle{kind}Booking")
            call = method(request, metadata=(("x-request-id", request_id),), timeout=30)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.2)
                    continue
                return str(exc.code().name)
            for key, value in await call.trailing_metadata() or ():
                if key == WORKER_METADATA:
                    workers.served_by.add(str(value))
            return "OK"


async def saga_state(pool: list[grpc.aio.Channel], request_id: str, facade: str) -> int:
    stub = saga_pb2_grpc.SagaServiceStub(pool[0])
    request = saga_pb2.GetSagaRequest(request_id=request_id, facade=facade)
    return int((await stub.GetSaga(request, timeout=10)).state)


def pids(served_by: set[str]) -> set[int]:
    return {int(worker.split("/")[1]) for worker in served_by}


@pytest.mark.broker
@pytest.mark.timeout(360)
async def test_two_workers_serve_one_killed_mid_load_is_restarted_and_every_saga_ends(
    workers: Workers,
) -> None:
    pool = channels(workers.target, 12)
    try:
        # Both serve: a dozen connections reach both workers.
        warm = await asyncio.gather(*(book(workers, pool, f"warm-{i}", "Sync") for i in range(12)))
        assert set(warm) == {"OK"}, warm
        first = pids(workers.served_by)
        assert len(first) == 2, workers.served_by

        ids = [(f"load-{i}", "Sync" if i % 2 else "Throttling") for i in range(40)]
        load = [asyncio.create_task(book(workers, pool, rid, kind)) for rid, kind in ids]
        async with asyncio.timeout(30):
            while workers.upstreams.payment.calls.served < 18:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        doomed = min(first)
        os.kill(doomed, signal.SIGKILL)
        answers = await asyncio.gather(*load)

        async with asyncio.timeout(120):
            # The supervisor starts it again: a new worker serves beside the survivor (seen
            # on new connections: those made meanwhile all went to the survivor).
            while not pids(workers.served_by) - first:
                fresh = channels(workers.target, 12)
                try:
                    await asyncio.gather(
                        *(
                            book(workers, fresh, f"after-{os.urandom(4).hex()}", "Sync")
                            for _ in fresh
                        )
                    )
                finally:
                    for channel in fresh:
                        await channel.close()
                await asyncio.sleep(0.5)
        facade = {"Sync": "SyncBooking", "Throttling": "ThrottlingBooking"}
        async with asyncio.timeout(60):
            while True:
                states = [await saga_state(pool, rid, facade[kind]) for rid, kind in ids]
                if set(states) <= FINAL:
                    break
                await asyncio.sleep(0.5)
        metrics = await asyncio.to_thread(workers.metrics)
    finally:
        for channel in pool:
            await channel.close()

    assert set(answers) <= {"OK", "ABORTED"}, answers  # ABORTED: a sync saga of the dead worker
    for (rid, _), state in zip(ids, states, strict=True):
        orders = workers.upstreams.order.ledger.orders_of(rid)
        payments = workers.upstreams.payment.ledger.payments_of(rid)
        assert len(orders) == 1 and len(payments) <= 1, rid
        if state == saga_pb2.COMPLETED:
            assert orders[0].status == "CREATED" and payments[0].status == "PAID", rid
        else:
            assert orders[0].status == "CANCELLED", rid
            assert not payments or payments[0].status == "REFUNDED", rid
    assert f"worker died worker=0/{doomed}" in workers.supervisor.output() or (
        f"worker died worker=1/{doomed}" in workers.supervisor.output()
    )
    # The live workers' gauges (the dead one's are gone); counters summed over all three.
    connected = [line for line in metrics.splitlines() if line.startswith("orchestrator_broker_co")]
    assert len(connected) == 2 and f'pid="{doomed}"' not in "".join(connected), connected
    started = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("orchestrator_sagas_started_total")
    ]
    assert sum(started) >= 12 + len(ids)


@pytest.mark.broker
@pytest.mark.timeout(200)
async def test_with_the_console_on_worker_0_alone_serves_it_and_both_workers_serve_grpc(
    tmp_path: Path, broker: BrokerSettings
) -> None:
    ui_port = free_port()
    ui = {"enabled": True, "host": "127.0.0.1", "port": ui_port}
    config, port, _ = workers_config(tmp_path, "127.0.0.1:1", "127.0.0.1:1", broker, ui=ui)
    with start_main(config=config, cwd=tmp_path) as supervisor:
        await asyncio.to_thread(
            wait_serving, f"127.0.0.1:{port}", supervisor, timeout=STARTUP_SECONDS
        )
        async with asyncio.timeout(STARTUP_SECONDS):
            while listeners(port) < 2 and supervisor.returncode is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert supervisor.returncode is None, supervisor.output()
        status = await asyncio.to_thread(http_status, f"http://127.0.0.1:{ui_port}/health")
        assert status == 200 and listeners(ui_port) == 1
        served = [line for line in supervisor.output().splitlines() if "console served" in line]
        assert len(served) == 1 and "worker=0/" in served[0], served
        await asyncio.to_thread(supervisor.stop, signal.SIGTERM, timeout=30)


@pytest.mark.broker
@pytest.mark.timeout(200)
async def test_sigterm_stops_every_worker_gracefully_and_the_supervisor_exits_0(
    tmp_path: Path, broker: BrokerSettings
) -> None:
    config, port, _ = workers_config(tmp_path, "127.0.0.1:1", "127.0.0.1:1", broker)
    with start_main(config=config, cwd=tmp_path) as supervisor:
        await asyncio.to_thread(
            wait_serving, f"127.0.0.1:{port}", supervisor, timeout=STARTUP_SECONDS
        )
        async with asyncio.timeout(STARTUP_SECONDS):  # both serve: both handle SIGTERM
            while supervisor.output().count("orchestrator.server serving") < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        workers = children(supervisor.pid)
        status = await asyncio.to_thread(supervisor.stop, signal.SIGTERM, timeout=60)
        output = supervisor.output()

    assert status == 0, output
    assert len(workers) == 2
    assert not any(alive(pid) for pid in workers)
    assert output.count("signal received, shutting down") == 2


@pytest.mark.broker
@pytest.mark.timeout(200)
async def test_a_configuration_the_workers_refuse_stops_the_supervisor_instead_of_restarting(
    tmp_path: Path, broker: BrokerSettings
) -> None:
    refused = {"sagas": {"facades": {"ThrottlingBooking": {"run_as": "async"}}}}
    config, _, _ = workers_config(tmp_path, "127.0.0.1:1", "127.0.0.1:1", broker, **refused)
    with start_main(config=config, cwd=tmp_path) as supervisor:
        status = await asyncio.to_thread(supervisor.wait, 120)
        output = supervisor.output()

    assert status == 2, output
    assert "sagas.facades.ThrottlingBooking.run_as" in output
    assert output.count("worker started") == 2, output
