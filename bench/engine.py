"""The engine's own cost: a saga through its facade and its store, without gRPC.

A 2-step facade whose nodes only set a field (each after one
`await asyncio.sleep(0)`, as a call would yield) runs on an orchestrator built
as users build one (the in-memory broker, the store named by ``--store``: a
fresh SQLite file per run by default, as users run it), 64 callers at once. The
baseline is the same two nodes awaited by hand. What the facade adds, per
saga, is then the engine: the idempotent begin, the journal's durable
writes, retries and timeouts, metrics, the change feed; with
``--facade throttling`` also the hops through the (in-memory) broker, the
journal's check of each hop and the caller's wait for the saga's end. The figures are this
process's CPU time over the sagas run (every thread included: SQLite's
checkpoints run on one), so they stay comparable on a busy machine where
throughput does not.

With ``--broker amqp://...`` (``--facade throttling`` only) the hops go through
RabbitMQ instead: the orchestrator runs on a `RabbitMQBroker`, and the baseline
is the same two hops written by hand on aio-pika (bench/_engine_amqp.py), both
in this process, their queues under a prefix of the invocation and deleted at
the end. The difference is then the broker layer and the journal, without
gRPC, upstreams or a second process.

    .venv/bin/python bench/engine.py [--facade sync|throttling] [--sagas 6000] [--runs 3]
        [--store sqlite|memory|URL] [--broker amqp://guest:guest@127.0.0.1:5672/]

On SQLite, whose statements run on the event loop, each run also says how much of the
framework's CPU per saga went into the store's statements and commits (its writes and the
hops' position reads, as the store counts them in ``WriterStats.loop_seconds``), so what the
journal costs and what the rest of the engine costs can be told apart; the median is given
as ``store_cpu_per_saga_us=X``.

The last line is always ``cpu_per_saga_us=X`` (the median of the framework's
runs); ``bench/ab.py`` compares it between two revisions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from bench._broker import find_database_pid  # noqa: E402
from bench._engine_amqp import deleted_after, hand_written, rabbitmq_broker  # noqa: E402
from bench._spy import add_py_spy_option, compare, record, spy_output  # noqa: E402
from bench.common import new_request_id, tree_cpu_seconds  # noqa: E402
from orchestrator import (  # noqa: E402
    AsyncFacadeContext,
    Context,
    Orchestrator,
    SyncFacade,
    ThrottlingFacade,
)
from orchestrator.broker import Broker, InMemoryBroker  # noqa: E402
from orchestrator.config import BrokerSettings  # noqa: E402
from orchestrator.store import SagaStore, store_from_url  # noqa: E402
from orchestrator.store.sql import SqlSagaStore, WriterStats  # noqa: E402
from pb.booking_pb2 import BookingRequest, BookingSyncResponse  # noqa: E402

FACADE = "SyncBooking"
THROTTLING = "ThrottlingBooking"
HOPS: Final = ("engine_order", "engine_payment")
"""The throttling saga's two topics (with `--broker`, the hand-written queues' names too)."""
Booking = Context[BookingRequest, BookingSyncResponse]


async def create_order(request_id: str, ctx: Booking) -> None:
    """Yield once, as an upstream call would, and record an order."""
    await asyncio.sleep(0)
    ctx.response.OrderID = 7


async def create_payment(request_id: str, ctx: Booking) -> None:
    """Yield once and record a payment."""
    await asyncio.sleep(0)
    ctx.response.PaymentID = 9


class BookingDTO(AsyncFacadeContext):
    """The throttling saga's DTO."""

    product_id: int = 1
    order_id: int = 0
    payment_id: int = 0


async def order_hop(dto: BookingDTO) -> BookingDTO:
    """Yield once and record an order."""
    await asyncio.sleep(0)
    dto.order_id = 7
    return dto


async def payment_hop(dto: BookingDTO) -> BookingDTO:
    """Yield once and record a payment."""
    await asyncio.sleep(0)
    dto.payment_id = 9
    return dto


def register(orchestrator: Orchestrator) -> None:
    """The booking saga's shape, both kinds: two nodes, no compensations."""
    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse)
    flow.use(create_order).use(create_payment)
    orchestrator.register_sync_facade(FACADE, flow)
    throttled = ThrottlingFacade(dto=BookingDTO)
    throttled.use(HOPS[0], order_hop).use(HOPS[1], payment_hop)
    orchestrator.register_throttling_facade(THROTTLING, throttled)


Saga = Callable[[], Awaitable[object]]
"""Runs one saga, of a new request id, to its end."""
SPY_DELAY: Final = 1.0
"""Seconds into the measured phase before py-spy attaches."""


async def callers(count: int, sagas: int, saga: Saga, done: list[int] | None = None) -> float:
    """Run `sagas` sagas with `count` callers at once; the CPU seconds it took. Each saga
    ended is counted in `done[0]`."""
    numbers = iter(range(sagas))
    done = done if done is not None else [0]

    async def caller() -> None:
        for _ in numbers:
            await saga()
            done[0] += 1

    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(count)))
    return time.process_time() - started


