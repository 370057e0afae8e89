"""Crash recovery: a sync saga whose orchestrator is SIGKILLed mid-run is rolled back by the next.

The orchestrator runs as `python main.py` with a SQLite saga store; the
upstream services run in the test's process so their ledgers can be read.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import yaml

from orchestrator.proto import saga_pb2, saga_pb2_grpc
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import Upstreams
from tests.support.broker_fixtures import skip_or_fail
from tests.support.databases import admin_url, create_database, drop_database
from tests.support.processes import free_port, start_main, wait_for_serving
from upstream.server import serve_upstream

pytestmark = pytest.mark.timeout(120)


def orchestrator_config(tmp_path: Path, order: str, payment: str, port: int) -> Path:
    config = {
        "grpc": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 2},
        "upstreams": {
            "order": {"address": order},
            "payment": {"address": payment},
            "timeout_seconds": 10,
        },
        "embedded_upstreams": {},
        "store": {
            "url": f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}",
            "heartbeat_seconds": 0.5,
            "lease_seconds": 2,
        },
        "metrics": {"enabled": False},
        "log_level": "INFO",
    }
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_a_sync_saga_killed_after_its_first_step_is_compensated_after_restart(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    slow_payment = await serve_upstream("payment", port=0, latency_ms=3000)
    port = free_port()
    config = orchestrator_config(tmp_path, upstreams.order.target, slow_payment.target, port)
    target = f"127.0.0.1:{port}"
    first = start_main(config=config, cwd=tmp_path)
    try:
        await asyncio.to_thread(wait_for_serving, target, first)
        async with grpc.aio.insecure_channel(target) as channel:
            booking = asyncio.ensure_future(
                booking_pb2_grpc.BookingServiceStub(channel).HandleSyncBooking(
                    booking_pb2.BookingRequest(ProductID=1),
                    metadata=(("x-request-id", "killed-1"),),
                    timeout=60,
                )
            )
            # Killed once its first step is recorded done (payment takes 3 s to answer).
            sagas = saga_pb2_grpc.SagaServiceStub(channel)
            async with asyncio.timeout(20):
                while True:
                    try:
                        saga = await sagas.GetSaga(
                            saga_pb2.GetSagaRequest(request_id="killed-1"), timeout=5
                        )
                    except grpc.aio.AioRpcError:
                        saga = saga_pb2.Saga()
                    if saga.steps and saga.steps[0].state == saga_pb2.STEP_DONE:
                        break
                    await asyncio.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            with pytest.raises(grpc.aio.AioRpcError):
                await booking

        with start_main(config=config, cwd=tmp_path) as second:
            await asyncio.to_thread(wait_for_serving, target, second)
            async with grpc.aio.insecure_channel(target) as channel:
                sagas = saga_pb2_grpc.SagaServiceStub(channel)
                async with asyncio.timeout(30):
                    while True:
                        saga = await sagas.GetSaga(
                            saga_pb2.GetSagaRequest(request_id="killed-1"), timeout=5
                        )
                        if saga.state == saga_pb2.COMPENSATED:
                            break
                        await asyncio.sleep(0.1)
        payment = slow_payment.ledger.latest_payment_of("killed-1")
    finally:
        first.close()
        await slow_payment.stop(None)

    order = upstreams.order.ledger.latest_order_of("killed-1")
    assert order is not None and order.status == "CANCELLED"
    assert upstreams.order.ledger.count_orders("killed-1") == 1
    # The dead process's payment call may still land upstream: then it is refunded,
    # or refused by the tombstone the refund left.
    assert payment is None or payment.status == "REFUNDED"
    # create_payment's start is recorded with create_order's end, in one write: the step
    # the dead replica was running is failed by recovery, as ABORTED, and undone with it.
    assert [(step.name, step.state) for step in saga.steps] == [
        ("create_order", saga_pb2.STEP_DONE),
        ("create_payment", saga_pb2.STEP_FAILED),
    ]
    assert saga.error_code == "ABORTED"


@pytest.fixture
async def postgres_store_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for the replicas' shared store, dropped afterwards."""
    admin = admin_url()
    try:
        database = await create_database(admin)
    except (OSError, asyncpg.PostgresError) as exc:
        skip_or_fail("PostgreSQL for a shared saga store", [repr(exc)])
    try:
        yield database.render_as_string(hide_password=False)
    finally:
        await drop_database(admin, database)


