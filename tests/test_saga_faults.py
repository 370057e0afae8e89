"""The booking service end to end under broker faults: a half-open link, a memory alarm.

Each test runs the booking app (`main.running_app`) in the test's loop with a
SQLite saga journal in `tmp_path`, the real Order and Payment services over
gRPC, and its broker connection going through a `TcpProxy` to a private
RabbitMQ node shared by the module (each test has its own topic prefix). The
sagas are judged as every saga test here judges them: from the upstream
ledgers (completed or compensated as asked, each order and payment made once,
nothing for a saga that does not exist), from the saga journal (every saga
finished, in the state its request asked for), and from the queues (drained,
dead-letter queues included).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from facade import ASYNC_BOOKING
from main import BookingApp
from main import running_app as run_booking_app
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings, StoreSettings
from orchestrator.store import SagaState
from orchestrator.store.base import SagaStore
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import Upstreams, app_settings
from tests.support.broker_fixtures import make_settings, memory_alarm
from tests.support.rabbitmq import RabbitMQNode
from tests.support.sagas import Load, Outcome
from tests.support.tcp_proxy import TcpProxy
from topic import CANCEL_ASYNC_BOOKING, CANCEL_SYNC_BOOKING, CREATE_ORDER, CREATE_PAYMENT
from upstream.ledger import Ledger

pytestmark = pytest.mark.broker

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REFUSED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
"""How the service may turn a booking away while the broker cannot take it."""
SLACK = 1.0
"""What a loaded 2-core machine may add to a quick answer."""
PUBLISH_TIMEOUT = 5.0
"""`publish_timeout_seconds` of the service under test."""
TOPICS = (CREATE_ORDER, CREATE_PAYMENT, CANCEL_ASYNC_BOOKING, CANCEL_SYNC_BOOKING)


# -- the module's module_rabbitmq, a proxy per test -------------------------------------------


# -- the service under test ----------------------------------------------------------


@dataclass
class Service:
    """The running booking service, as a test reaches it."""

    app: BookingApp
    booking: booking_pb2_grpc.BookingServiceAsyncStub
    health: health_pb2_grpc.HealthAsyncStub

    @property
    def store(self) -> SagaStore:
        return self.app.orchestrator.store

    async def status(self) -> int:
        """The whole server's health (service "")."""
        answer = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return int(answer.status)

    async def health_becomes(self, expected: int, *, within: float) -> float:
        """Seconds until the server's health reads `expected`; fails after `within`."""
        began = time.monotonic()
        try:
            async with asyncio.timeout(within):
                # Polled on purpose: that is what a load balancer sees.
                while await self.status() != expected:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(expected)
            raise AssertionError(f"health not {name} within {within}s") from None
        return time.monotonic() - began


def broker_settings(
    module_rabbitmq: RabbitMQNode, rabbitmq_proxy: TcpProxy, **overrides: object
) -> BrokerSettings:
    """Settings of a topic prefix of the test's own, connecting through `proxy`."""
    return make_settings(
        rabbitmq_proxy.url(module_rabbitmq.url),
        publish_timeout_seconds=PUBLISH_TIMEOUT,
        **overrides,
    )


def direct(settings: BrokerSettings, module_rabbitmq: RabbitMQNode) -> BrokerSettings:
    """The same topics, reached without the proxy: to inspect the queues whatever it does."""
    return settings.model_copy(update={"url": SecretStr(module_rabbitmq.url)})


@asynccontextmanager
async def booking_service(
    tmp_path: Path, upstreams: Upstreams, settings: BrokerSettings
) -> AsyncIterator[Service]:
    """The booking service on `settings`, with a SQLite journal in `tmp_path`; stopped on exit."""
    journal = f"sqlite+aiosqlite:///{tmp_path / 'journal.db'}"
    config = app_settings(upstreams, settings).model_copy(
        update={"store": StoreSettings(url=journal)}
    )
    async with (
        run_booking_app(config) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel,
    ):
        yield Service(
            app,
            booking_pb2_grpc.BookingServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )


@dataclass(frozen=True)
class Answer:
    """How one HandleAsyncBooking call ended, and how long it took the caller."""

    request_id: str
    code: grpc.StatusCode
    details: str
    seconds: float


