"""Throughput of HandleSyncBooking: the framework against a hand-written baseline.

It starts the demo Order and Payment upstreams, ``python main.py`` (the
framework, on a temporary config that points at them) and
``bench/baseline_sync.py`` (the same two upstream calls in a bare grpc.aio
servicer), each as a subprocess on free ports. Then it loads the framework and
the baseline in turn (F, B, F, B by default) from this process: N concurrent
callers on one channel, each booking in a loop with a unique ``x-request-id``,
for a fixed time after a short warm-up whose calls are not counted.

It prints each run, the means, and as the very last line
``ratio=<framework mean throughput / baseline mean throughput>``. Taking the
means over alternated runs cancels the drift of a shared machine. A run with
failed calls says so loudly and the exit status is 1.

    .venv/bin/python bench/sync_booking.py [--seconds 10] [--concurrency 64]
        [--upstream-latency-ms 0] [--workers 1] [--profile FILE]

``--workers N`` runs the framework as ``main.py --workers N`` and the baseline as
N copies on its port, and spreads the load over several connections (see
bench/README.md, Workers).

``--profile FILE`` runs the orchestrator under cProfile (bench/profile_orchestrator.py)
and writes its stats to FILE (and a readable summary to FILE.txt); profiling
slows the framework, so the ratio of such a run is not a figure to report.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
import uvloop

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BENCH_DIR,
    DEFAULT_RABBITMQ_URL,
    HOST,
    MEMORY_BROKER,
    TARGETS,
    UPSTREAM_TIMEOUT_SECONDS,
    ConsoleWatcher,
    CpuSnapshot,
    Process,
    Target,
    add_console_option,
    add_store_option,
    add_workers_option,
    booking_stubs,
    channel_count,
    child_environment,
    delete_topology,
    framework_config,
    framework_topology,
    free_ports,
    mean,
    noisy_note,
    percentile,
    resolve_workers,
    start_process,
    stop_processes,
    terminate,
    wait_listening,
    wait_serving,
)
from orchestrator.config import redact_url  # noqa: E402
from pb import booking_pb2  # noqa: E402

CALL_TIMEOUT_SECONDS: Final = 10.0
"""The load generator's deadline on each booking: a slow call is a latency, not an error."""


@dataclass
class RunResult:
    """The measured window of one run against one target."""

    target: Target
    number: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    """Seconds per successful call completed inside the window."""
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Failed calls completed inside the window, by status code."""
    warmup_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    calls_ok: int = 0
    """Successful calls over the whole run, warm-up and tail included."""
    server_cpu: float | None = None
    """CPU seconds the target's process used over the whole run (None off Linux)."""
    foreign_cpus: float | None = None
    """CPUs busy with processes other than the bench's own over the run, on average."""

    @property
    def cpu_per_booking(self) -> float | None:
        """Server CPU seconds per successful booking, over the whole run."""
        if self.server_cpu is None or not self.calls_ok:
            return None
        return self.server_cpu / self.calls_ok

    @property
    def throughput(self) -> float:
        """Successful bookings per second."""
        return len(self.latencies) / self.seconds

    def percentile(self, fraction: float) -> float:
        """The latency (seconds) below which `fraction` of successful calls fall."""
        return percentile(self.latencies, fraction)

    def line(self) -> str:
        """`framework run 1: 1234 bookings/s p50=12.3ms p99=45.6ms errors=0`."""
        errors = sum(self.errors.values())
        detail = f" ({', '.join(f'{k}={v}' for k, v in sorted(self.errors.items()))})"
        return (
            f"{self.target} run {self.number}: {self.throughput:.0f} bookings/s"
            f" p50={self.percentile(0.50) * 1000:.1f}ms"
            f" p99={self.percentile(0.99) * 1000:.1f}ms"
            f" errors={errors}{detail + '  <<< !!! FAILED CALLS !!!' if errors else ''}"
        )


