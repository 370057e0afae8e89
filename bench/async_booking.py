"""Saga throughput of HandleAsyncBooking on a broker: the framework against a hand-written baseline.

It starts, as subprocesses on free ports: the demo Order upstream
(``main.py upstream order --db :memory:``), the demo Payment upstream wrapped
by ``bench/payment_probe.py`` (the same server, reporting each recorded
payment's request id and CLOCK_MONOTONIC time on a pipe to this process), the
framework (``python main.py`` on a temporary config: the broker of
``--broker`` (default ``$RABBITMQ_URL``), a unique topic prefix,
deployment/local/app.yaml's broker settings, the two upstreams) and the same
saga by hand with the broker's own client, its own unique prefix, same prefetch
and topology: ``bench/baseline_async.py`` on aio-pika for an ``amqp://``
broker, ``bench/baseline_async_nats.py`` on nats-py for a ``nats://`` one.

Then it loads the framework and the baseline in turn (F, B, F, B by default)
from this process: N callers on one channel, each in a loop submitting a saga
(HandleAsyncBooking, ProductID 1, a unique ``x-request-id``) and waiting until
the probe reports its payment, so N sagas are in flight. A saga's latency runs
from the start of its submit to its payment being recorded; its completion time
is the probe's timestamp. After a short uncounted warm-up, the run's figure is
the number of sagas completed inside the measured window over the window's
length. At the end of the window callers submit no more and wait for their
sagas (the drain): one that fails to complete within ``--completion-timeout``
counts as never completed.

It prints each run, the means, and as the very last line
``ratio=<framework mean sagas/s / baseline mean sagas/s>``. Failed submits and
sagas that never completed are flagged loudly and make the exit status 1. The
queues and exchanges (or streams) of both prefixes are deleted at the end, whatever happens.

    .venv/bin/python bench/async_booking.py [--seconds 8] [--concurrency 64]
        [--upstream-latency-ms 0] [--workers 1] [--profile FILE]
        [--broker nats://127.0.0.1:4222]

``--workers N``: as for sync_booking.py (bench/README.md, Workers).
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
from typing import Any, Final
from urllib.parse import urlsplit

import aio_pika
import grpc
import nats
import nats.js.errors
import uvloop
import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import topic as booking_topics  # noqa: E402
from bench.baseline_async import topology as baseline_topology  # noqa: E402
from bench.baseline_async_nats import stream_name as baseline_stream_name  # noqa: E402
from bench.common import (  # noqa: E402
    BENCH_DIR,
    DEFAULT_RABBITMQ_URL,
    HOST,
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
    listening_sockets,
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
from orchestrator.broker.nats import NatsBroker  # noqa: E402
from orchestrator.config import BrokerSettings, redact_url  # noqa: E402
from pb import booking_pb2  # noqa: E402

LOCAL_CONFIG: Final = ROOT / "deployment" / "local" / "app.yaml"
"""Its broker section (concurrency per topic, delivery limit...) is the one the framework runs."""
CALL_TIMEOUT_SECONDS: Final = 10.0
"""The load generator's deadline on each submit: a slow call is a latency, not an error."""