async def book(
    stub: booking_pb2_grpc.BookingServiceAsyncStub,
    request_id: str,
    *,
    faulty: bool,
    deadline: float,
) -> Answer:
    """One async booking with a gRPC deadline of `deadline` seconds."""
    request = booking_pb2.BookingRequest(ProductID=1, Count=1, FaultInject=faulty)
    began = time.monotonic()
    try:
        await stub.HandleAsyncBooking(
            request, metadata=(("x-request-id", request_id),), timeout=deadline
        )
    except grpc.aio.AioRpcError as exc:
        return Answer(request_id, exc.code(), exc.details() or "", time.monotonic() - began)
    return Answer(request_id, grpc.StatusCode.OK, "", time.monotonic() - began)


# -- judging -------------------------------------------------------------------------


def ledger_request_ids(ledger: Ledger) -> set[str]:
    """Every request id with an order or a payment in `ledger`."""
    return ledger.request_ids()


def effects_not_once(load: Load, upstreams: Upstreams) -> dict[str, tuple[int, int]]:
    """Bookings whose (orders, payments) counts are not (1, 1), or (1, 0) when faulty."""
    orders, payments = upstreams.order.ledger, upstreams.payment.ledger
    wrong = {}
    for request_id in load.request_ids:
        counts = (orders.count_orders(request_id), payments.count_payments(request_id))
        if counts != (1, 0 if load.faulty(request_id) else 1):
            wrong[request_id] = counts
    return wrong


def expected_state(load: Load, request_id: str) -> SagaState:
    return SagaState.COMPENSATED if load.faulty(request_id) else SagaState.COMPLETED


async def journal_not_settled(store: SagaStore, load: Load) -> dict[str, str]:
    """Sagas of `load` not (yet) in the state their request asked for, with where they are."""
    wrong = {}
    for request_id in load.request_ids:
        saga = await store.get(ASYNC_BOOKING, request_id)
        if saga is None:
            wrong[request_id] = "no saga"
        elif saga.state != expected_state(load, request_id):
            step = saga.current_step
            where = f" at step {step.index} {step.state}" if step else ""
            wrong[request_id] = f"{saga.state}{where} {saga.error_reason}".strip()
    return wrong


async def journal_request_ids(store: SagaStore) -> set[str]:
    """Every saga's request id in the journal, of any facade."""
    ids: set[str] = set()
    token = ""
    while True:
        page = await store.list_sagas(page_size=500, page_token=token)
        ids.update(saga.request_id for saga in page.sagas)
        token = page.next_page_token
        if not token:
            return ids


async def settle(service: Service, upstreams: Upstreams, load: Load, *, within: float) -> None:
    """Wait until every booking of `load` ended as asked in the ledgers and the journal."""
    await load.settle(upstreams.order.ledger, upstreams.payment.ledger, within=within)
    try:
        async with asyncio.timeout(within):
            # Polled: the journal's changes are another component's state.
            while await journal_not_settled(service.store, load):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    except TimeoutError:
        wrong = await journal_not_settled(service.store, load)
        sample = dict(list(wrong.items())[:10])
        raise AssertionError(f"{len(wrong)} sagas not finished as asked: {sample}") from None


async def ready_messages(settings: BrokerSettings) -> dict[str, int]:
    """Messages ready in each topic's queue (empty dict: none)."""
    inspector = RabbitMQBroker(settings)
    await inspector.start()
    try:
        return {topic: depth for topic in TOPICS if (depth := await inspector.depth(topic))}
    finally:
        await inspector.close()


