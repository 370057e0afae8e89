"""Runs of the booking benches: their results, closed-loop load, the F, B, F, B alternation.

Every bench alternates framework and baseline runs in one invocation; each run
is a `Run` (a closed-loop `CallRun`, an open-loop run of bench/_openloop.py, or
the async bench's own), measured the same way: CPU of each process from
/proc over the run, printed as it ends. Closed-loop runs end in
`summarize_closed`, whose last line is the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench._spy import add_py_spy_option, py_spy_binary, record, spy_output
from bench.common import (
    TARGETS,
    ConsoleWatcher,
    CpuSnapshot,
    Process,
    Target,
    booking_stubs,
    channel_count,
    mean,
    new_request_id,
    noisy_note,
    percentile,
)
from pb import booking_pb2

DEFAULT_CALL_TIMEOUT_SECONDS = 10.0
"""The load generator's deadline on each call: a slow call is a latency, not an error."""
DEFAULT_MAX_OUTSTANDING = 20_000
"""Open loop: the safety limit on calls in progress."""


@dataclass(frozen=True)
class Load:
    """How each run loads its target, from the command line."""

    concurrency: int
    """Closed loop: callers, each calling in a loop."""
    rate: float
    """Open loop (when not 0): calls offered per second."""
    channels: int
    """Channels (connections) the calls go over."""
    warmup: float
    call_timeout: float
    max_outstanding: int
    """Open loop: calls in progress at most (a safety limit)."""
    completion_timeout: float
    """The async bench's: seconds after its submit before a saga counts as never completed."""

    @classmethod
    def of(cls, args: argparse.Namespace) -> Load:
        """The load `args` asks for."""
        return cls(
            args.concurrency,
            args.rate,
            channel_count(args.workers),
            args.warmup,
            args.call_timeout,
            args.max_outstanding,
            getattr(args, "completion_timeout", 0.0),
        )


@dataclass
class Run:
    """One run against one target: what every kind of run reports."""

    target: Target
    number: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    """Seconds of each successful call (or saga) the run's figures count."""
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Failed calls the run's figures count, by status code."""
    never_completed: int = 0
    """Accepted sagas whose end was never seen within the completion timeout."""
    completed: int = 0
    """Successful calls (or sagas) over the whole run, warm-up and drain included: the
    denominator of CPU per call."""
    server_cpu: float | None = None
    """CPU seconds the target's processes used over the whole run (None off Linux)."""
    broker_cpu: float | None = None
    """CPU seconds the broker used over the whole run (None when it is not a local process)."""
    database_cpu: float | None = None
    """CPU seconds the store's database server used over the whole run, all its processes
    (None unless the store is a local PostgreSQL)."""
    foreign_cpus: float | None = None
    """CPUs busy with processes other than the bench's (and the broker's), on average."""

    @property
    def failed(self) -> int:
        """Failures that make the run's figures not comparable."""
        return sum(self.errors.values()) + self.never_completed

    def per_unit(self, cpu_seconds: float | None) -> float | None:
        """`cpu_seconds` per call (or saga) completed over the whole run."""
        return None if cpu_seconds is None or not self.completed else cpu_seconds / self.completed

    unit_name: str = "saga"
    """What `per_unit` divides by, in the `cpus:` line; '' leaves CPU per unit out of it."""

    def cpu_per_unit(self) -> str:
        """`; server 2938us/saga, broker 856us/saga`: the run's CPU per unit, where known."""
        figures = [
            f"{name} {cpu * 1e6:.0f}us/{self.unit_name}"
            for name, seconds in (
                ("server", self.server_cpu),
                ("broker", self.broker_cpu),
                ("database", self.database_cpu),
            )
            if self.unit_name and (cpu := self.per_unit(seconds)) is not None
        ]
        return f"; {', '.join(figures)}" if figures else ""

    def line(self) -> str:
        """The run's line of figures."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Indented lines printed under the run's line and its CPU line."""
        return []