@dataclass
class RunResult:
    """One run against one target."""

    target: Target
    number: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    """Submit start to payment recorded, in seconds, of each saga completed inside the window."""
    submit_latencies: list[float] = field(default_factory=list)
    """HandleAsyncBooking call durations of the sagas completed inside the window."""
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Failed submits over the whole run (warm-up and drain included), by status code."""
    never_completed: int = 0
    """Accepted sagas whose payment was not recorded within the completion timeout."""
    completed: int = 0
    """Sagas completed over the whole run, warm-up and drain included."""
    unexpected: int = 0
    """Payments the probe reported that no caller was waiting for (duplicates, late ones)."""
    server_cpu: float | None = None
    """CPU seconds the target's process used over the whole run (None off Linux)."""
    broker_cpu: float | None = None
    """CPU seconds the broker used over the whole run (None when it is not a local process)."""
    foreign_cpus: float | None = None
    """CPUs busy with processes other than the bench's and the broker's over the run, on average."""

    @property
    def failed(self) -> int:
        """Failed submits plus sagas that never completed."""
        return sum(self.errors.values()) + self.never_completed

    @property
    def throughput(self) -> float:
        """Sagas completed inside the window per second."""
        return len(self.latencies) / self.seconds

    def per_saga(self, cpu_seconds: float | None) -> float | None:
        """`cpu_seconds` per saga completed over the whole run."""
        return None if cpu_seconds is None or not self.completed else cpu_seconds / self.completed

    def line(self) -> str:
        """`framework run 1: 812 sagas/s p50=70.1ms p99=120.3ms submit_p50=9.0ms errors=0`."""
        text = (
            f"{self.target} run {self.number}: {self.throughput:.0f} sagas/s"
            f" p50={percentile(self.latencies, 0.50) * 1000:.1f}ms"
            f" p99={percentile(self.latencies, 0.99) * 1000:.1f}ms"
            f" submit_p50={percentile(self.submit_latencies, 0.50) * 1000:.1f}ms"
            f" errors={sum(self.errors.values())} never_completed={self.never_completed}"
        )
        if self.failed:
            detail = ", ".join(f"{code}={count}" for code, count in sorted(self.errors.items()))
            text += (
                f" ({detail})  <<< !!! FAILED SAGAS !!!" if detail else "  <<< !!! LOST SAGAS !!!"
            )
        return text


class CompletionFeed(asyncio.Protocol):
    """Reads the probe's `<request id> <monotonic time>` lines and wakes the sagas' callers."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[float]] = {}
        self._buffer = b""
        self._lost: Exception | None = None
        self.closing = False
        """Set before closing the pipe on purpose: waiting callers are then cancelled quietly."""
        self.unexpected = 0
        """Reports nobody waited for: a second payment of a saga, or one after its timeout."""

    def expect(self, request_id: str) -> asyncio.Future[float]:
        """A future of `request_id`'s completion time; register it before submitting."""
        if self._lost is not None:
            raise self._lost
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        """Stop waiting for `request_id` (its submit failed or it timed out)."""
        self._waiting.pop(request_id, None)

    def data_received(self, data: bytes) -> None:
        """Resolve the futures of every complete line."""
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            request_id, _, stamp = line.decode().rpartition(" ")
            future = self._waiting.pop(request_id, None)
            if future is None or future.done():
                self.unexpected += 1
            else:
                future.set_result(float(stamp))

    def connection_lost(self, exc: Exception | None) -> None:
        """The pipe closed: unless on purpose, the probe died, so fail every waiting caller."""
        self._lost = RuntimeError(f"the payment probe's pipe closed ({exc!r})")
        for future in self._waiting.values():
            if self.closing:
                future.cancel()
            elif not future.done():
                future.set_exception(self._lost)
                future.exception()  # the first caller to see it fails the bench; no GC warnings
        self._waiting.clear()


async def load(
    result: RunResult,
    address: str,
    feed: CompletionFeed,
    *,
    run_id: str,
    concurrency: int,
    channels: int,
    warmup: float,
    completion_timeout: float,
) -> None:
    """Run `concurrency` submit-and-wait loops over `channels` channels (connections) for
    `warmup` + the window."""
    request = booking_pb2.BookingRequest(ProductID=1)
    clock = time.monotonic  # CLOCK_MONOTONIC, the probe's clock
    unexpected_before = feed.unexpected
    async with booking_stubs(address, channels) as stubs:
        window_start = clock() + warmup
        window_end = window_start + result.seconds

        async def caller(worker: int) -> None:
            stub = stubs[worker % len(stubs)]
            call = 0
            while (started := clock()) < window_end:
                request_id = f"{run_id}-{worker}-{call}"
                call += 1
                completion = feed.expect(request_id)  # before submitting: it may finish first
                try:
                    await stub.HandleAsyncBooking(
                        request,
                        metadata=(("x-request-id", request_id),),
                        timeout=CALL_TIMEOUT_SECONDS,
                    )
                    submitted = clock()
                    finished = await asyncio.wait_for(completion, completion_timeout)
                except grpc.aio.AioRpcError as exc:
                    result.errors[exc.code().name] += 1
                    continue
                except TimeoutError:
                    result.never_completed += 1
                    continue
                finally:
                    feed.forget(request_id)  # a no-op once completed
                result.completed += 1
                if window_start <= finished <= window_end:
                    result.latencies.append(finished - started)
                    result.submit_latencies.append(submitted - started)

        await asyncio.gather(*(caller(worker) for worker in range(concurrency)))
    result.unexpected = feed.unexpected - unexpected_before


