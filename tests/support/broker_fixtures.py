"""pytest plugin: a real RabbitMQ and a real NATS JetStream for the tests that need them.

`rabbitmq_url` (session) is, in order of preference: `$RABBITMQ_URL`; a
private node started from the local RabbitMQ install; a testcontainers
RabbitMQ when a Docker engine answers. Without any of them the tests skip,
except under `$CI`, where a missing broker fails them.

Tests share that broker, so each one gets its own `topic_prefix` from
`broker_settings`; `rabbitmq_broker` starts a broker on those settings and
deletes the queues and exchanges it declared afterwards. Tests that stop,
kill or restart the broker use `private_rabbitmq`, a node of their own.

`nats_url` (session) is `$NATS_URL`, else the NATS server of this machine
(127.0.0.1:4222) when it answers, else a private `nats-server` for the
session; tests on it use a unique prefix (and so a stream) each and delete
it. `private_nats` is a server of the test's own.

Behaviour tests take `broker_kind` (module-scoped, one run per real broker)
and get a `BrokerKit` (`broker_kit`) and a module's private server of that
kind (`private_node`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import NoReturn
from urllib.parse import urlsplit

import aio_pika
import pytest
import pytest_asyncio

from orchestrator.broker.base import Broker
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings
from tests.support.brokers import BROKER_KINDS, BrokerKind, BrokerKit, PrivateNode
from tests.support.nats import NatsServer
from tests.support.rabbitmq import RabbitMQNode
from tests.support.tcp_proxy import TcpProxy

_SHARED_NATS = "nats://127.0.0.1:4222"

_CONTAINER_IMAGE = os.environ.get("RABBITMQ_IMAGE", "rabbitmq:3.10")


def skip_or_fail(what: str, reasons: list[str]) -> NoReturn:
    """Skip the test for lack of `what`, or fail it when `$CI` says a broker must be there."""
    message = f"no {what} for broker tests: " + "; ".join(reasons)
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def _container_url(reasons: list[str]) -> Iterator[str | None]:
    try:
        import docker  # type: ignore[import-untyped]
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy
    except ImportError as exc:
        reasons.append(f"testcontainers unusable ({exc})")
        yield None
        return
    try:
        docker.from_env(timeout=3).ping()
    except Exception as exc:
        reasons.append(f"no Docker engine answers ({type(exc).__name__})")
        yield None
        return
    container = (
        DockerContainer(_CONTAINER_IMAGE)
        .with_exposed_ports(5672)
        .waiting_for(LogMessageWaitStrategy("Server startup complete").with_startup_timeout(120))
    )
    try:
        container.start()
    except Exception as exc:
        reasons.append(f"RabbitMQ container {_CONTAINER_IMAGE} did not start ({exc})")
        with contextlib.suppress(Exception):
            container.stop()
        yield None
        return
    try:
        host = container.get_container_host_ip()
        yield f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/"
    finally:
        container.stop()


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """The AMQP URL of a RabbitMQ shared by the whole session."""
    if url := os.environ.get("RABBITMQ_URL"):
        yield url
        return
    reasons: list[str] = []
    if RabbitMQNode.available():
        node = RabbitMQNode()
        try:
            node.start()
        except Exception as exc:
            node.cleanup()
            reasons.append(f"private node did not start ({exc})")
        else:
            try:
                yield node.url
            finally:
                node.cleanup()
            return
    else:
        reasons.append("no RabbitMQ install for a private node")
    with _container_url(reasons) as url:
        if url is not None:
            yield url
            return
    skip_or_fail("RabbitMQ", reasons)


@pytest.fixture
def private_rabbitmq() -> Iterator[RabbitMQNode]:
    """A started RabbitMQ node of the test's own, which it may stop, kill or restart."""
    yield from _started_node()


@pytest.fixture(scope="module")
def module_rabbitmq() -> Iterator[RabbitMQNode]:
    """One private RabbitMQ node for the test module, which every test leaves running and
    without alarm (break only your own connection to it: see `rabbitmq_proxy`)."""
    yield from _started_node()


def _started_node() -> Iterator[RabbitMQNode]:
    if not RabbitMQNode.available():
        skip_or_fail("private RabbitMQ node", ["no RabbitMQ install under /usr/lib/rabbitmq/bin"])
    node = RabbitMQNode()
    try:
        node.start()
        yield node
    finally:
        node.cleanup()


