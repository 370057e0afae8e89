"""What broker tests observe: deliveries received, health changes, dead letters, logs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from orchestrator.broker.base import Broker, DeadLetteredMessage, Delivery

__all__ = [
    "assert_not_logged",
    "collect_dead_letters",
    "health_changes",
    "next_change",
    "receive",
    "recorder",
]


def health_changes(broker: Broker) -> asyncio.Queue[bool]:
    """Every change of `broker.healthy` from now on, in order."""
    changes: asyncio.Queue[bool] = asyncio.Queue()
    broker.add_health_listener(changes.put_nowait)
    return changes


async def next_change(changes: asyncio.Queue[bool], expected: bool, within: float) -> None:
    """Wait until health changes to `expected`; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while (await changes.get()) is not expected:
            pass


async def collect_dead_letters(
    broker: Broker, topic: str, count: int, within: float = 10
) -> list[DeadLetteredMessage]:
    """At least `count` dead letters of `topic`, taken from the broker; fail after `within`."""
    # No broker gives an event for "a message was dead-lettered": poll.
    found: list[DeadLetteredMessage] = []
    async with asyncio.timeout(within):
        while len(found) < count:
            found += await broker.dead_letters(topic)  # type: ignore[attr-defined]
            if len(found) < count:
                await asyncio.sleep(0.05)
    return found


def recorder() -> tuple[asyncio.Queue[Delivery], Callable[[Delivery], Awaitable[None]]]:
    """A handler that records every delivery, and the queue it records them in."""
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        received.put_nowait(delivery)

    return received, handler


async def receive(received: asyncio.Queue[Delivery], within: float = 10) -> Delivery:
    """The next recorded delivery; fail after `within` seconds."""
    async with asyncio.timeout(within):
        return await received.get()


def assert_not_logged(secret: str, caplog: pytest.LogCaptureFixture) -> None:
    """Neither the formatted records (tracebacks included) nor any extra field holds `secret`."""
    # caplog.text holds every record as formatted when it was emitted, tracebacks
    # included; formatting again later can fail on library objects since torn down.
    assert secret not in caplog.text
    for record in caplog.records:
        for name, value in vars(record).items():
            try:
                text = repr(value)
            except Exception:  # some library objects cannot repr themselves half-closed
                continue
            assert secret not in text, f"{secret!r} leaked through {record.name}:{name}"