async def wait_ready(
    processes: dict[str, Process], addresses: dict[str, str], workers: int
) -> None:
    """Every server serving, and every worker (or copy) of each target bound to its port."""
    await asyncio.gather(
        *(wait_serving(process, addresses[name]) for name, process in processes.items())
    )
    for target in TARGETS:
        port = int(addresses[target].rsplit(":", 1)[1])
        await wait_listening(processes[target], port, workers)


async def bench(
    args: argparse.Namespace,
    processes: dict[str, Process],
    addresses: dict[str, str],
    broker_pid: int | None,
    invocation: str,
) -> list[RunResult]:
    """Wait for every server, then run the targets in turn; SIGTERM cancels it."""
    main_task = asyncio.current_task()
    if main_task is not None:
        # Not the KeyboardInterrupt of `terminate`, which could fire inside a protocol callback.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    await wait_ready(processes, addresses, args.workers)
    probe_stdout = processes["payment"].popen.stdout
    if probe_stdout is None:
        raise RuntimeError("the payment probe has no stdout pipe")
    transport, feed = await asyncio.get_running_loop().connect_read_pipe(
        CompletionFeed, probe_stdout
    )
    named_pids = {"bench": os.getpid()}
    named_pids.update((name, process.popen.pid) for name, process in processes.items())
    if broker_pid is not None:
        named_pids["nats" if is_nats(args.broker or "") else "rabbitmq"] = broker_pid
    pids = list(named_pids.values())
    results: list[RunResult] = []
    watcher = ConsoleWatcher(addresses["console"]) if args.console else None
    if watcher is not None:
        watcher.start()
    try:
        for pair in range(1, args.pairs + 1):
            for target in TARGETS:
                result = RunResult(target, pair, args.seconds)
                before = CpuSnapshot.take(pids)
                await load(
                    result,
                    addresses[target],
                    feed,
                    run_id=f"{invocation}{target[0]}{pair}",
                    concurrency=args.concurrency,
                    channels=channel_count(args.workers),
                    warmup=args.warmup,
                    completion_timeout=args.completion_timeout,
                )
                after = CpuSnapshot.take(pids)
                result.server_cpu = before.used(after, processes[target].popen.pid)
                if broker_pid is not None:
                    result.broker_cpu = before.used(after, broker_pid)
                result.foreign_cpus = before.foreign_cpus(after)
                print(result.line(), flush=True)
                print(cpu_line(before, after, named_pids, result.foreign_cpus), flush=True)
                if note := noisy_note(result.foreign_cpus):
                    print(note, flush=True)
                if result.unexpected:
                    print(
                        f"  note: {result.unexpected} payments nobody waited for"
                        " (a redelivered hop, or a saga completed after its timeout)",
                        flush=True,
                    )
                if result.failed:
                    print(f"  {target} log tail:\n{processes[target].log_tail(10)}", flush=True)
                results.append(result)
    finally:
        feed.closing = True
        transport.close()
    if watcher is not None:
        updates = await watcher.stop()
        print(f"console: its live saga list was open throughout and got {updates} updates")
    return results