@dataclass
class CallRun(Run):
    """A closed-loop run of an RPC that answers at the end of its work (sync, throttling)."""

    unit: str = "bookings"
    warmup_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Failed calls that ended during the warm-up (not counted in the window)."""

    def __post_init__(self) -> None:
        self.unit_name = self.unit.removesuffix("s")

    @property
    def throughput(self) -> float:
        """Successful calls per second of the window."""
        return len(self.latencies) / self.seconds

    def line(self) -> str:
        """`framework run 1: 1234 bookings/s p50=12.3ms p99=45.6ms errors=0`."""
        errors = sum(self.errors.values())
        detail = f" ({', '.join(f'{k}={v}' for k, v in sorted(self.errors.items()))})"
        return (
            f"{self.target} run {self.number}: {self.throughput:.0f} {self.unit}/s"
            f" p50={percentile(self.latencies, 0.50) * 1000:.1f}ms"
            f" p99={percentile(self.latencies, 0.99) * 1000:.1f}ms"
            f" errors={errors}{detail + '  <<< !!! FAILED CALLS !!!' if errors else ''}"
        )

    def notes(self) -> list[str]:
        """A warning for calls that failed during the warm-up."""
        if not self.warmup_errors:
            return []
        return [
            f"  !!! {sum(self.warmup_errors.values())} failed calls during the"
            f" warm-up: {dict(self.warmup_errors)}"
        ]


async def call_loop(result: CallRun, address: str, method: str, run_id: str, load: Load) -> None:
    """Call `method` (BookingService's, ProductID 1) from `load.concurrency` callers in a loop
    over `load.channels` channels (connections) for the warm-up + the window, each call with a
    unique `x-request-id`; count the calls that end inside the window."""
    request = booking_pb2.BookingRequest(ProductID=1)
    clock = time.perf_counter
    async with booking_stubs(address, load.channels) as stubs:
        window_start = clock() + load.warmup
        window_end = window_start + result.seconds

        async def caller(worker: int) -> None:
            rpc = getattr(stubs[worker % len(stubs)], method)
            while (started := clock()) < window_end:
                metadata = (("x-request-id", new_request_id(run_id)),)
                try:
                    await rpc(request, metadata=metadata, timeout=load.call_timeout)
                except grpc.aio.AioRpcError as exc:
                    done = clock()
                    if window_start <= done <= window_end:
                        result.errors[exc.code().name] += 1
                    elif done < window_start:
                        result.warmup_errors[exc.code().name] += 1
                    continue
                done = clock()
                result.completed += 1
                if window_start <= done <= window_end:
                    result.latencies.append(done - started)

        await asyncio.gather(*(caller(worker) for worker in range(load.concurrency)))


def cpu_line(
    before: CpuSnapshot, after: CpuSnapshot, pids: Mapping[str, int], foreign: float | None
) -> str:
    """`  cpus: bench 0.31 order 0.20 ... other 0.05`: where the machine's CPU went."""
    wall = after.wall - before.wall
    parts = [
        f"{name} {used / wall:.2f}"
        for name, pid in pids.items()
        if (used := before.used(after, pid)) is not None and wall > 0
    ]
    if foreign is not None:
        parts.append(f"other {foreign:.2f}")
    return "  cpus: " + " ".join(parts)


async def alternate(
    args: argparse.Namespace,
    processes: Mapping[str, Process],
    named_pids: Mapping[str, int],
    run_one: Callable[[Target, int], Awaitable[Run]],
    *,
    broker_pid: int | None = None,
    database_pid: int | None = None,
    console_address: str | None = None,
) -> list[Run]:
    """`args.pairs` pairs of runs, framework then baseline, each measured and printed as it
    ends (with `--console`, one live page of the framework's console open throughout)."""
    pids = list(named_pids.values())
    results: list[Run] = []
    watcher = ConsoleWatcher(console_address) if console_address else None
    if watcher is not None:
        watcher.start()
    for pair in range(1, args.pairs + 1):
        for target in TARGETS:
            spy = None
            if args.py_spy is not None and pair == 1:
                spy = asyncio.create_task(
                    record(
                        processes[target].popen.pid,
                        spy_output(args.py_spy, target),
                        delay=args.warmup,
                        seconds=args.seconds,
                    )
                )
            before = CpuSnapshot.take(pids)
            result = await run_one(target, pair)
            after = CpuSnapshot.take(pids)
            if spy is not None:
                await spy
            result.server_cpu = before.used(after, processes[target].popen.pid)
            if broker_pid is not None:
                result.broker_cpu = before.used(after, broker_pid)
            if database_pid is not None:
                result.database_cpu = before.used(after, database_pid)
            result.foreign_cpus = before.foreign_cpus(after)
            print(result.line(), flush=True)
            cpus = cpu_line(before, after, named_pids, result.foreign_cpus)
            print(cpus + result.cpu_per_unit(), flush=True)
            if note := noisy_note(result.foreign_cpus):
                print(note, flush=True)
            for line in result.notes():
                print(line, flush=True)
            if result.failed:
                print(f"  {target} log tail:\n{processes[target].log_tail(10)}", flush=True)
            results.append(result)
    if watcher is not None:
        updates = await watcher.stop()
        print(f"console: its live saga list was open throughout and got {updates} updates")
    return results


def named_pids_of(
    processes: Mapping[str, Process],
    broker: tuple[str, int] | None,
    database_pid: int | None = None,
) -> dict[str, int]:
    """The pids whose CPU a run reports: the bench's, every server's, the broker's and the
    store's database server's if local."""
    named = {"bench": os.getpid()}
    named.update((name, process.popen.pid) for name, process in processes.items())
    if broker is not None:
        named[broker[0]] = broker[1]
    if database_pid is not None:
        named["database"] = database_pid
    return named


def summarize_closed(
    results: Sequence[Run], leftovers: Mapping[str, int], *, unit: str = "bookings"
) -> int:
    """Print the closed-loop means, any failure, and `ratio=` last; return the exit status."""
    means: dict[Target, float] = {}
    cpu_means: dict[Target, float] = {}
    database_means: dict[Target, float] = {}
    singular = unit.removesuffix("s")
    for target in TARGETS:
        runs = [result for result in results if result.target == target]
        means[target] = mean([len(result.latencies) / result.seconds for result in runs])
        cpu = [c for result in runs if (c := result.per_unit(result.server_cpu)) is not None]
        broker = [c for result in runs if (c := result.per_unit(result.broker_cpu)) is not None]
        database = [c for result in runs if (c := result.per_unit(result.database_cpu)) is not None]
        cpu_means[target] = mean(cpu)
        p50s = ", ".join(f"{percentile(result.latencies, 0.50) * 1000:.1f}" for result in runs)
        p99s = ", ".join(f"{percentile(result.latencies, 0.99) * 1000:.1f}" for result in runs)
        cpu_text = f", server cpu {cpu_means[target] * 1e6:.0f}us/{singular}" if cpu else ""
        broker_text = f", broker cpu {mean(broker) * 1e6:.0f}us/{singular}" if broker else ""
        if database:
            database_means[target] = mean(database)
            broker_text += f", database cpu {mean(database) * 1e6:.0f}us/{singular}"
        print(
            f"{target} mean: {means[target]:.0f} {unit}/s"
            f" (p50 per run: {p50s} ms; p99 per run: {p99s} ms{cpu_text}{broker_text})"
        )
    cpu_ratio = None
    if cpu_means["framework"] and cpu_means["baseline"]:
        cpu_ratio = cpu_means["framework"] / cpu_means["baseline"]
        print(
            f"server cpu per {singular}, framework/baseline: {cpu_ratio:.2f}"
            " (steadier than throughput on a shared machine)"
        )
    status = 0
    failed = sum(sum(result.errors.values()) for result in results)
    lost = sum(result.never_completed for result in results)
    if failed or lost:
        never = f", {lost} SAGAS NEVER COMPLETED" if lost else ""
        print(f"!!! {failed} CALLS FAILED{never}: the throughputs above are not comparable !!!")
        status = 1
    status = max(status, report_leftovers(leftovers))
    ratio = means["framework"] / means["baseline"] if means["baseline"] else 0.0
    # Figures for bench/ab.py --also: each side's server CPU per call, the database's.
    for target, cpu in cpu_means.items():
        if cpu:
            print(f"{target}_cpu_per_{singular}_us={cpu * 1e6:.0f}")
    if database_means.get("framework"):
        print(f"database_cpu_per_{singular}_us={database_means['framework'] * 1e6:.0f}")
    if cpu_ratio is not None:
        print(f"cpu_ratio={cpu_ratio:.3f}")  # for bench/ab.py --key cpu_ratio
    print(f"ratio={ratio:.2f}")
    return status


def report_leftovers(leftovers: Mapping[str, int]) -> int:
    """Flag the queues (or streams) that still held messages at the end: 1 if any, else 0."""
    for queue, count in sorted(leftovers.items()):
        print(f"!!! {count} messages were left in queue {queue} !!!")
    return 1 if leftovers else 0


def add_run_options(
    parser: argparse.ArgumentParser, *, seconds: float, concurrency_help: str
) -> None:
    """The options every booking bench takes: run lengths, load (closed loop, or open loop
    with `--rate`, bench/_openloop.py), upstream latency, profiles (cProfile, py-spy)."""
    parser.add_argument("--seconds", type=float, default=seconds, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="uncounted time before each run")
    parser.add_argument("--concurrency", type=int, default=64, help=concurrency_help)
    parser.add_argument("--pairs", type=int, default=2, help="framework+baseline pairs of runs")
    parser.add_argument(
        "--upstream-latency-ms", type=float, default=0.0, help="delay added by each upstream call"
    )
    parser.add_argument(
        "--call-timeout",
        type=float,
        default=DEFAULT_CALL_TIMEOUT_SECONDS,
        help="the load generator's deadline on each call, in seconds (default: 10)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the orchestrator under cProfile and write its stats to FILE",
    )
    add_py_spy_option(parser)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="R",
        help="open loop: offer R calls per second on a fixed schedule (the k-th at t0 + k/R) "
        "instead of --concurrency callers in a loop (default: closed loop)",
    )
    parser.add_argument(
        "--max-outstanding",
        type=int,
        default=DEFAULT_MAX_OUTSTANDING,
        help="open loop: calls in progress at most, a safety limit; calls it holds back are "
        f"reported (default: {DEFAULT_MAX_OUTSTANDING})",
    )


def check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse run options out of range."""
    if (
        args.seconds <= 0
        or args.warmup < 0
        or args.concurrency < 1
        or args.pairs < 1
        or args.call_timeout <= 0
    ):
        parser.error("--seconds, --concurrency, --pairs and --call-timeout must be positive")
    if args.rate < 0 or args.max_outstanding < 1:
        parser.error("--rate must not be negative and --max-outstanding must be positive")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    if args.py_spy is not None:
        args.py_spy = args.py_spy.resolve()
        py_spy_binary()  # there, before anything starts


def header_line(args: argparse.Namespace, channels: int, extra: str = "") -> str:
    """The invocation's first line: its load, run lengths and setup."""
    load = (
        f"rate={args.rate:g}/s call_timeout={args.call_timeout:g}"
        if getattr(args, "rate", None)
        else f"concurrency={args.concurrency}"
    )
    return (
        f"{load} seconds={args.seconds:g} warmup={args.warmup:g}"
        f" upstream_latency_ms={args.upstream_latency_ms:g} cpus={os.cpu_count()}"
        f" workers={args.workers} channels={channels} store={args.store}"
        + (" baseline=journaled" if getattr(args, "journaled_baseline", False) else "")
        + (f" {extra}" if extra else "")
    )