async def load(
    target_name: Target,
    number: int,
    address: str,
    *,
    run_id: str,
    concurrency: int,
    channels: int,
    warmup: float,
    seconds: float,
) -> RunResult:
    """Book from `concurrency` callers over `channels` channels (connections) for `warmup` +
    `seconds` seconds."""
    result = RunResult(target_name, number, seconds)
    request = booking_pb2.BookingRequest(ProductID=1)
    clock = time.perf_counter
    async with booking_stubs(address, channels) as stubs:
        window_start = clock() + warmup
        window_end = window_start + seconds

        async def caller(worker: int) -> None:
            stub = stubs[worker % len(stubs)]
            call = 0
            while (started := clock()) < window_end:
                metadata = (("x-request-id", f"{run_id}-{worker}-{call}"),)
                call += 1
                try:
                    await stub.HandleSyncBooking(
                        request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
                    )
                except grpc.aio.AioRpcError as exc:
                    done = clock()
                    if window_start <= done <= window_end:
                        result.errors[exc.code().name] += 1
                    elif done < window_start:
                        result.warmup_errors[exc.code().name] += 1
                    continue
                done = clock()
                result.calls_ok += 1
                if window_start <= done <= window_end:
                    result.latencies.append(done - started)

        await asyncio.gather(*(caller(worker) for worker in range(concurrency)))
    return result


async def bench(
    args: argparse.Namespace, processes: dict[str, Process], addresses: dict[str, str]
) -> list[RunResult]:
    """Wait for every server, then run the targets in turn."""
    await asyncio.gather(
        *(wait_serving(process, addresses[name]) for name, process in processes.items())
    )
    for target in TARGETS:  # every worker (or copy) of each is bound
        port = int(addresses[target].rsplit(":", 1)[1])
        await wait_listening(processes[target], port, args.workers)
    pids = [os.getpid(), *(process.popen.pid for process in processes.values())]
    invocation = uuid.uuid4().hex[:8]  # request ids never repeat across invocations either
    results: list[RunResult] = []
    watcher = ConsoleWatcher(addresses["console"]) if args.console else None
    if watcher is not None:
        watcher.start()
    for pair in range(1, args.pairs + 1):
        for target in TARGETS:
            before = CpuSnapshot.take(pids)
            result = await load(
                target,
                pair,
                addresses[target],
                run_id=f"{invocation}{target[0]}{pair}",
                concurrency=args.concurrency,
                channels=channel_count(args.workers),
                warmup=args.warmup,
                seconds=args.seconds,
            )
            after = CpuSnapshot.take(pids)
            result.server_cpu = before.used(after, processes[target].popen.pid)
            result.foreign_cpus = before.foreign_cpus(after)
            print(result.line(), flush=True)
            if note := noisy_note(result.foreign_cpus):
                print(note, flush=True)
            if result.warmup_errors:
                print(
                    f"  !!! {sum(result.warmup_errors.values())} failed calls during the"
                    f" warm-up: {dict(result.warmup_errors)}",
                    flush=True,
                )
            results.append(result)
    if watcher is not None:
        updates = await watcher.stop()
        print(f"console: its live saga list was open throughout and got {updates} updates")
    return results