def cpu_line(
    before: CpuSnapshot, after: CpuSnapshot, pids: dict[str, int], foreign: float | None
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


def summarize(results: Sequence[RunResult], leftovers: dict[str, int]) -> int:
    """Print the means, any failure, and `ratio=` last; return the exit status."""
    means: dict[Target, float] = {}
    cpu_means: dict[Target, float] = {}
    for target in TARGETS:
        runs = [result for result in results if result.target == target]
        means[target] = mean([result.throughput for result in runs])
        cpu = [c for result in runs if (c := result.per_saga(result.server_cpu)) is not None]
        broker = [c for result in runs if (c := result.per_saga(result.broker_cpu)) is not None]
        cpu_means[target] = mean(cpu)
        p50s = ", ".join(f"{percentile(result.latencies, 0.50) * 1000:.1f}" for result in runs)
        p99s = ", ".join(f"{percentile(result.latencies, 0.99) * 1000:.1f}" for result in runs)
        cpu_text = f", server cpu {cpu_means[target] * 1e6:.0f}us/saga" if cpu else ""
        broker_text = f", broker cpu {mean(broker) * 1e6:.0f}us/saga" if broker else ""
        print(
            f"{target} mean: {means[target]:.0f} sagas/s"
            f" (p50 per run: {p50s} ms; p99 per run: {p99s} ms{cpu_text}{broker_text})"
        )
    if cpu_means["framework"] and cpu_means["baseline"]:
        print(
            "server cpu per saga, framework/baseline:"
            f" {cpu_means['framework'] / cpu_means['baseline']:.2f}"
            " (steadier than throughput on a shared machine)"
        )
    status = 0
    failed = sum(sum(result.errors.values()) for result in results)
    lost = sum(result.never_completed for result in results)
    if failed or lost:
        print(
            f"!!! {failed} SUBMITS FAILED, {lost} SAGAS NEVER COMPLETED:"
            " the throughputs above are not comparable !!!"
        )
        status = 1
    for queue, count in sorted(leftovers.items()):
        print(f"!!! {count} messages were left in queue {queue} !!!")
        status = 1
    ratio = means["framework"] / means["baseline"] if means["baseline"] else 0.0
    print(f"ratio={ratio:.2f}")
    return status


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
    parts = urlsplit(url)
    if parts.hostname not in {"127.0.0.1", "localhost", "::1"}:
        return None
    port = parts.port or (4222 if is_nats(url) else 5672)
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="HandleAsyncBooking sagas/s: the framework against a hand-written baseline."
    )
    add_store_option(parser)
    add_console_option(parser)
    add_workers_option(parser)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="uncounted time before each run")
    parser.add_argument("--concurrency", type=int, default=64, help="sagas in flight (callers)")
    parser.add_argument("--pairs", type=int, default=2, help="framework+baseline pairs of runs")
    parser.add_argument(
        "--completion-timeout",
        type=float,
        default=10.0,
        help="seconds after its submit before a saga counts as never completed",
    )
    parser.add_argument(
        "--upstream-latency-ms", type=float, default=0.0, help="delay added by each upstream call"
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="amqp://... (default: $RABBITMQ_URL, else local RabbitMQ) or nats://... (JetStream)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the orchestrator under cProfile and write its stats to FILE",
    )
    args = parser.parse_args(argv)
    if (
        args.seconds <= 0
        or args.warmup < 0
        or args.concurrency < 1
        or args.pairs < 1
        or args.completion_timeout <= 0
    ):
        parser.error("--seconds, --concurrency, --pairs and --completion-timeout must be positive")
    resolve_workers(parser, args)
    return args


def start_servers(
    args: argparse.Namespace,
    processes: dict[str, Process],
    ports: dict[str, int],
    *,
    url: str,
    broker: dict[str, Any],
    baseline_prefix: str,
    log_dir: Path,
) -> None:
    """Start the upstreams, the framework and the baseline into `processes`."""
    python = sys.executable
    latency = ["--latency-ms", str(args.upstream_latency_ms)]
    config_path = log_dir / "app.yaml"
    framework_config(
        config_path,
        ports["framework"],
        ports["order"],
        ports["payment"],
        broker=broker,
        store=args.store,
        console_port=ports["console"] if args.console else 0,
    )
    framework_argv = [python, "main.py", "--workers", str(args.workers)]
    if args.profile is not None:
        framework_argv = [python, str(BENCH_DIR / "profile_orchestrator.py"), str(args.profile)]
    env = child_environment()
    processes["order"] = start_process(
        "order",
        [
            python,
            "main.py",
            "upstream",
            "order",
            "--port",
            str(ports["order"]),
            "--db",
            ":memory:",
            *latency,
        ],
        log_dir,
        env,
    )
    processes["payment"] = start_process(
        "payment",
        [python, str(BENCH_DIR / "payment_probe.py"), "--port", str(ports["payment"]), *latency],
        log_dir,
        env,
        stdout_pipe=True,
    )
    processes["framework"] = start_process(
        "framework", framework_argv, log_dir, child_environment(ORCH_CONFIG=str(config_path))
    )
    baseline_argv = {
        "--host": HOST,
        "--port": str(ports["baseline"]),
        "--order": f"{HOST}:{ports['order']}",
        "--payment": f"{HOST}:{ports['payment']}",
        "--timeout-seconds": str(UPSTREAM_TIMEOUT_SECONDS),
        "--nats-url" if is_nats(url) else "--amqp-url": url,
        "--prefix": baseline_prefix,
        "--order-prefetch": str(concurrency_of(broker, booking_topics.CREATE_ORDER)),
        "--payment-prefetch": str(concurrency_of(broker, booking_topics.CREATE_PAYMENT)),
        "--delivery-limit": str(broker.get("delivery_limit", 5)),
        "--processes": str(args.workers),
    }
    processes["baseline"] = start_process(
        "baseline",
        [
            python,
            str(BENCH_DIR / ("baseline_async_nats.py" if is_nats(url) else "baseline_async.py")),
            *(x for kv in baseline_argv.items() for x in kv),
        ],
        log_dir,
        env,
    )


