"""HandleThrottlingBooking over gRPC on a real RabbitMQ, with the real upstream services.

The booking service runs in this process on the shared RabbitMQ (a topic prefix of the
test's own); the upstreams add latency so that calls overlap, and count their calls in
progress. Every test is judged from the upstream ledgers and the saga store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facade import THROTTLING_BOOKING
from main import BookingApp
from main import running_app as run_booking_app
from orchestrator.config import BrokerSettings, SagaSettings
from orchestrator.endpoint import RETRY_PUSHBACK_TRAILER
from orchestrator.server import ADMISSION_SERVICE
from orchestrator.store import SagaState
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import BOOKING_TOPICS, Upstreams, app_settings, running_upstreams
from tests.support.broker_fixtures import delete_topology, make_settings
from tests.support.processes import free_port, start_main, wait_for_serving
from topic import CANCEL_THROTTLING_BOOKING, THROTTLING_CREATE_ORDER, THROTTLING_CREATE_PAYMENT

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

CALL_TIMEOUT = 60.0
"""Each call's gRPC deadline: far above what any booking here takes."""
PUSHBACK_SECONDS = 0.3
"""`sagas.retry_pushback_seconds` of these tests."""


@dataclass
class Answer:
    """How one call ended: its request id, status, response and trailers."""

    request_id: str
    code: grpc.StatusCode
    response: booking_pb2.BookingSyncResponse | None = None
    details: str = ""
    trailers: dict[str, str] | None = None