def summarize(results: Sequence[RunResult]) -> int:
    """Print the means, any error warning, and `ratio=` last; return the exit status."""
    means: dict[Target, float] = {}
    cpu_means: dict[Target, float] = {}
    for target in TARGETS:
        runs = [result for result in results if result.target == target]
        means[target] = mean([result.throughput for result in runs])
        cpu = [c for result in runs if (c := result.cpu_per_booking) is not None]
        cpu_means[target] = mean(cpu)
        p99s = ", ".join(f"{result.percentile(0.99) * 1000:.1f}" for result in runs)
        cpu_text = f", server cpu {cpu_means[target] * 1e6:.0f}us/booking" if cpu else ""
        print(f"{target} mean: {means[target]:.0f} bookings/s (p99 per run: {p99s} ms{cpu_text})")
    if cpu_means["framework"] and cpu_means["baseline"]:
        print(
            "server cpu per booking, framework/baseline:"
            f" {cpu_means['framework'] / cpu_means['baseline']:.2f}"
            " (steadier than throughput on a shared machine)"
        )
    failed = sum(sum(result.errors.values()) for result in results)
    status = 0
    if failed:
        print(f"!!! {failed} CALLS FAILED: the throughputs above are not comparable !!!")
        status = 1
    ratio = means["framework"] / means["baseline"] if means["baseline"] else 0.0
    print(f"ratio={ratio:.2f}")
    return status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="HandleSyncBooking throughput: the framework against a hand-written baseline."
    )
    add_store_option(parser)
    add_console_option(parser)
    add_workers_option(parser)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="uncounted time before each run")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent callers")
    parser.add_argument("--pairs", type=int, default=2, help="framework+baseline pairs of runs")
    parser.add_argument(
        "--upstream-latency-ms", type=float, default=0.0, help="delay added by each upstream call"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the orchestrator under cProfile and write its stats to FILE",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1 or args.pairs < 1:
        parser.error("--seconds and --concurrency and --pairs must be positive")
    resolve_workers(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run the bench, always stop the servers."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminate)
    order_port, payment_port, framework_port, baseline_port, console_port = free_ports(5)
    addresses = {
        "order": f"{HOST}:{order_port}",
        "payment": f"{HOST}:{payment_port}",
        "framework": f"{HOST}:{framework_port}",
        "baseline": f"{HOST}:{baseline_port}",
        "console": f"{HOST}:{console_port}",
    }
    python = sys.executable
    latency = ["--latency-ms", str(args.upstream_latency_ms)]
    log_dir = Path(tempfile.mkdtemp(prefix="sync-booking-bench-"))
    config_path = log_dir / "app.yaml"
    # Workers share a broker too (a sync booking publishes only its rollback): RabbitMQ.
    url = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    prefix = f"bench.{uuid.uuid4().hex[:8]}.s."
    broker = {**MEMORY_BROKER, "url": url, "topic_prefix": prefix}
    framework_config(
        config_path,
        framework_port,
        order_port,
        payment_port,
        store=args.store,
        console_port=console_port if args.console else 0,
        **({"broker": broker} if args.workers > 1 else {}),
    )
    framework_argv = [python, "main.py", "--workers", str(args.workers)]
    if args.profile is not None:
        profile_path = args.profile.resolve()
        framework_argv = [python, str(BENCH_DIR / "profile_orchestrator.py"), str(profile_path)]
    env = child_environment()
    processes: dict[str, Process] = {}
    try:
        for service, port in (("order", order_port), ("payment", payment_port)):
            processes[service] = start_process(
                service,
                [
                    python,
                    "main.py",
                    "upstream",
                    service,
                    "--port",
                    str(port),
                    "--db",
                    ":memory:",
                    *latency,
                ],
                log_dir,
                env,
            )
        processes["framework"] = start_process(
            "framework", framework_argv, log_dir, child_environment(ORCH_CONFIG=str(config_path))
        )
        processes["baseline"] = start_process(
            "baseline",
            [
                python,
                str(BENCH_DIR / "baseline_sync.py"),
                "--host",
                HOST,
                "--port",
                str(baseline_port),
                "--order",
                addresses["order"],
                "--payment",
                addresses["payment"],
                "--timeout-seconds",
                str(UPSTREAM_TIMEOUT_SECONDS),
                "--processes",
                str(args.workers),
            ],
            log_dir,
            env,
        )
        print(
            f"concurrency={args.concurrency} seconds={args.seconds:g} warmup={args.warmup:g}"
            f" upstream_latency_ms={args.upstream_latency_ms:g} cpus={os.cpu_count()}"
            f" workers={args.workers} channels={channel_count(args.workers)}"
            f" store={args.store}"
            + (f" broker={redact_url(url)} prefix={prefix}" if args.workers > 1 else ""),
            flush=True,
        )
        results = uvloop.run(bench(args, processes, addresses))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    finally:
        # The servers first, so the upstreams see no call after they stop.
        stop_processes([processes[name] for name in ("framework", "baseline") if name in processes])
        stop_processes([processes[name] for name in ("order", "payment") if name in processes])
        shutil.rmtree(log_dir, ignore_errors=True)
        if args.workers > 1:
            queues, exchanges = framework_topology(prefix)
            uvloop.run(delete_topology(url, queues, exchanges))
    if args.profile is not None:
        print(f"orchestrator profile: {args.profile} (summary: {args.profile}.txt)")
    return summarize(results)


if __name__ == "__main__":
    sys.exit(main())