@pytest_asyncio.fixture
async def rabbitmq_proxy(module_rabbitmq: RabbitMQNode) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the module's node, stopped (every connection closed) after the
    test: what a test breaks through it is its own connection."""
    async with TcpProxy("127.0.0.1", module_rabbitmq.port) as running_proxy:
        yield running_proxy


@asynccontextmanager
async def memory_alarm(node: RabbitMQNode) -> AsyncIterator[None]:
    """The node's memory alarm, raised for the block and cleared after it, whatever happened."""
    await node.aset_memory_alarm()
    try:
        yield
    finally:
        await node.aclear_memory_alarm()


def make_settings(url: str, **overrides: object) -> BrokerSettings:
    """Settings for one test: a unique topic prefix, quick reconnects and retries."""
    values: dict[str, object] = {
        "url": url,
        "topic_prefix": f"t{uuid.uuid4().hex[:12]}.",
        "connect_timeout_seconds": 10.0,
        "reconnect_interval_seconds": 0.5,
        "redelivery_delay_seconds": 0.01,
        **overrides,
    }
    return BrokerSettings.model_validate(values)


@pytest.fixture
def broker_settings(rabbitmq_url: str) -> BrokerSettings:
    """Settings on the session's broker with a topic prefix no other test uses."""
    return make_settings(rabbitmq_url)


async def delete_topology(settings: BrokerSettings, topics: frozenset[str]) -> None:
    """Delete the queues of `topics` and the exchanges of `settings.topic_prefix`."""
    connection = await aio_pika.connect(settings.url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        for topic in topics:
            queue = settings.queue_name(topic)
            for name in (queue, f"{queue}.dlq"):
                await channel.queue_delete(name)
        for name in ("orchestrator", "orchestrator.dlx"):
            await channel.exchange_delete(f"{settings.topic_prefix}{name}")


@pytest_asyncio.fixture
async def rabbitmq_broker(broker_settings: BrokerSettings) -> AsyncIterator[RabbitMQBroker]:
    """A started RabbitMQBroker on `broker_settings`; its topology is deleted afterwards."""
    broker = RabbitMQBroker(broker_settings)
    await broker.start()
    try:
        yield broker
    finally:
        topics = broker.declared_topics
        await broker.close()
        await delete_topology(broker_settings, topics)


# -- NATS JetStream ---------------------------------------------------------------------


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    with (
        contextlib.suppress(OSError),
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), 1),
    ):
        return True
    return False


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """The URL of a NATS server with JetStream shared by the whole session."""
    if url := os.environ.get("NATS_URL"):
        yield url
        return
    if _answers(_SHARED_NATS):
        yield _SHARED_NATS
        return
    if not NatsServer.available():
        skip_or_fail("NATS", [f"nothing answers on {_SHARED_NATS}", "no nats-server binary"])
    with NatsServer() as server:
        yield server.url


@pytest.fixture
def private_nats() -> Iterator[NatsServer]:
    """A started NATS server of the test's own, which it may stop, kill or restart."""
    if not NatsServer.available():
        skip_or_fail("private NATS server", ["no nats-server binary"])
    with NatsServer() as server:
        yield server


# -- every real broker ----------------------------------------------------------------


@pytest.fixture(scope="module", params=BROKER_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> BrokerKind:
    """Each real broker in turn (the tests of a module run on one, then on the other)."""
    kind: BrokerKind = request.param
    return kind


@pytest.fixture
def broker_kit(broker_kind: BrokerKind, request: pytest.FixtureRequest) -> BrokerKit:
    """The shared server of `broker_kind`."""
    url = request.getfixturevalue("rabbitmq_url" if broker_kind == "rabbitmq" else "nats_url")
    return BrokerKit(broker_kind, url)


@pytest.fixture(scope="module")
def private_node(broker_kind: BrokerKind) -> Iterator[PrivateNode]:
    """A private server of `broker_kind` for the module, which every test leaves running."""
    if broker_kind == "rabbitmq":
        yield from _started_node()
        return
    if not NatsServer.available():
        skip_or_fail("private NATS server", ["no nats-server binary"])
    with NatsServer(auth=True) as server:
        yield server


@pytest_asyncio.fixture
async def kit_broker(broker_kit: BrokerKit) -> AsyncIterator[Broker]:
    """A started broker of `broker_kind` with a topic prefix of its own; what it declared is
    deleted afterwards."""
    settings = broker_kit.settings()
    broker = broker_kit.broker(settings)
    await broker.start()
    try:
        yield broker
    finally:
        topics = getattr(broker, "declared_topics", frozenset())
        await broker.close()
        await broker_kit.delete(settings, topics)
