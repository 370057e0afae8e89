"""The broker side of the booking benches: its settings, its process, its queues or streams.

RabbitMQ (`amqp://`) or NATS JetStream (`nats://`): the framework's broker
section comes from deployment/local/app.yaml with the bench's URL and a topic
prefix of the run's own; what both sides declared is deleted at the end, and
`settle` waits for a target's backlog to drain between open-loop runs.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aio_pika
import nats
import nats.js.errors
import uvloop
import yaml

from bench.baseline_async import topology as baseline_topology
from bench.common import (
    ROOT,
    TARGETS,
    UPSTREAM_TIMEOUT_SECONDS,
    Target,
    delete_topology,
    framework_topology,
    listening_sockets,
)
from orchestrator.broker.nats import NatsBroker
from orchestrator.config import BrokerSettings

LOCAL_CONFIG: Final = ROOT / "deployment" / "local" / "app.yaml"
"""Its broker section (concurrency per topic, delivery limit...) is the one the framework runs."""
SETTLE_TIMEOUT_SECONDS: Final = 30.0
"""How long `settle` waits for a target's queues to empty before reporting what is left."""
SETTLE_POLL_SECONDS: Final = 0.2


@dataclass
class Topology:
    """What the bench's targets declared on the broker, to delete at the end."""

    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    """NATS JetStream's (instead of queues and exchanges)."""


def is_nats(url: str) -> bool:
    """True for a NATS JetStream URL."""
    return urlsplit(url).scheme == "nats"


def framework_stream(url: str, prefix: str) -> str:
    """The stream the framework declares under `prefix` (broker/_nats_names.py)."""
    return NatsBroker(BrokerSettings.model_validate({"url": url, "topic_prefix": prefix})).stream


async def delete_streams(url: str, streams: Sequence[str]) -> dict[str, int]:
    """Delete the streams (missing ones are fine); return those that held messages."""
    leftovers: dict[str, int] = {}
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = client.jetstream(timeout=10)
        for stream in streams:
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                continue
            if info.state.messages:
                leftovers[stream] = info.state.messages
            await js.delete_stream(stream)
    finally:
        await client.close()
    return leftovers


async def check_broker_of(url: str) -> None:
    """Connect once, so an unreachable broker fails the bench before anything starts."""
    if is_nats(url):
        client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        await client.close()
        return
    connection = await aio_pika.connect(url, timeout=10)
    await connection.close()


def find_broker_pid(url: str) -> int | None:
    """The pid of the local process listening on `url`'s port, so its CPU can be counted."""
    return local_listener_pid(url, 4222 if is_nats(url) else 5672)


def find_database_pid(store: str) -> int | None:
    """The pid of the local PostgreSQL server (its postmaster, whose children are the
    connections' backends) that `--store` names; None for any other store."""
    if not store.startswith("postgresql"):
        return None
    return local_listener_pid(store, 5432)


def local_listener_pid(url: str, default_port: int) -> int | None:
    """The pid of the process of this machine listening on `url`'s port (`default_port`
    when it names none); None when `url` is not local or nobody listens."""
    parts = urlsplit(url)
    if parts.hostname not in {"127.0.0.1", "localhost", "::1"}:
        return None
    port = parts.port or default_port
    inodes = {f"socket:[{inode}]" for inode in listening_sockets(port)}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


def broker_settings(url: str, prefix: str) -> dict[str, Any]:
    """deployment/local/app.yaml's broker section, on `url` with topic prefix `prefix`."""
    local = yaml.safe_load(LOCAL_CONFIG.read_text(encoding="utf-8"))
    broker = {**local["broker"], "url": url, "topic_prefix": prefix}
    if is_nats(url):  # queue length limits are RabbitMQ's (x-max-length)
        broker["topics"] = {
            topic: {k: v for k, v in settings.items() if k != "max_length"}
            for topic, settings in broker.get("topics", {}).items()
        }
    return broker


def concurrency_of(broker: dict[str, Any], topic: str) -> int:
    """The topic's concurrency (the consumer's prefetch) in a broker section."""
    configured = broker.get("topics", {}).get(topic)
    return int(configured["concurrency"] if configured else broker.get("default_concurrency", 16))


def baseline_options(
    url: str, prefix: str, broker: dict[str, Any], hops: tuple[str, str]
) -> dict[str, str]:
    """A broker baseline's options: the framework's broker settings for the saga's `hops`."""
    return {
        "--timeout-seconds": str(UPSTREAM_TIMEOUT_SECONDS),
        "--nats-url" if is_nats(url) else "--amqp-url": url,
        "--prefix": prefix,
        "--order-prefetch": str(concurrency_of(broker, hops[0])),
        "--payment-prefetch": str(concurrency_of(broker, hops[1])),
        "--delivery-limit": str(broker.get("delivery_limit", 5)),
    }


def rabbitmq_layout(
    prefixes: tuple[str, str], hops: tuple[str, str]
) -> tuple[Topology, dict[Target, list[str]]]:
    """What the framework (`prefixes[0]`) and the baseline (`prefixes[1]`, its queues named
    after the framework's topics `hops`) declare on RabbitMQ, and each target's work queues."""
    queues, exchanges = framework_topology(prefixes[0])
    baseline_queues, baseline_exchanges = baseline_topology(prefixes[1], hops)
    work = {
        target: [f"{prefix}{hop}" for hop in hops]
        for target, prefix in zip(TARGETS, prefixes, strict=True)
    }
    return Topology(queues + baseline_queues, exchanges + baseline_exchanges), work


def clean_up(url: str, topology: Topology) -> dict[str, int] | None:
    """Delete the queues and exchanges (or streams); those that held messages, None on error."""
    try:
        if is_nats(url):
            return uvloop.run(delete_streams(url, topology.streams))
        return uvloop.run(delete_topology(url, topology.queues, topology.exchanges))
    except Exception as exc:
        print(
            f"!!! could not delete the queues and exchanges (or streams) {topology}: {exc!r} !!!",
            file=sys.stderr,
        )
        return None


async def backlog(url: str, names: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each of the queues (or streams) `names` that holds some."""
    held: dict[str, int] = {}
    if is_nats(url):
        client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            js = client.jetstream(timeout=10)
            for stream in names:
                info = await js.stream_info(stream)
                if info.state.messages:
                    held[stream] = info.state.messages
        finally:
            await client.close()
        return held
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in names:
            declared = await channel.declare_queue(queue, passive=True, timeout=10)
            if count := declared.declaration_result.message_count:
                held[queue] = count
    return held


async def settle(url: str, names: Sequence[str]) -> dict[str, int]:
    """Wait until the queues (or streams) `names` hold no message, SETTLE_TIMEOUT_SECONDS at
    most, so the next run does not share the machine with this one's backlog; what is left
    then. (Polled: the broker tells no one when a queue empties.)"""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    held = await backlog(url, names)
    while held and time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_POLL_SECONDS)
        held = await backlog(url, names)
    return held