def clean_up(url: str, prefixes: tuple[str, str]) -> dict[str, int] | None:
    """Delete both prefixes' queues and exchanges (or streams); those that held messages, None
    on error."""
    queues, exchanges = framework_topology(prefixes[0])
    baseline_queues, baseline_exchanges = baseline_topology(prefixes[1])
    try:
        if is_nats(url):
            streams = [framework_stream(url, prefixes[0]), baseline_stream_name(prefixes[1])]
            return uvloop.run(delete_streams(url, streams))
        return uvloop.run(
            delete_topology(url, queues + baseline_queues, exchanges + baseline_exchanges)
        )
    except Exception as exc:
        print(
            f"!!! could not delete the queues and exchanges of {prefixes}: {exc!r} !!!",
            file=sys.stderr,
        )
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run the bench, always stop the servers and delete the queues."""
    args = parse_args(argv)
    if args.profile is not None:
        args.profile = args.profile.resolve()
    signal.signal(signal.SIGTERM, terminate)
    url = args.broker or os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    invocation = uuid.uuid4().hex[:8]  # in queue names and request ids: never reused
    prefixes = (f"bench.{invocation}.f.", f"bench.{invocation}.b.")  # framework, baseline
    broker = broker_settings(url, prefixes[0])
    try:
        uvloop.run(check_broker_of(url))
    except Exception as exc:
        print(f"bench failed: broker {redact_url(url)} unreachable: {exc!r}", file=sys.stderr)
        return 2
    names = ("order", "payment", "framework", "baseline", "console")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    addresses = {name: f"{HOST}:{port}" for name, port in ports.items()}
    log_dir = Path(tempfile.mkdtemp(prefix="async-booking-bench-"))
    processes: dict[str, Process] = {}
    results: list[RunResult] = []
    status = 0
    try:
        start_servers(
            args,
            processes,
            ports,
            url=url,
            broker=broker,
            baseline_prefix=prefixes[1],
            log_dir=log_dir,
        )
        broker_pid = find_broker_pid(url)
        print(
            f"concurrency={args.concurrency} seconds={args.seconds:g} warmup={args.warmup:g}"
            f" upstream_latency_ms={args.upstream_latency_ms:g} cpus={os.cpu_count()}"
            f" workers={args.workers} channels={channel_count(args.workers)} store={args.store}"
            f" broker={'pid ' + str(broker_pid) if broker_pid else 'not local (cpu not counted)'}"
            f" prefixes={','.join(prefixes)}",
            flush=True,
        )
        try:
            results = uvloop.run(bench(args, processes, addresses, broker_pid, invocation))
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
        stop_processes([processes[name] for name in TARGETS if name in processes])
        stop_processes([processes[name] for name in ("order", "payment") if name in processes])
        shutil.rmtree(log_dir, ignore_errors=True)
        leftovers = clean_up(url, prefixes)
    if status:
        return status
    if args.profile is not None:
        print(f"orchestrator profile: {args.profile} (summary: {args.profile}.txt)")
    status = summarize(results, leftovers or {})
    return 1 if leftovers is None else status


if __name__ == "__main__":
    sys.exit(main())