async def measure(
    args: argparse.Namespace,
    saga: Saga,
    *,
    warm: bool,
    spy: Path | None,
    database: list[float] | None = None,
    store: tuple[WriterStats, list[float]] | None = None,
) -> float:
    """CPU microseconds per saga of `--sagas` sagas, after as many uncounted if `warm`;
    with `spy`, sampled by py-spy into `spy` for part of the measured phase. With
    `database` (and a local PostgreSQL store), the database server's CPU microseconds per
    saga over the measured phase are appended to it; with `store` (a SQLite store's
    stats and a list), the CPU microseconds per saga its statements took on the loop."""
    sagas: int = args.sagas
    if warm:
        await callers(args.concurrency, sagas, saga)
    if spy is None:
        server = args.database_pid if database is not None else None
        before = None if server is None else tree_cpu_seconds(server)
        store_before = None if store is None else store[0].loop_seconds
        cpu = await callers(args.concurrency, sagas, saga) * 1e6 / sagas
        after = None if server is None else tree_cpu_seconds(server)
        if database is not None and before is not None and after is not None:
            database.append((after - before) * 1e6 / sagas)
        if store is not None and store_before is not None:
            store[1].append((store[0].loop_seconds - store_before) * 1e6 / sagas)
        return cpu
    done = [0]
    running = asyncio.create_task(callers(args.concurrency, sagas, saga, done))
    await asyncio.sleep(SPY_DELAY)
    if running.done():
        print(f"  py-spy: the run ended before it attached, nothing in {spy}", flush=True)
        return await running * 1e6 / sagas
    first, started = done[0], time.monotonic()
    await record(os.getpid(), spy, delay=0, seconds=args.spy_seconds)
    if running.done():
        print(f"  py-spy outlasted the run: {spy}'s units are an estimate", flush=True)
    # The sagas ended while py-spy sampled, scaled to its duration (spawning it took a while).
    units = (done[0] - first) * args.spy_seconds / (time.monotonic() - started)
    spy.with_name(spy.name + ".units").write_text(f"{units:.0f}\n")
    return await running * 1e6 / sagas


def prefixes(tag: str) -> tuple[str, str]:
    """The framework's and the hand-written saga's queue prefixes in the run `tag`."""
    return f"engine.{tag}.f.", f"engine.{tag}.b."


@contextlib.asynccontextmanager
async def orchestrator_on(broker: Broker, store: SagaStore) -> AsyncIterator[Orchestrator]:
    """An orchestrator as users build one (no test kit: no faults armed, the default
    heartbeat and dead-letter rounds) on `broker` and `store`, with the engine's facades;
    closed, with its store, when the block ends."""
    await store.start()
    orchestrator = Orchestrator(broker, store=store)
    try:
        register(orchestrator)
        await orchestrator.start()
        yield orchestrator
    finally:
        await orchestrator.close()


async def framework_run(
    store_url: str,
    tag: str,
    args: argparse.Namespace,
    spy: Path | None,
    *,
    database: list[float] | None = None,
    store_cpu: list[float] | None = None,
) -> float:
    """CPU microseconds per saga through the facade, after a warm-up of as many sagas (on
    RabbitMQ, under the prefixes of the run `tag`); the database's appended to `database`,
    and on SQLite the store's own on the loop to `store_cpu` (see `measure`)."""
    async with contextlib.AsyncExitStack() as stack:
        if args.broker is None:
            broker: Broker = InMemoryBroker(BrokerSettings())
        else:
            prefix, _ = prefixes(tag)
            broker = rabbitmq_broker(args.broker, prefix, args.prefetch)
            await stack.enter_async_context(deleted_after(args.broker, prefix, HOPS))
        store = store_from_url(store_url)
        orchestrator = await stack.enter_async_context(orchestrator_on(broker, store))
        flow = orchestrator.get_sync_facade(FACADE)
        throttled = orchestrator.get_throttling_facade(THROTTLING)

        def throttling() -> Awaitable[object]:
            request_id = new_request_id(tag)
            return throttled.run(request_id, BookingDTO(request_id=request_id))

        def sync() -> Awaitable[object]:
            return flow.run(new_request_id(tag), BookingRequest(ProductID=1))

        saga = throttling if args.facade == "throttling" else sync
        # SQLite's statements run on the loop, and the store counts their CPU (revisions
        # before it did not: ab.py runs this bench on them too).
        stats = store.stats if isinstance(store, SqlSagaStore) else None
        counted = None
        if stats is not None and hasattr(stats, "loop_seconds") and store_cpu is not None:
            counted = (stats, store_cpu) if store_url.startswith("sqlite") else None
        return await measure(args, saga, warm=True, spy=spy, database=database, store=counted)


