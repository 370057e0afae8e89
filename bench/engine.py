"""The engine's own cost: a saga through its facade and its store, without gRPC.

A 2-step facade whose nodes only set a field (each after one
`await asyncio.sleep(0)`, as a call would yield) runs on a `SagaKit`
orchestrator (the in-memory broker, the store named by ``--store``: a fresh
SQLite file per run by default, as users run it), 64 callers at once. The
baseline is the same two nodes awaited by hand. What the facade adds, per
saga, is then the engine: the idempotent begin, the journal's durable
writes, retries and timeouts, metrics, the change feed; with
``--facade throttling`` also the hops through the (in-memory) broker, the
journal's check of each hop and the caller's wait for the saga's end. The figures are this
process's CPU time over the sagas run (every thread included: SQLite's
checkpoints run on one), so they stay comparable on a busy machine where
throughput does not.

    .venv/bin/python bench/engine.py [--facade sync|throttling] [--sagas 6000] [--runs 3]
        [--store sqlite|memory|URL]

The last line is always ``cpu_per_saga_us=X`` (the median of the framework's
runs); ``bench/ab.py`` compares it between two revisions.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from orchestrator import (  # noqa: E402
    AsyncFacadeContext,
    Context,
    Orchestrator,
    SyncFacade,
    ThrottlingFacade,
)
from orchestrator.testing import SagaKit  # noqa: E402
from pb.booking_pb2 import BookingRequest, BookingSyncResponse  # noqa: E402

FACADE = "SyncBooking"
THROTTLING = "ThrottlingBooking"
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
    throttled.use("engine_order", order_hop).use("engine_payment", payment_hop)
    orchestrator.register_throttling_facade(THROTTLING, throttled)


async def callers(count: int, sagas: int, saga: Callable[[int], Awaitable[object]]) -> float:
    """Run `sagas` sagas with `count` callers at once; the CPU seconds it took."""
    numbers = iter(range(sagas))

    async def caller() -> None:
        for number in numbers:
            await saga(number)

    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(count)))
    return time.process_time() - started


async def framework_run(store_url: str, tag: str, args: argparse.Namespace) -> float:
    """CPU microseconds per saga through the facade, after a warm-up of as many sagas."""
    async with SagaKit(register, store_url=store_url, timeout=120) as kit:
        flow = kit.orchestrator.get_sync_facade(FACADE)
        throttled = kit.orchestrator.get_throttling_facade(THROTTLING)

        def saga(phase: str) -> Callable[[int], Awaitable[object]]:
            if args.facade == "throttling":
                return lambda n: throttled.run(
                    f"{tag}-{phase}-{n}", BookingDTO(request_id=f"{tag}-{phase}-{n}")
                )
            return lambda n: flow.run(f"{tag}-{phase}-{n}", BookingRequest(ProductID=1))

        await callers(args.concurrency, args.sagas, saga("warm"))
        cpu = await callers(args.concurrency, args.sagas, saga("run"))
    return cpu / args.sagas * 1e6


async def baseline_run(args: argparse.Namespace) -> float:
    """CPU microseconds per saga of the two nodes awaited by hand."""

    async def saga(number: int) -> None:
        ctx = Context(str(number), BookingRequest(ProductID=1), BookingSyncResponse(), FACADE)
        await create_order(ctx.request_id, ctx)
        await create_payment(ctx.request_id, ctx)

    cpu = await callers(args.concurrency, args.sagas, saga)
    return cpu / args.sagas * 1e6


def store_url(store: str, directory: Path, run: int) -> str:
    """`--store` as a URL: sqlite gets a fresh file per run."""
    if store == "memory":
        return "memory://"
    if store == "sqlite":
        return f"sqlite+aiosqlite:///{directory / f'run{run}.db'}"
    return store


async def main(args: argparse.Namespace) -> None:
    framework: list[float] = []
    baseline: list[float] = []
    # Request ids of this invocation alone: a store given by URL keeps earlier runs' sagas,
    # and a request id seen before would be answered from the journal, not run.
    invocation = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as directory:
        for run in range(1, args.runs + 1):
            url = store_url(args.store, Path(directory), run)
            framework.append(await framework_run(url, f"{invocation}-r{run}", args))
            baseline.append(await baseline_run(args))
            print(
                f"run {run}: framework {framework[-1]:.0f} us/saga,"
                f" baseline {baseline[-1]:.0f} us/saga",
                flush=True,
            )
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
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args(None)))