async def messages_left(settings: BrokerSettings) -> list[str]:
    """Every message left in a topic's queue or dead-letter queue, described (empty: none).

    It takes them off their queues: call it once, at the end, with the service stopped.
    """
    left = []
    connection = await aio_pika.connect(settings.url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        for topic in TOPICS:
            try:
                queue = await channel.declare_queue(settings.queue_name(topic), passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()
                continue
            while (message := await queue.get(fail=False, timeout=5)) is not None:
                count = message.headers.get("x-delivery-count", 0)
                left.append(f"{topic}: {message.message_id} (earlier deliveries: {count!r})")
                await message.ack()
    inspector = RabbitMQBroker(settings)
    await inspector.start()
    try:
        for topic in TOPICS:
            left += [
                f"{topic}.dlq: {dead.message_id} ({dead.reason})"
                for dead in await inspector.dead_letters(topic)
            ]
    finally:
        await inspector.close()
    return left


async def queues_empty_soon(settings: BrokerSettings, *, within: float = 15.0) -> None:
    """Wait until no topic queue holds a ready message (the service drains the last ones)."""
    left: dict[str, int] = {}
    try:
        async with asyncio.timeout(within):
            while left := await ready_messages(settings):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"queues not drained within {within}s: {left}") from None


# -- a half-open link ----------------------------------------------------------------

HALF_OPEN_BOOKINGS = 40
CALL_DEADLINE = 3.0


@pytest.mark.timeout(120)
async def test_a_connection_gone_half_open_with_publishes_in_flight_answers_every_caller_in_time(
    module_rabbitmq: RabbitMQNode, rabbitmq_proxy: TcpProxy, upstreams: Upstreams, tmp_path: Path
) -> None:
    # A 2 s heartbeat: the silent link is given up after about (2 + 1) * 3 s.
    settings = broker_settings(module_rabbitmq, rabbitmq_proxy, heartbeat_seconds=2)
    load = Load(size=HALF_OPEN_BOOKINGS, fault_every=4)
    async with booking_service(tmp_path, upstreams, settings) as service:
        assert await service.status() == SERVING
        # The link goes silent the moment half of the 40 sagas are in the journal: a saga is
        # recorded once its first hop is confirmed, so the others' first hops are then in
        # flight (or not yet sent).
        ids = set(load.request_ids)
        begun: set[str] = set()

        def on_change(facade: str, request_id: str) -> None:
            if facade == ASYNC_BOOKING and request_id in ids and request_id not in begun:
                begun.add(request_id)
                if len(begun) == len(ids) // 2:
                    rabbitmq_proxy.blackhole()

        service.app.orchestrator.on_saga_change(on_change)
        async with asyncio.timeout(CALL_DEADLINE + 5):
            answers = await asyncio.gather(
                *(
                    book(service.booking, rid, faulty=load.faulty(rid), deadline=CALL_DEADLINE)
                    for rid in load.request_ids
                )
            )
        assert rabbitmq_proxy.mode == "blackhole", f"only {len(begun)} sagas began"

        codes = Counter(answer.code for answer in answers)
        late = [a for a in answers if a.code == grpc.StatusCode.DEADLINE_EXCEEDED]
        assert not late, f"{len(late)} callers got no answer in time: {codes}"
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, answers
        failed = [a for a in answers if a.code != grpc.StatusCode.OK]
        assert failed, "no publish was in flight when the link went silent"
        assert all(a.seconds < CALL_DEADLINE for a in answers), max(a.seconds for a in answers)
        for answer in failed:
            assert answer.request_id in answer.details, answer

        # The heartbeat finds the link dead; once it forwards again the broker reconnects.
        await service.health_becomes(NOT_SERVING, within=20)
        rabbitmq_proxy.restore()
        await service.health_becomes(SERVING, within=30)

        # Each caller turned away retries with its request id and payload, once.
        async with asyncio.timeout(CALL_DEADLINE + 5):
            retries = await asyncio.gather(
                *(
                    book(
                        service.booking, a.request_id, faulty=load.faulty(a.request_id), deadline=5
                    )
                    for a in failed
                )
            )
        assert all(r.code == grpc.StatusCode.OK for r in retries), [
            r for r in retries if r.code != grpc.StatusCode.OK
        ]

        await settle(service, upstreams, load, within=60)
        await queues_empty_soon(direct(settings, module_rabbitmq))
        assert await journal_request_ids(service.store) == set(load.request_ids)

    tally = load.tally(upstreams.order.ledger, upstreams.payment.ledger)
    assert tally[Outcome.COMPLETED] == 30 and tally[Outcome.COMPENSATED] == 10, tally
    assert effects_not_once(load, upstreams) == {}
    assert ledger_request_ids(upstreams.order.ledger) <= set(load.request_ids)
    assert ledger_request_ids(upstreams.payment.ledger) <= set(load.request_ids)
    # Stopped: whatever was unacknowledged went back to its queue and would be counted.
    assert await messages_left(direct(settings, module_rabbitmq)) == []


# -- a memory alarm ------------------------------------------------------------------

PACE_SECONDS = 0.1
"""A new booking starts this often while the load runs."""
RETRY_AFTER_SECONDS = 0.25
MAX_BOOKINGS = 300


@dataclass
class PacedLoad:
    """Bookings started one every PACE_SECONDS until stopped; each retried until accepted.

    A client that is turned away (UNAVAILABLE, RESOURCE_EXHAUSTED) retries with
    the same request id and payload, as a client should; any other error fails
    the load. Every 4th booking asks for a fault. Ids are those of
    `Load(prefix=...)`, so a `Load` judges them afterwards.
    """

    stub: booking_pb2_grpc.BookingServiceAsyncStub
    prefix: str = field(default_factory=lambda: f"alarm-{uuid.uuid4().hex[:8]}")
    started: list[str] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    refusals: Counter[grpc.StatusCode] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _rule: Load = field(init=False)

    def __post_init__(self) -> None:
        self._rule = Load(size=0, fault_every=4, prefix=self.prefix)

    def judged(self) -> Load:
        """The bookings started, as a `Load` to judge them."""
        return Load(size=len(self.started), fault_every=4, prefix=self.prefix)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            while not self.stop.is_set() and len(self.started) < MAX_BOOKINGS:
                request_id = f"{self.prefix}-{len(self.started)}"
                self.started.append(request_id)
                group.create_task(self._one(request_id))
                await asyncio.sleep(PACE_SECONDS)

    async def accepted_at_least(self, count: int) -> None:
        while len(self.accepted) < count:  # noqa: ASYNC110 (a few polls, in a bounded test)
            await asyncio.sleep(0.02)

    async def _one(self, request_id: str) -> None:
        faulty = self._rule.faulty(request_id)
        while True:
            answer = await book(self.stub, request_id, faulty=faulty, deadline=CALL_DEADLINE)
            if answer.code == grpc.StatusCode.OK:
                self.accepted.add(request_id)
                return
            if answer.code not in REFUSED:
                raise AssertionError(f"booking {request_id} failed: {answer}")
            self.refusals[answer.code] += 1
            await asyncio.sleep(RETRY_AFTER_SECONDS)


PROBES = 5


@pytest.mark.timeout(120)
async def test_a_memory_alarm_turns_health_not_serving_fails_new_calls_fast_and_accepted_sagas_finish_after(  # noqa: E501
    module_rabbitmq: RabbitMQNode, rabbitmq_proxy: TcpProxy, upstreams: Upstreams, tmp_path: Path
) -> None:
    settings = broker_settings(module_rabbitmq, rabbitmq_proxy)
    probes = [f"probe-{uuid.uuid4().hex[:8]}-{i}" for i in range(PROBES)]
    async with booking_service(tmp_path, upstreams, settings) as service:
        assert await service.status() == SERVING
        paced = PacedLoad(service.booking)
        loading = asyncio.create_task(paced.run())
        try:
            async with asyncio.timeout(20):
                await paced.accepted_at_least(10)
            async with memory_alarm(module_rabbitmq):
                # RabbitMQ blocks the connection at its next publish: the load's first
                # hops and the hops of the sagas in flight publish all the time.
                await service.health_becomes(NOT_SERVING, within=5)
                accepted_before_probes = set(paced.accepted)

                probed = []
                for request_id in probes:
                    probed.append(
                        await book(service.booking, request_id, faulty=False, deadline=10)
                    )
                assert all(p.code in REFUSED for p in probed), probed
                assert all(
                    request_id in p.details for request_id, p in zip(probes, probed, strict=True)
                ), probed
                # Refused at once, not after a publish timed out.
                assert max(p.seconds for p in probed) < SLACK, probed
                assert await service.status() == NOT_SERVING

            await service.health_becomes(SERVING, within=15)
            # The service takes bookings again: a few more, then the load stops starting new ones.
            async with asyncio.timeout(20):
                await paced.accepted_at_least(len(paced.accepted) + 3)
            paced.stop.set()
            async with asyncio.timeout(30):
                await loading
        finally:
            paced.stop.set()
            if not loading.done():
                loading.cancel()
                await asyncio.gather(loading, return_exceptions=True)

        load = paced.judged()
        assert paced.accepted == set(load.request_ids)
        # The alarm did turn bookings away, and some sagas were accepted before it.
        assert sum(paced.refusals.values()) > 0, "no booking was refused during the alarm"
        assert accepted_before_probes
        await settle(service, upstreams, load, within=60)
        await queues_empty_soon(direct(settings, module_rabbitmq))
        # The probes were refused before anything was recorded: no saga, and the journal
        # holds the load's sagas only.
        for request_id in probes:
            assert await service.store.get(ASYNC_BOOKING, request_id) is None
        assert await journal_request_ids(service.store) == set(load.request_ids)

    orders, payments = upstreams.order.ledger, upstreams.payment.ledger
    assert effects_not_once(load, upstreams) == {}
    for request_id in probes:
        assert orders.orders_of(request_id) == [] and payments.payments_of(request_id) == []
    assert ledger_request_ids(orders) <= set(load.request_ids)
    assert ledger_request_ids(payments) <= set(load.request_ids)
    assert await messages_left(direct(settings, module_rabbitmq)) == []