async def baseline_run(tag: str, args: argparse.Namespace, spy: Path | None) -> float:
    """CPU microseconds per saga of the baseline: the two nodes awaited by hand, or with
    `--broker` the two hops written by hand on aio-pika."""
    if args.broker is not None:
        _, prefix = prefixes(tag)
        async with hand_written(args.broker, prefix, HOPS, args.prefetch) as run:
            return await measure(args, lambda: run(new_request_id(tag)), warm=True, spy=spy)

    async def saga() -> None:
        request = BookingRequest(ProductID=1)
        ctx = Context(new_request_id(tag), request, BookingSyncResponse(), FACADE)
        await create_order(ctx.request_id, ctx)
        await create_payment(ctx.request_id, ctx)

    return await measure(args, saga, warm=False, spy=spy)


def store_url(store: str, directory: Path, run: int) -> str:
    """`--store` as a URL: sqlite gets a fresh file per run."""
    if store == "memory":
        return "memory://"
    if store == "sqlite":
        return f"sqlite+aiosqlite:///{directory / f'run{run}.db'}"
    return store


def print_comparison(spy: Path) -> None:
    """Where the framework's extra time went, by library, per saga (when both sides were
    sampled while sagas ended)."""
    baseline = spy_output(spy, "baseline")
    sides = [spy, baseline]
    units_files = [side.with_name(side.name + ".units") for side in sides]
    if not all(side.exists() for side in sides + units_files):
        return
    first, second = (float(units.read_text()) for units in units_files)
    if first and second:
        print(compare(spy, baseline, (first, second)), flush=True)


async def main(args: argparse.Namespace) -> None:
    framework: list[float] = []
    baseline: list[float] = []
    database: list[float] = []
    store_cpu: list[float] = []
    args.database_pid = find_database_pid(args.store)
    if args.py_spy is not None:  # an earlier invocation's counts would pass for this one's
        for side in (args.py_spy, spy_output(args.py_spy, "baseline")):
            side.with_name(side.name + ".units").unlink(missing_ok=True)
    # Request ids and queue prefixes of this invocation alone: a store given by URL keeps
    # earlier runs' sagas, and a request id seen before would be answered from the journal.
    invocation = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as directory:
        for run in range(1, args.runs + 1):
            url = store_url(args.store, Path(directory), run)
            tag = f"{invocation}-r{run}"
            if args.broker is not None:
                print(f"run {run} prefixes={','.join(prefixes(tag))}", flush=True)
            spy = args.py_spy if run == 1 else None
            framework.append(
                await framework_run(url, tag, args, spy, database=database, store_cpu=store_cpu)
            )
            baseline.append(await baseline_run(tag, args, spy and spy_output(spy, "baseline")))
            print(
                f"run {run}: framework {framework[-1]:.0f} us/saga,"
                f" baseline {baseline[-1]:.0f} us/saga"
                + (f", database {database[-1]:.0f} us/saga" if len(database) == run else ""),
                flush=True,
            )
            if len(store_cpu) == run:
                print(
                    f"  of the framework's, the store's statements and commits on the loop:"
                    f" {store_cpu[-1]:.0f} us/saga",
                    flush=True,
                )
    if args.py_spy is not None:
        print_comparison(args.py_spy)
    if database:
        print(f"database_cpu_per_saga_us={statistics.median(database):.0f}")
    if store_cpu:
        print(f"store_cpu_per_saga_us={statistics.median(store_cpu):.0f}")
    print(f"baseline_cpu_per_saga_us={statistics.median(baseline):.0f}")
    print(f"cpu_per_saga_us={statistics.median(framework):.0f}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--facade", choices=("sync", "throttling"), default="sync", help="the facade's kind"
    )
    parser.add_argument("--sagas", type=int, default=6000, help="sagas per run (and warm-up)")
    parser.add_argument("--runs", type=int, default=3, help="framework+baseline runs")
    parser.add_argument("--concurrency", type=int, default=64, help="callers at once")
    parser.add_argument(
        "--store", default="sqlite", help="memory, sqlite (a fresh file per run) or a URL"
    )
    parser.add_argument(
        "--broker",
        help="an amqp:// URL: the throttling saga's hops through RabbitMQ, against the same "
        "hops by hand on aio-pika (default: the in-memory broker, against the nodes awaited)",
    )
    parser.add_argument(
        "--prefetch", type=int, default=32, help="with --broker: each queue's prefetch"
    )
    add_py_spy_option(parser)
    parser.add_argument(
        "--spy-seconds", type=float, default=4.0, help="with --py-spy: seconds sampled"
    )
    args = parser.parse_args(argv)
    if args.broker is not None and (
        args.facade != "throttling" or not args.broker.startswith("amqp")
    ):
        parser.error("--broker takes an amqp:// URL, with --facade throttling")
    return args


if __name__ == "__main__":
    uvloop.run(main(parse_args(None)))
