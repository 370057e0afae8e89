"""bench/engine.py on RabbitMQ: the throttling saga's hops through a real broker, in process.

The framework side is an `Orchestrator` on a `RabbitMQBroker` (quorum queues,
publisher confirms, the topics' prefetch), its topics under a prefix of the
run. The hand-written side is the same two hops on aio-pika, as
`bench/baseline_throttling.py` writes them, without gRPC: a caller registers a
future and publishes the first hop (persistent, ``mandatory``, confirmed); the
first consumer parses the JSON, runs the node, publishes the second hop
(confirmed) and acks; the second runs its node, acks and resolves the caller's
future. Both run in this one process, so its CPU time per saga is the broker
layer's cost with nothing else in it: no gRPC, no upstreams, no second process
to schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.baseline_async import declare, publish, topology
from bench.common import delete_topology
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings

DELIVERY_LIMIT: Final = 5
"""deployment/local/app.yaml's `delivery_limit`."""
SETTLE_SECONDS: Final = 10.0
"""How long the hand-written side's last hops may take to ack once its callers are done."""

Run = Callable[[str], Awaitable[object]]
"""Runs the hand-written saga of a request id to its end."""


def rabbitmq_broker(url: str, prefix: str, concurrency: int) -> RabbitMQBroker:
    """The framework's broker: RabbitMQ at `url`, topics under `prefix`, each consumed with
    prefetch `concurrency`."""
    return RabbitMQBroker(
        BrokerSettings(
            url=url,
            topic_prefix=prefix,
            default_concurrency=concurrency,
            delivery_limit=DELIVERY_LIMIT,
        )
    )


@contextlib.asynccontextmanager
async def deleted_after(url: str, prefix: str, topics: Sequence[str]) -> AsyncIterator[None]:
    """Delete the framework's topology under `prefix` (`topics`' queues, their dead-letter
    queues, both exchanges) when the block ends; then, if the block raised nothing, raise if
    a queue still held messages (a saga lost or left half-done)."""
    queues = [f"{prefix}{topic}{suffix}" for topic in topics for suffix in ("", ".dlq")]
    try:
        yield
    finally:
        left = await delete_topology(
            url, queues, [f"{prefix}orchestrator", f"{prefix}orchestrator.dlx"]
        )
    if left:
        raise RuntimeError(f"the framework's queues held messages at the end: {left}")


class HandWritten:
    """The two hops on aio-pika, the caller waiting for the second one's end."""

    def __init__(
        self, exchange: aio_pika.abc.AbstractExchange, prefix: str, names: tuple[str, str]
    ) -> None:
        self._exchange = exchange
        self._first = f"{prefix}{names[0]}"
        self._second = f"{prefix}{names[1]}"
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # Hops being handled: the last caller wakes before its first hop's ack is sent.
        self._handling = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def settled(self) -> None:
        """Return once no hop is being handled (every delivery taken so far acked)."""
        await self._idle.wait()

    @contextlib.contextmanager
    def _handled(self) -> Iterator[None]:
        self._handling += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._handling -= 1
            if not self._handling:
                self._idle.set()

    async def run(self, request_id: str) -> dict[str, Any]:
        """Publish the saga's first hop and wait for its last one's end."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            body = {"request_id": request_id, "product_id": 1, "order_id": 0, "payment_id": 0}
            await publish(self._exchange, self._first, body, f"{request_id}:0")
            return await future
        finally:
            self._waiting.pop(request_id, None)

    async def first_hop(self, message: AbstractIncomingMessage) -> None:
        """Run the first node, publish the second hop (confirmed), ack."""
        with self._handled():
            body = json.loads(message.body)
            await asyncio.sleep(0)
            body["order_id"] = 7
            await publish(self._exchange, self._second, body, f"{body['request_id']}:1")
            await message.ack()

    async def second_hop(self, message: AbstractIncomingMessage) -> None:
        """Run the last node, ack, wake the caller."""
        with self._handled():
            body = json.loads(message.body)
            await asyncio.sleep(0)
            body["payment_id"] = 9
            await message.ack()
            future = self._waiting.pop(body["request_id"], None)
            if future is not None and not future.done():
                future.set_result(body)


@contextlib.asynccontextmanager
async def hand_written(
    url: str, prefix: str, names: tuple[str, str], concurrency: int
) -> AsyncIterator[Run]:
    """The hand-written saga on RabbitMQ at `url`, its queues (`names` under `prefix`)
    consumed with prefetch `concurrency`; its topology deleted after (and, if the block
    raised nothing, an error if a queue still held messages)."""
    connection = await aio_pika.connect_robust(url, timeout=10)
    try:
        publishing = await connection.channel(publisher_confirms=True)
        exchange = await declare(publishing, prefix, DELIVERY_LIMIT, names)
        saga = HandWritten(exchange, prefix, names)
        for name, hop in zip(names, (saga.first_hop, saga.second_hop), strict=True):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=concurrency)
            queue = await channel.get_queue(f"{prefix}{name}", ensure=False)
            await queue.consume(hop)
        yield saga.run
        # The callers are done, but a first hop may not have sent its ack yet: closing now
        # would hand its message back to the queue.
        await asyncio.wait_for(saga.settled(), SETTLE_SECONDS)
    finally:
        await connection.close()
        left = await delete_topology(url, *topology(prefix, names))
    if left:
        raise RuntimeError(f"the hand-written queues held messages at the end: {left}")