async def test_two_replicas_on_one_postgresql_store_one_killed_every_saga_ends_once(  # noqa: PLR0915
    tmp_path: Path, upstreams: Upstreams, postgres_store_url: str
) -> None:
    slow_payment = await serve_upstream("payment", port=0, latency_ms=1500)
    ports = [free_port(), free_port()]
    configs = []
    for name, port in zip(("a", "b"), ports, strict=True):
        folder = tmp_path / name
        folder.mkdir()
        config = orchestrator_config(folder, upstreams.order.target, slow_payment.target, port)
        raw = yaml.safe_load(config.read_text())
        raw["store"]["url"] = postgres_store_url
        config.write_text(yaml.safe_dump(raw))
        configs.append(config)
    doomed = start_main(config=configs[0], cwd=tmp_path / "a")
    survivor = start_main(config=configs[1], cwd=tmp_path / "b")
    targets = [f"127.0.0.1:{port}" for port in ports]
    ids = [f"replica-{i}" for i in range(20)]
    try:
        for process, target in ((doomed, targets[0]), (survivor, targets[1])):
            await asyncio.to_thread(wait_for_serving, target, process)
        async with (
            grpc.aio.insecure_channel(targets[0]) as to_doomed,
            grpc.aio.insecure_channel(targets[1]) as to_survivor,
        ):
            stubs = [
                booking_pb2_grpc.BookingServiceStub(to_doomed),
                booking_pb2_grpc.BookingServiceStub(to_survivor),
            ]
            calls = [
                asyncio.ensure_future(
                    stubs[i % 2].HandleSyncBooking(
                        booking_pb2.BookingRequest(ProductID=1),
                        metadata=(("x-request-id", rid),),
                        timeout=30,
                    )
                )
                for i, rid in enumerate(ids)
            ]
            async with asyncio.timeout(20):
                while any(  # noqa: ASYNC110
                    upstreams.order.ledger.latest_order_of(rid) is None for rid in ids
                ):
                    await asyncio.sleep(0.02)
            doomed.send_signal(signal.SIGKILL)
            await asyncio.to_thread(doomed.wait, 10)
            answers = await asyncio.gather(*calls, return_exceptions=True)

            sagas = saga_pb2_grpc.SagaServiceStub(to_survivor)
            final = {saga_pb2.COMPLETED, saga_pb2.COMPENSATED}
            async with asyncio.timeout(40):
                while True:
                    states = {
                        rid: (
                            await sagas.GetSaga(saga_pb2.GetSagaRequest(request_id=rid), timeout=5)
                        ).state
                        for rid in ids
                    }
                    if set(states.values()) <= final:
                        break
                    await asyncio.sleep(0.2)
        payments = {rid: slow_payment.ledger.latest_payment_of(rid) for rid in ids}
        log = survivor.output()
    finally:
        doomed.close()
        survivor.close()
        await slow_payment.stop(None)

    for i, rid in enumerate(ids):
        order = upstreams.order.ledger.latest_order_of(rid)
        payment = payments[rid]
        assert upstreams.order.ledger.count_orders(rid) == 1
        assert order is not None
        if i % 2:  # the survivor's own sagas finished normally
            assert not isinstance(answers[i], BaseException)
            assert states[rid] == saga_pb2.COMPLETED
            assert order.status == "CREATED" and payment and payment.status == "PAID"
        else:  # the dead replica's sagas were taken over and rolled back
            assert states[rid] == saga_pb2.COMPENSATED
            assert order.status == "CANCELLED"
            assert payment is None or payment.status == "REFUNDED"
    # Each of the dead replica's sagas was taken over exactly once.
    recoveries = [line for line in log.splitlines() if "recovering a stalled saga" in line]
    for rid in ids[::2]:
        assert sum(f"request_id={rid} " in line for line in recoveries) == 1, rid
    assert len(recoveries) == len(ids[::2])