@dataclass
class Service:
    """The booking service under test, a client of it, and where it keeps things."""

    app: BookingApp
    stub: booking_pb2_grpc.BookingServiceAsyncStub
    health: health_pb2_grpc.HealthAsyncStub
    upstreams: Upstreams

    async def book(self, request_id: str, *, fault: bool = False) -> Answer:
        try:
            response = await self.stub.HandleThrottlingBooking(
                booking_pb2.BookingRequest(ProductID=1, FaultInject=fault),
                metadata=(("x-request-id", request_id),),
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            trailers = {key: str(value) for key, value in exc.trailing_metadata() or ()}
            return Answer(request_id, exc.code(), details=exc.details() or "", trailers=trailers)
        return Answer(request_id, grpc.StatusCode.OK, response)

    async def admission(self) -> str:
        answer = await self.health.Check(
            health_pb2.HealthCheckRequest(service=ADMISSION_SERVICE), timeout=5
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

    async def saga_state(self, request_id: str) -> SagaState | None:
        saga = await self.app.orchestrator.store.get(THROTTLING_BOOKING, request_id)
        return None if saga is None else saga.state

    def refused(self, cause: str) -> float:
        value = self.app.orchestrator.metrics.registry.get_sample_value(
            "orchestrator_calls_refused_total", {"facade": THROTTLING_BOOKING, "cause": cause}
        )
        return value or 0.0

    def assert_no_trace(self, request_id: str) -> None:
        """Nothing in either ledger for `request_id`."""
        assert self.upstreams.order.ledger.orders_of(request_id) == [], request_id
        assert self.upstreams.payment.ledger.payments_of(request_id) == [], request_id

    def assert_booked(self, answer: Answer) -> None:
        """The answer names the one order and the one payment the ledgers hold for it."""
        assert answer.code == grpc.StatusCode.OK, answer
        assert answer.response is not None
        [order] = self.upstreams.order.ledger.orders_of(answer.request_id)
        [payment] = self.upstreams.payment.ledger.payments_of(answer.request_id)
        assert (order.status, payment.status) == ("CREATED", "PAID")
        assert (answer.response.OrderID, answer.response.PaymentID) == (order.id, payment.id)


@contextlib.asynccontextmanager
async def serving(
    rabbitmq_url: str,
    *,
    latency_ms: float,
    topics: dict[str, dict[str, int]],
    sagas: dict[str, Any] | None = None,
) -> AsyncIterator[Service]:
    """The booking service on this test's topics of the shared RabbitMQ, deleted after."""
    broker = make_settings(rabbitmq_url, topics=topics)
    async with running_upstreams(latency_ms=latency_ms) as upstreams:
        settings = app_settings(upstreams, broker).model_copy(
            update={
                "sagas": SagaSettings.model_validate(
                    {"retry_pushback_seconds": PUSHBACK_SECONDS, **(sagas or {})}
                )
            }
        )
        try:
            async with (
                run_booking_app(settings) as app,
                grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel,
            ):
                yield Service(
                    app,
                    booking_pb2_grpc.BookingServiceStub(channel),
                    health_pb2_grpc.HealthStub(channel),
                    upstreams,
                )
        finally:
            await delete_topology(broker, frozenset(BOOKING_TOPICS))


PACED = {
    THROTTLING_CREATE_ORDER: {"concurrency": 8},
    THROTTLING_CREATE_PAYMENT: {"concurrency": 8},
    CANCEL_THROTTLING_BOOKING: {"concurrency": 8},
}


async def test_300_concurrent_calls_reach_each_upstream_8_at_a_time_and_all_get_their_outcome(
    rabbitmq_url: str,
) -> None:
    async with serving(rabbitmq_url, latency_ms=20, topics=PACED) as service:
        ids = [f"paced-{i}" for i in range(300)]
        async with asyncio.timeout(CALL_TIMEOUT + 10):
            answers = await asyncio.gather(*(service.book(rid) for rid in ids))

        for answer in answers:
            service.assert_booked(answer)
        assert {await service.saga_state(rid) for rid in ids} == {SagaState.COMPLETED}
        # The topics' concurrency, and no more, reached each upstream at once.
        assert service.upstreams.order.calls.peak == 8
        assert service.upstreams.payment.calls.peak == 8


async def test_a_fault_injected_call_is_failed_precondition_once_its_order_is_cancelled(
    rabbitmq_url: str,
) -> None:
    async with serving(rabbitmq_url, latency_ms=0, topics=PACED) as service:
        answer = await service.book("declined-1", fault=True)

        # Read at once: the rollback had run before the answer.
        [order] = service.upstreams.order.ledger.orders_of("declined-1")
        assert answer.code == grpc.StatusCode.FAILED_PRECONDITION, answer
        assert "payment declined" in answer.details and "declined-1" in answer.details
        assert order.status == "CANCELLED"
        assert service.upstreams.payment.ledger.payments_of("declined-1") == []
        assert await service.saga_state("declined-1") == SagaState.COMPENSATED


async def test_calls_past_max_in_flight_are_resource_exhausted_with_a_pushback_and_no_trace(
    rabbitmq_url: str,
) -> None:
    sagas = {"facades": {THROTTLING_BOOKING: {"max_in_flight": 10}}}
    async with serving(rabbitmq_url, latency_ms=1500, topics=PACED, sagas=sagas) as service:
        assert await service.admission() == "SERVING"
        first = [asyncio.create_task(service.book(f"held-{i}")) for i in range(10)]
        async with asyncio.timeout(10):
            while service.upstreams.order.calls.in_progress < 8:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        saturated = await service.admission()
        refused = await asyncio.gather(*(service.book(f"over-{i}") for i in range(20)))
        async with asyncio.timeout(CALL_TIMEOUT):
            held = await asyncio.gather(*first)

        assert saturated == "NOT_SERVING"
        assert await service.admission() == "SERVING"
        for answer in refused:
            assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
            assert answer.trailers == {RETRY_PUSHBACK_TRAILER: "300"}
            assert "max_in_flight" in answer.details and answer.request_id in answer.details
            assert await service.saga_state(answer.request_id) is None
            service.assert_no_trace(answer.request_id)
        assert service.refused("max_in_flight") == 20
        for answer in held:
            service.assert_booked(answer)


async def test_calls_past_the_first_topics_length_limit_are_resource_exhausted_and_no_trace(
    rabbitmq_url: str,
) -> None:
    topics = {**PACED, THROTTLING_CREATE_ORDER: {"concurrency": 1, "max_length": 4}}
    async with serving(rabbitmq_url, latency_ms=100, topics=topics) as service:
        # A call every 20 ms, one order taken every 100 ms: the queue fills up. (RabbitMQ
        # refuses publishes once it knows the queue is over its limit: a burst that
        # arrives all at once can overshoot it.)
        calls = []
        for i in range(40):
            calls.append(asyncio.create_task(service.book(f"queued-{i}")))
            await asyncio.sleep(0.02)
        async with asyncio.timeout(CALL_TIMEOUT + 10):
            answers = await asyncio.gather(*calls)

        codes = Counter(answer.code for answer in answers)
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        for answer in answers:
            if answer.code == grpc.StatusCode.OK:
                service.assert_booked(answer)
                continue
            assert answer.trailers == {RETRY_PUSHBACK_TRAILER: "300"}
            assert "is full" in answer.details, answer
            assert await service.saga_state(answer.request_id) is None
            service.assert_no_trace(answer.request_id)
        assert service.refused("queue_full") == codes[grpc.StatusCode.RESOURCE_EXHAUSTED]


# --- a replica killed while its caller waits ------------------------------------------------


def replica_config(
    folder: Path, upstreams: Upstreams, broker: BrokerSettings, store_url: str
) -> tuple[Path, str]:
    """An app.yaml for `python main.py` on a free port, the shared broker and store."""
    port = free_port()
    config = {
        "grpc": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 2},
        "broker": {
            "url": broker.url.get_secret_value(),
            "topic_prefix": broker.topic_prefix,
            "topics": PACED,
        },
        "upstreams": {
            "order": {"address": upstreams.order.target},
            "payment": {"address": upstreams.payment.target},
            "timeout_seconds": 10,
        },
        "embedded_upstreams": {},
        "store": {"url": store_url, "heartbeat_seconds": 0.5, "lease_seconds": 2},
        "log_level": "INFO",
    }
    folder.mkdir()
    path = folder / "app.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, f"127.0.0.1:{port}"


async def test_a_replica_killed_while_its_caller_waits_the_retry_on_another_gets_the_outcome(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path
) -> None:
    broker = make_settings(rabbitmq_url)
    # The payment takes 3 s: the replica that accepted the call dies while it is under way.
    async with running_upstreams() as fast, running_upstreams(latency_ms=3000) as slow:
        upstreams = Upstreams(fast.order, slow.payment, fast.order_stub, slow.payment_stub)
        (config_a, target_a), (config_b, target_b) = (
            replica_config(tmp_path / name, upstreams, broker, postgres_url) for name in "ab"
        )
        doomed = start_main(config=config_a, cwd=tmp_path / "a")
        survivor = start_main(config=config_b, cwd=tmp_path / "b")
        try:
            for process, target in ((doomed, target_a), (survivor, target_b)):
                await asyncio.to_thread(wait_for_serving, target, process)
            async with (
                grpc.aio.insecure_channel(target_a) as to_doomed,
                grpc.aio.insecure_channel(target_b) as to_survivor,
            ):
                request = booking_pb2.BookingRequest(ProductID=1)
                metadata = (("x-request-id", "waited-on"),)
                accepted = asyncio.ensure_future(
                    booking_pb2_grpc.BookingServiceStub(to_doomed).HandleThrottlingBooking(
                        request, metadata=metadata, timeout=CALL_TIMEOUT
                    )
                )
                async with asyncio.timeout(20):
                    while slow.payment.calls.in_progress == 0:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                doomed.send_signal(signal.SIGKILL)
                await asyncio.to_thread(doomed.wait, 10)
                with pytest.raises(grpc.aio.AioRpcError) as lost:
                    await accepted
                assert lost.value.code() == grpc.StatusCode.UNAVAILABLE

                # The caller retries the same request on the other replica: it waits on the
                # same saga, which goes on there.
                answer = await booking_pb2_grpc.BookingServiceStub(
                    to_survivor
                ).HandleThrottlingBooking(request, metadata=metadata, timeout=CALL_TIMEOUT)
            log = survivor.output()
        finally:
            doomed.close()
            survivor.close()
            await delete_topology(broker, frozenset(BOOKING_TOPICS))

        [order] = upstreams.order.ledger.orders_of("waited-on")
        [payment] = upstreams.payment.ledger.payments_of("waited-on")
        assert (answer.OrderID, answer.PaymentID) == (order.id, payment.id)
        assert (order.status, payment.status) == ("CREATED", "PAID")
        assert "saga completed request_id=waited-on facade=ThrottlingBooking" in log
